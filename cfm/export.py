"""Export the released backbone of a cfm.train checkpoint as a model: the teacher of a DINOv2
run (DINOv2 releases the teacher), the network of a masked gene modelling run (the objective's
`export_tree`, which `cfm.pretrained.read_checkpoint` follows).

    python -m cfm.export --workdir DIR [--step N] --out DIR --format {orbax,safetensors,timm}
        [--dtype float32|bfloat16] [--overwrite]

`--out` receives, besides the weights, `config.json` (architecture, preprocessing, provenance)
and `README.md` (how to load it):
  orbax        params/            an orbax PyTree checkpoint of the cfm backbone parameters
  safetensors  model.safetensors  the same tree under flat "a.b.c" keys (block_0.attn.qkv_kernel)
  timm         model.safetensors  timm VisionTransformer names and layouts (ViTs only); the exact
                                  `timm.create_model(...)` call is printed and put in README.md
An omics export also carries the prepared data's vocab.tsv, stats.json and manifest.json.
orbax and safetensors exports load with `cfm.load_pretrained(DIR)`. Only the released backbone
is read from the checkpoint (through `cfm.checkpoint`), into host memory, so any machine can
export any run. The export is staged beside `--out` and swapped in at the end
(`cfm.atomic.atomic_folder`): `--out` either holds a complete export or is untouched. Exit
status 2, with a message naming the path, for a workdir without checkpoints, a missing step, a
damaged checkpoint or an existing non-empty `--out`.

This module holds the config.json (provenance, tile manifests, timm keyword arguments), the
conversion to timm's names and layouts, the README and the writing.
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import json
import os
import shutil
from typing import Any

from cfm import preemption

if __name__ == "__main__":  # before the imports below load JAX (seconds): a signal
    preemption.note_signals()  # meanwhile is noted, then acted on (cfm.preemption)

import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
from safetensors.numpy import save_file

from cfm import cli_help, errors, export_slide, pretrained
from cfm.atomic import atomic_folder
from cfm.checkpoint import CheckpointError, flatten
from cfm.models.backbone import architecture
from cfm.pretrained import CONFIG_FILE, ORBAX_DIR, WEIGHTS_FILE
from cfm.version import cfm_version

FORMATS = ("orbax", "safetensors", "timm")
DTYPES = ("float32", "bfloat16")
# Selects timm's VisionTransformer; the kwargs override every size it sets. (Not a DINOv2 name:
# those set init_values, and timm.create_model drops None kwargs, so LayerScale could not be off.)
TIMM_MODEL_NAME = "vit_base_patch16_224"


class ExportError(ValueError):
    """A run that cannot be written in the requested format."""


# ============================================================================ provenance ======
def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def data_manifests(data_cfg: dict) -> tuple[dict, list[dict] | None, str | None]:
    """(tile preprocessing, manifests, note) for a run's `config.data`.

    For `source == "shards"` (data_prep.tile_wsi output): every manifest.csv under data.path
    (one per --num-shards part) with its sha256 and tile count; tile side in px from tile_wsi's
    config.json next to it; microns per pixel = the distinct `mpp` values the manifests list.
    Other sources, or a data.path absent on this machine, give nulls and a note why."""
    empty = {"tile_size_px": None, "microns_per_pixel": None}
    if data_cfg.get("source") != "shards":
        return empty, None, f"data.source={data_cfg.get('source')!r}: no tile manifest"
    root = data_cfg.get("path", "")
    paths = sorted(os.path.join(d, "manifest.csv") for d, _, names in os.walk(root)
                   if "manifest.csv" in names) if os.path.isdir(root) else []
    if not paths:
        return empty, None, f"data.path={root!r}: no manifest.csv found on the exporting machine"
    manifests, mpps, sizes = [], set(), set()
    for path in paths:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        mpps.update(float(r["mpp"]) for r in rows if r.get("mpp"))
        tiling = os.path.join(os.path.dirname(path), "config.json")
        if os.path.isfile(tiling):
            with open(tiling, encoding="utf-8") as f:
                sizes.add(int(json.load(f)["tile_size"]))
        manifests.append({"path": os.path.relpath(path, root), "sha256": _sha256(path),
                          "tiles": len(rows)})
    size = sizes.pop() if len(sizes) == 1 else (sorted(sizes) or None)
    return {"tile_size_px": size, "microns_per_pixel": sorted(mpps) or None}, manifests, None


OMICS_FILES = ("vocab.tsv", "stats.json", "manifest.json")  # copied from the prepared folder


def _omics_sources(root: str) -> dict:
    """What the model saw, from the prepared folder's manifest.json: the normalisation, the
    sample count and, per source (data_prep.prepare_omics `sources`), its inputs, samples and
    genes per modality."""
    with open(os.path.join(root, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    keep = ("inputs", "transform", "samples", "samples_per_split", "genes_per_modality")
    return {"normalise": manifest.get("normalise", "pooled"),
            "samples": sum(s["samples"] for s in manifest["splits"].values()),
            "genes_per_modality": manifest.get("genes_per_modality"),
            "sources": [{k: s.get(k) for k in keep} for s in manifest.get("sources", [])]}


def _omics_info(config: dict, step: int, fmt: str, dtype: str) -> dict:
    """config.json of an omics (masked gene modelling) export: the vocabulary and statistics
    travel with the weights, since token ids and normalisation mean nothing without them."""
    if fmt == "timm":
        raise ExportError("--format timm is for ViTs; export an omics model as orbax or "
                          "safetensors")
    root = config.get("data", {}).get("path", "")
    found = [n for n in OMICS_FILES if root and os.path.isfile(os.path.join(root, n))]
    return {
        "architecture": architecture(config["model"]),
        "preprocessing": {
            "files": found,
            "recipe": "prepare new tables with python -m data_prep.prepare_omics --vocab "
                      "<this folder>/vocab.tsv so gene ids match; values as stats.json says",
            "note": None if found else f"data.source={config['data'].get('source')!r}, "
                    f"data.path={root!r}: no vocab.tsv/stats.json on the exporting machine",
        },
        "provenance": {
            "step": int(step), "training_config": config, "cfm_version": cfm_version(),
            "data_manifests": [{"path": n, "sha256": _sha256(os.path.join(root, n))}
                               for n in found],
            "training_data": _omics_sources(root) if "manifest.json" in found else None,
            "export_time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
            "weights": "the network's backbone (masked gene modelling has no teacher)",
        },
        "export": {"format": fmt, "dtype": dtype},
    }


def build_info(config: dict, step: int, fmt: str, dtype: str) -> dict:
    """The export's config.json: architecture, preprocessing, provenance, export."""
    arch = architecture(config["model"])
    if arch["family"] == "omics":
        return _omics_info(config, step, fmt, dtype)
    if arch["family"] == "slide":
        if fmt == "timm":
            raise ExportError("--format timm is for ViTs; export a slide encoder as orbax or "
                              "safetensors")
        return export_slide.info(config, step, fmt, dtype)
    tiles, manifests, note = data_manifests(config.get("data", {}))
    info = {
        "architecture": arch,
        "preprocessing": {
            "mean": list(config["augment"]["mean"]), "std": list(config["augment"]["std"]),
            "input_size_px": arch["img_size"], **tiles,
            "recipe": "RGB tile resized (bicubic, no crop) to input_size_px, scaled to [0, 1], "
                      "minus mean, divided by std; cfm takes NHWC, timm NCHW",
        },
        "provenance": {
            "step": int(step), "training_config": config, "data_manifests": manifests,
            "data_manifest_note": note, "cfm_version": cfm_version(),
            "export_time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
            "weights": "teacher backbone (EMA of the student), as DINOv2 releases it",
        },
        "export": {"format": fmt, "dtype": dtype},
    }
    if fmt == "timm":
        info["export"]["timm"] = timm_spec(arch, info["preprocessing"])
    return info


