"""The slide family of `cfm.export`: a slide encoder of objective `align` (cfm/ssl/align.py)
with what pairs it with the omics side.

The weights file holds the slide encoder (family "slide", `cfm.models.slide`), loadable with
`cfm.load_pretrained`; `ALIGN_FILE` (safetensors, whatever the export format) holds both
projections into the shared space, the sigmoid loss's t' and b, the expression read-out and the
omics encoder they pair with (`cfm.pretrained.read_align_heads`). config.json records both
architectures.
"""

from __future__ import annotations

import datetime
import os

from cfm import checkpoint
from cfm.models.backbone import architecture
from cfm.version import cfm_version

ALIGN_FILE = "align_heads.safetensors"  # a slide export's projections and omics encoder


def info(config: dict, step: int, fmt: str, dtype: str) -> dict:
    """config.json of a slide encoder (objective align): the encoder's architecture, and the
    pieces of `ALIGN_FILE` (both projections, the loss's t' and b, the omics encoder they pair
    with, whose architecture `omics_architecture` records)."""
    return {
        "architecture": architecture(config["model"]),
        "omics_architecture": architecture(config["omics_model"]),
        "preprocessing": {
            "files": [ALIGN_FILE],
            "recipe": "bags of the tile embeddings of the encoder the pairs were made with "
                      "(cfm.embed), (x, y) in tile units; omics prepared with the pairs' "
                      "vocab.tsv",
            "align_heads": "heads.slide / heads.omics: Dense kernel [in, proj_dim] + bias, "
                           "L2-normalise after; heads.t_prime, heads.bias: the sigmoid loss's "
                           "log-temperature and bias; omics.*: the omics encoder",
        },
        "provenance": {
            "step": int(step), "training_config": config, "cfm_version": cfm_version(),
            "export_time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
            "weights": "the slide encoder; both projections and the omics encoder in "
                       f"{ALIGN_FILE}",
        },
        "export": {"format": fmt, "dtype": dtype},
    }


def align_extras(workdir: str, step: int) -> dict:
    """{"heads": projections, t', b (and the read-out), "omics": the omics encoder} of an
    align run's checkpoint `step`, as host numpy arrays."""
    ckpt = checkpoint.read_config(workdir, step)
    state = checkpoint.read_arrays(os.path.join(ckpt.step_dir, "state"),
                                   [("params", "heads"), ("params", "omics")])
    return {k: state["params"][k] for k in ("heads", "omics")}


def readme(info: dict, out: str) -> str:
    arch, prov = info["architecture"], info["provenance"]
    return (f"# cfm slide encoder ({arch['variant']}), step {prov['step']}\n\n"
            f"Exported by `python -m cfm.export` (cfm {prov['cfm_version']}) on "
            f"{prov['export_time_utc']} as `{info['export']['format']}`, "
            f"{info['export']['dtype']} weights: a gated-attention slide encoder over bags of "
            f"{arch['in_dim']}-d tile embeddings (width {arch['width']}), aligned with an "
            f"omics encoder by slide-omics alignment (cfm objective `align`). {ALIGN_FILE} "
            "holds both projections into the shared space and the omics encoder.\n\n"
            "```python\nimport cfm\n"
            f"model, params = cfm.load_pretrained({out!r})\n"
            "slide = model.apply({'params': params}, bag, coords, mask)['embedding']\n"
            f"heads = cfm.pretrained.read_align_heads({out!r})\n```\n")