# ============================================================================ timm ============
def _timm_mlp_ratio(width: int, fc1: int) -> float:
    """An mlp_ratio for which timm's `int(width * mlp_ratio)` is exactly `fc1`."""
    ratio = fc1 / width
    while int(width * ratio) < fc1:
        ratio = float(np.nextafter(ratio, np.inf))
    if int(width * ratio) != fc1:
        raise ExportError(f"no timm mlp_ratio gives an MLP of {fc1} units at width {width}")
    return ratio


def timm_spec(arch: dict, prep: dict) -> dict:
    """timm.create_model name and keyword arguments (JSON-able; `mlp_layer` is a timm.layers
    name) that build the exported backbone; ExportError for what timm cannot express."""
    if arch["ffn"] not in ("mlp", "swiglu"):
        raise ExportError(f"model.ffn={arch['ffn']!r} has no timm equivalent (mlp or swiglu)")
    if arch["width"] % arch["heads"]:
        raise ExportError(f"width {arch['width']} does not divide into {arch['heads']} heads")
    swiglu = arch["ffn"] == "swiglu"
    fc1 = 2 * arch["mlp_hidden"] if swiglu else arch["mlp_hidden"]
    r = arch["num_registers"]
    kwargs: dict[str, Any] = dict(
        img_size=arch["img_size"], patch_size=arch["patch"], embed_dim=arch["width"],
        depth=arch["depth"], num_heads=arch["heads"],
        mlp_ratio=_timm_mlp_ratio(arch["width"], fc1), qkv_bias=arch["qkv_bias"],
        class_token=True, global_pool="token", reg_tokens=r,
        # DINOv2's layout in timm: without registers pos_embed has a CLS row (added by timm);
        # with registers (no_embed_class) the CLS row is folded into cls_token at export.
        no_embed_class=r > 0, dynamic_img_size=True, num_classes=0)
    if arch["layerscale"]:
        kwargs["init_values"] = arch["layerscale"]  # LayerScale on (its value is in the weights)
    if swiglu:  # SwiGLUPacked: fc1 = [W1 | W2] packed, silu on the first half (gate_last=False)
        kwargs.update(mlp_layer="SwiGLUPacked", act_layer="silu")
    size = arch["img_size"]
    overlay = dict(mean=tuple(prep["mean"]), std=tuple(prep["std"]), input_size=(3, size, size),
                   crop_pct=1.0, interpolation="bicubic", num_classes=0)
    return {"model_name": TIMM_MODEL_NAME, "kwargs": kwargs, "pretrained_cfg_overlay": overlay}


def timm_call(spec: dict, weights: str) -> str:
    """Python source that builds the model with timm and loads `weights` (model.safetensors)."""
    kw = dict(spec["kwargs"])
    lines = ["import timm"]
    if kw.get("mlp_layer") == "SwiGLUPacked":
        lines.append("from timm.layers import SwiGLUPacked")
    overlay = ",\n        ".join(f"{k}={v!r}" for k, v in dict(
        file=weights, **spec["pretrained_cfg_overlay"]).items())
    args = [f"{spec['model_name']!r}", "pretrained=True",
            f"pretrained_cfg_overlay=dict(\n        {overlay})"]
    args += [f"{k}={'SwiGLUPacked' if k == 'mlp_layer' else repr(v)}" for k, v in kw.items()]
    lines.append("model = timm.create_model(\n    " + ",\n    ".join(args) + ",\n).eval()")
    return "\n".join(lines)


def to_timm(params: dict, arch: dict) -> dict[str, np.ndarray]:
    """cfm ViT params (per-block layout, float32 numpy) -> timm VisionTransformer state dict
    (numpy, torch layouts: Linear weights [out, in], conv weight [out, in, kh, kw])."""
    d = arch["width"]
    p = {k: np.asarray(v, np.float32) for k, v in flatten(params).items()}
    pos = p["pos_embed"]  # [1, 1 + N, D]: row 0 is CLS's
    sd: dict[str, np.ndarray] = {}
    if arch["num_registers"]:  # no_embed_class: CLS carries its position row
        sd["cls_token"] = p["cls_token"] + pos[:, :1]
        sd["reg_token"] = p["reg_tokens"]
        sd["pos_embed"] = pos[:, 1:]
    else:
        sd["cls_token"], sd["pos_embed"] = p["cls_token"], pos
    sd["patch_embed.proj.weight"] = p["patch_embed.kernel"].transpose(3, 2, 0, 1)
    sd["patch_embed.proj.bias"] = p["patch_embed.bias"]
    fc1 = "w12" if arch["ffn"] == "swiglu" else "fc1"
    for i in range(arch["depth"]):
        b, t = f"block_{i}.", f"blocks.{i}."
        for n in ("norm1", "norm2"):
            sd[t + n + ".weight"], sd[t + n + ".bias"] = p[b + n + ".scale"], p[b + n + ".bias"]
        # qkv_kernel [D, 3, H, Dh]: output unit (s, h, k) is timm's row s*D + h*Dh + k
        sd[t + "attn.qkv.weight"] = p[b + "attn.qkv_kernel"].reshape(d, 3 * d).T
        if arch["qkv_bias"]:
            sd[t + "attn.qkv.bias"] = p[b + "attn.qkv_bias"].reshape(3 * d)
        sd[t + "attn.proj.weight"] = p[b + "attn.proj_kernel"].reshape(d, d).T
        sd[t + "attn.proj.bias"] = p[b + "attn.proj_bias"]
        if arch["layerscale"]:
            sd[t + "ls1.gamma"], sd[t + "ls2.gamma"] = p[b + "ls1.gamma"], p[b + "ls2.gamma"]
        sd[t + "mlp.fc1.weight"] = p[b + f"mlp.{fc1}.kernel"].T
        sd[t + "mlp.fc1.bias"] = p[b + f"mlp.{fc1}.bias"]
        sd[t + "mlp.fc2.weight"] = p[b + "mlp.fc2.kernel"].T
        sd[t + "mlp.fc2.bias"] = p[b + "mlp.fc2.bias"]
    sd["norm.weight"], sd["norm.bias"] = p["norm.scale"], p["norm.bias"]
    return {k: np.ascontiguousarray(v) for k, v in sd.items()}


# ============================================================================ writing =========
def _cast(tree: dict, dtype: str) -> dict:
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
    return {k: _cast(v, dtype) if isinstance(v, dict) else
            np.ascontiguousarray(np.asarray(v, np.float32).astype(np_dtype))
            for k, v in tree.items()}


def _seen(data: dict | None) -> str:
    """` on N samples from K sources (expression z-scored per source): a (n samples; genes
    per modality), ...` for the README, or nothing where the manifest was not exported."""
    if not data:
        return ""
    parts = [f"{s['inputs']} ({s['samples']} samples; " + ", ".join(
        f"{m} {n}" for m, n in (s["genes_per_modality"] or {}).items()) + ")"
        for s in data["sources"]]
    norm = ("expression z-scored per source" if data["normalise"] == "per-input"
            else "expression z-scored with statistics pooled over all sources")
    return (f" on {data['samples']} samples from {len(parts)} sources ({norm}): "
            + "; ".join(parts) if parts else f" on {data['samples']} samples")


def _omics_readme(info: dict, out: str) -> str:
    arch, prov, prep = info["architecture"], info["provenance"], info["preprocessing"]
    missing = [n for n in OMICS_FILES if n not in prep["files"]]
    why = prep["note"] or "not in the run's data.path on the exporting machine"
    lacking = (f"This export lacks {', '.join(missing)} ({why}): prepare new tables "
               "with the vocabulary and statistics of the run's own prepared data.\n\n"
               if missing else "")
    per_input = (" --normalise per-input" if (prov.get("training_data") or {}).get("normalise")
                 == "per-input" else "")
    return (f"# cfm {arch['variant']} omics encoder, step {prov['step']}\n\n"
            f"Exported by `python -m cfm.export` (cfm {prov['cfm_version']}) on "
            f"{prov['export_time_utc']} as `{info['export']['format']}`, "
            f"{info['export']['dtype']} weights. Width {arch['width']}, depth {arch['depth']}, "
            f"{arch['heads']} heads, vocabulary {arch['vocab_size']}, values "
            f"{arch['value_encoding']}. Pretrained by masked gene modelling"
            f"{_seen(prov.get('training_data'))}.\n\n"
            f"{lacking}Prepare tables with `python -m data_prep.prepare_omics --vocab "
            f"{os.path.join(out, 'vocab.tsv')}{per_input} ...`, then\n\n"
            f"```bash\npython -m cfm.embed --model {out} --omics PREPARED --out EMB\n```\n\n"
            "or in JAX:\n\n```python\nimport cfm\n"
            f"model, params = cfm.load_pretrained({out!r})\n"
            "out = model.apply({'params': params}, gene_ids, modality, values, classes)\n"
            "sample_embedding = out['cls']\n```\n")


def _either(values: Any, unit: str) -> str:
    """`224 px`, `0.5 or 1.0 um/px`: one value or a list of them, with its unit."""
    values = values if isinstance(values, list) else [values]
    return " or ".join(str(v) for v in values) + f" {unit}"


def _training_tiles(prep: dict, note: str | None) -> str:
    """The README's words for the training tiles' size and resolution, saying which is unknown
    and why (`note`: data_manifests' reason) instead of printing a null."""
    size, mpp = prep["tile_size_px"], prep["microns_per_pixel"]
    if size is None and mpp is None:
        return ("the training tiles' size and microns per pixel are unknown "
                f"({note or 'no tile manifest'})")
    if size is None:
        return (f"training tiles at {_either(mpp, 'um/px')}, of a size not recorded (no "
                "tile_wsi config.json beside the manifests)")
    if mpp is None:
        return (f"training tiles of {_either(size, 'px')}, microns per pixel not recorded in "
                "the manifests")
    return f"training tiles of {_either(size, 'px')} at {_either(mpp, 'um/px')}"


def _readme(info: dict, out: str) -> str:
    if info["architecture"].get("family") == "omics":
        return _omics_readme(info, out)
    if info["architecture"].get("family") == "slide":
        return export_slide.readme(info, out)
    arch, prep, prov = info["architecture"], info["preprocessing"], info["provenance"]
    fmt = info["export"]["format"]
    head = (f"# cfm {arch['variant']} teacher backbone, step {prov['step']}\n\n"
            f"Exported by `python -m cfm.export` (cfm {prov['cfm_version']}) on "
            f"{prov['export_time_utc']} as `{fmt}`, {info['export']['dtype']} weights. "
            f"Width {arch['width']}, depth {arch['depth']}, {arch['heads']} heads, patch "
            f"{arch['patch']}, {arch['num_registers']} registers, LayerScale "
            f"{arch['layerscale'] or 'off'}, {arch['ffn']} FFN, {arch['img_size']} px input.\n\n"
            f"Input: RGB tiles resized to {prep['input_size_px']} px, scaled to [0, 1], "
            f"normalised with mean {prep['mean']} and std {prep['std']}; "
            f"{_training_tiles(prep, prov['data_manifest_note'])}. The embedding is the CLS "
            "token after the final norm.\n\n"
            "Everything else (full training config, data manifest sha256) is in config.json.\n\n")
    if fmt == "timm":
        call = timm_call(info["export"]["timm"], os.path.join(out, WEIGHTS_FILE))
        return head + (
            "## Load with timm (PyTorch)\n\n```python\n" + call + "\n"
            "features = model(images)  # [B, D]: CLS after the final norm; images NCHW\n```\n\n"
            "`pretrained_cfg_overlay` sets timm's data config (mean, std, input size), so "
            "`timm.data.resolve_data_config({}, model=model)` gives the preprocessing above. "
            "Inputs larger than the training size give cfm's outputs too (both resample the "
            "position embeddings bicubically); smaller ones differ slightly (timm anti-aliases "
            "the downsampled position embeddings, cfm does not).\n")
    return head + (
        "## Load in JAX (cfm)\n\n```python\nimport cfm\n"
        f"model, params = cfm.load_pretrained({out!r})\n"
        "features = model.apply({'params': params}, images)['cls']  # images NHWC\n```\n")


def _write(tmp: str, info: dict, params: dict, out: str, extras: dict | None = None) -> None:
    fmt, dtype = info["export"]["format"], info["export"]["dtype"]
    if extras:  # a slide encoder's projections and omics encoder: safetensors in any format
        save_file(_cast(flatten(extras), dtype),
                  os.path.join(tmp, export_slide.ALIGN_FILE),
                  metadata={"format": "cfm"})
    if fmt == "orbax":
        with ocp.PyTreeCheckpointer() as ckptr:
            ckptr.save(os.path.join(tmp, ORBAX_DIR), _cast(params, dtype))
    else:
        flat = to_timm(params, info["architecture"]) if fmt == "timm" else flatten(params)
        save_file(_cast(flat, dtype), os.path.join(tmp, WEIGHTS_FILE),
                  metadata={"format": "pt" if fmt == "timm" else "cfm"})
    with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1, sort_keys=False)
        f.write("\n")
    with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
        f.write(_readme(info, out))
    root = info["provenance"]["training_config"].get("data", {}).get("path", "")
    for name in info["preprocessing"].get("files", []):  # omics: vocabulary and statistics
        if name == export_slide.ALIGN_FILE:
            continue
        shutil.copyfile(os.path.join(root, name), os.path.join(tmp, name))


def export(workdir: str, out: str, fmt: str, step: int | None = None, dtype: str = "float32",
           overwrite: bool = False) -> dict:
    """Write the released backbone of `workdir`'s latest (or `step`) checkpoint to `out` in
    `fmt` ("orbax", "safetensors", "timm") as float32 or bfloat16; returns config.json's dict.
    Nothing appears at `out` unless the whole export succeeds."""
    if fmt not in FORMATS or dtype not in DTYPES:
        raise ExportError(f"format {fmt!r} / dtype {dtype!r}: choose from {FORMATS} / {DTYPES}")
    out = os.path.abspath(out)
    if os.path.exists(out) and not overwrite and (not os.path.isdir(out) or os.listdir(out)):
        raise FileExistsError(f"--out {out} exists and is not empty; choose a new folder or "
                              "pass --overwrite")
    config, params, step = pretrained.read_checkpoint(workdir, step)
    slide = architecture(config["model"])["family"] == "slide"  # the align objective's
    extras = export_slide.align_extras(workdir, step) if slide else None
    return write_export(out, config, params, step, fmt, dtype, extras=extras)


def write_export(out: str, config: dict, params: dict, step: int, fmt: str = "safetensors",
                 dtype: str = "float32", provenance: dict | None = None,
                 extras: dict | None = None) -> dict:
    """Write backbone `params` (numpy, per-block layout) of a run whose training config is
    `config` (a dict) to `out` as an export (the config.json, README and, for omics, the files
    of config's data.path), with `provenance` added to config.json's; returns config.json's
    dict. Also used by cfm.federated's pretraining. Nothing appears at `out` unless the whole
    export succeeds; an existing `out` is replaced only then. `extras` (a slide
    encoder's heads and omics encoder, `export_slide.align_extras`) go to its ALIGN_FILE."""
    info = build_info(config, step, fmt, dtype)
    info["provenance"].update(provenance or {})
    with atomic_folder(out) as tmp:  # --overwrite: the old export stays until the new one is in
        _write(tmp, info, params, out, extras)
    return info


def main(argv: list[str] | None = None) -> int:
    ap = cli_help.parser("cfm.export", __doc__, "python -m cfm.export --workdir /tmp/cfm_run "
                         "--out /tmp/cfm_export --format safetensors")
    ap.add_argument("--workdir", required=True, help="a cfm.train --workdir")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ap.add_argument("--out", required=True, help="new folder for the export")
    ap.add_argument("--format", required=True, choices=FORMATS, help="weights file layout")
    ap.add_argument("--dtype", default="float32", choices=DTYPES, help="dtype of the weights")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = ap.parse_args(argv)
    info: dict = {}

    def run() -> None:
        errors.check_workdir(args.out, "--out")  # a file, /proc, read-only: refused now
        info.update(export(args.workdir, args.out, args.format, args.step, args.dtype,
                           args.overwrite))

    # SIGTERM / SIGINT: one line saying what --out holds, exit 143 / 130 (cfm.preemption)
    with preemption.stop_on_signals("cfm.export", preemption.folder_kept(args.out)):
        status = errors.run_cli("cfm.export", run, {FileNotFoundError: "", FileExistsError: "",
                                                    CheckpointError: "", ExportError: ""})
    if status:
        return status
    out = os.path.abspath(args.out)
    print(f"cfm.export: wrote the step-{info['provenance']['step']} backbone "
          f"({info['architecture']['variant']}, {args.format}, {args.dtype}) to {out}")
    if args.format == "timm":
        print("cfm.export: load it with\n" + timm_call(info["export"]["timm"],
                                                       os.path.join(out, WEIGHTS_FILE)))
    return 0


if __name__ == "__main__":
    preemption.exit_now(main())  # no interpreter teardown under XLA's threads
