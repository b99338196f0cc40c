"""Federated continued masked-gene-modelling pretraining (`model.kind = "mgm"`): each site holds
an omics table, no label is read, and the federation continues the pretraining of an omics
export (`model.init_from`) on every site's patients without pooling them.

- `source`: the export (`cfm.pretrained.read_export`), its training config (which builds the
  backbone and MGM head of `cfm.ssl.mgm`) and the folder of its vocab.tsv / stats.json. An
  export carries the backbone only (cfm.export releases no head), so the head starts fresh
  (seed `config.seed`), the same on every machine; a cfm.train workdir (its latest checkpoint,
  `cfm.init_from.read_checkpoint_params`) gives its trained head too.
- `site_data`: the site's table `<data.path>/<data.table with {site}>` prepared in a temporary
  folder by `data_prep.prepare_omics` with the export's vocabulary (`--vocab`,
  `--drop-unknown-genes`: gene ids the export knows, other genes dropped) and normalisation
  (transform, clip, std floor, bins; per-gene z-scores fitted on the site's own training
  patients, as cfm.compat intends for a new cohort), checked by `cfm.compat.check_omics`.
  Patients are split by prepare_omics's hash of the patient id: a fraction `data.holdout` is
  held out (the same patients a central prepare_omics run with val + test fractions summing to
  `data.holdout` holds out), the rest train.
- `local_update`: `train.local_steps` steps of cfm.ssl.mgm's jitted objective on mini-batches
  of `train.batch_size` training patients (each a random token subset as cfm's omics pipeline
  draws them), the site optimiser and FedProx term of cfm.federated.model.
- `evaluate_round`: the server's `evaluate` messages; each site replies with the mean masked
  loss of the global model on its held-out patients (fixed masks: the same tokens every round)
  and their number, nothing else (no site name: the server logs losses by node id, each site's
  log names itself).
- `write_export`: the final backbone as an export (cfm.export's writer) that cfm.finetune,
  cfm.embed and cfm.load_pretrained read like a cfm.train export.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import os
import sys
import tempfile
from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from cfm import compat, export, init_from, pretrained
from cfm.checkpoint import CheckpointError
from cfm.data.omics_pipeline import pad_sample
from cfm.data.omics_records import PAD_ID
from cfm.federated import model as fmodel
from cfm.federated.sites import FederatedError
from cfm.finetune.fusion_train import prng_key
from cfm.omics_embed import read_samples
from cfm.ssl import mgm
from data_prep import prepare_omics

BUCKET = 128  # token lengths are padded to a multiple of this (few compiled shapes)
ROWS = 32  # held-out batches are padded to a multiple of this many rows (all-padding rows)
EVAL_SEED = 0x5E7  # the held-out masks' key: the same tokens hidden every round


class Source(NamedTuple):
    path: str  # the export folder or cfm.train workdir (absolute)
    ref: str  # the folder of its vocab.tsv and stats.json (an export: itself)
    arch: dict  # cfm.models.backbone.architecture()
    training_config: dict  # its training config: model, mgm, data.max_tokens
    step: int  # its training step
    backbone: dict  # backbone parameters (numpy)
    head: dict | None  # MGM head parameters of a workdir's checkpoint; None for an export
    mgm_config: ml_collections.ConfigDict  # training_config as a ConfigDict
    models: mgm.Models  # backbone and MGM head modules of that config


def is_mgm_kind(config: ml_collections.ConfigDict) -> bool:
    """Whether the federation pretrains (model.kind = "mgm") rather than fine-tunes."""
    return config.model.kind == "mgm"


def model_spec(path: str, family: str, hint: str) -> tuple[str, compat.ModelSpec]:
    """(absolute path, its cfm.compat spec) of `model.init_from`, a `family` export or
    cfm.train workdir; FederatedError (one line, ending in `hint` for another family) otherwise.
    Reads no weights and starts no JAX backend (so `python -m cfm.federated` checks before it
    forks)."""
    where = f"config.model.init_from={path!r}"
    full = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(full):
        raise FederatedError(f"{where}: {full} does not exist")
    try:
        spec = compat.model_spec(full)
    except (CheckpointError, FileNotFoundError) as e:
        raise FederatedError(f"{where}: {e}; export the run with python -m cfm.export "
                             "--format safetensors") from None
    got = spec.arch.get("family", "vit")
    if got != family:
        raise FederatedError(f"{where}: a {got} {spec.kind}; {hint}")
    return full, spec


def _spec(path: str) -> tuple[str, compat.ModelSpec, str]:
    """(absolute path, its cfm.compat spec, the folder of its vocab.tsv and stats.json)."""
    full, spec = model_spec(path, "omics", "masked gene modelling continues an omics export "
                            "(configs/omics_mgm.py)")
    ref, why = compat.omics_reference(spec)
    if ref is None:
        raise FederatedError(f"config.model.init_from={path!r}: {why}; its sites' genes cannot "
                             "be mapped")
    return full, spec, ref


@functools.lru_cache(maxsize=4)
def _source(path: str) -> Source:
    where = f"config.model.init_from={path!r}"
    full, spec, ref = _spec(path)
    try:
        if spec.kind == "export":
            info, backbone = pretrained.read_export(full)
            tc, step, head = (info["provenance"]["training_config"],
                              info["provenance"]["step"], None)
        else:
            tc, params, _, step = init_from.read_checkpoint_params(full)
            backbone, head = params["backbone"], params.get("mgm_head")
    except (CheckpointError, KeyError) as e:
        raise FederatedError(f"{where}: {e}") from None
    cfg = ml_collections.ConfigDict(tc)
    return Source(full, ref, spec.arch, tc, int(step), backbone, head, cfg,
                  mgm.OBJECTIVE.build_models(cfg))


def check_init_from(config: ml_collections.ConfigDict) -> str:
    """`model.init_from`, after a check that reads no weights: FederatedError (one line) when
    it is unset, missing, neither an export nor a workdir, not an omics model or without its
    vocabulary."""
    path = config.model.get("init_from", "")
    if not path:
        raise FederatedError("config.model.init_from is empty: model.kind=mgm continues the "
                             "pretraining of an omics export; set --config.model.init_from="
                             "EXPORT (python -m cfm.export --format safetensors)")
    _spec(path)
    return path


def source(config: ml_collections.ConfigDict) -> Source:
    """The export (or cfm.train workdir) of `model.init_from` with its weights (cached);
    FederatedError as `check_init_from` says, or for unreadable weights."""
    return _source(check_init_from(config))


def fingerprint(config: ml_collections.ConfigDict) -> str:
    """What fixes the parameters (architecture, vocabulary, MGM head) as canonical JSON."""
    src = source(config)
    with open(os.path.join(src.ref, "vocab.tsv"), "rb") as fh:
        vocab = hashlib.sha256(fh.read()).hexdigest()
    return json.dumps({"kind": "mgm", "architecture": src.arch,
                       "vocab_sha256": vocab, "mgm": src.mgm_config.mgm.to_dict()},
                      sort_keys=True)


def init_params(config: ml_collections.ConfigDict) -> dict:
    """Round-0 parameters {backbone: the export's, mgm_head: a workdir's or fresh (seed
    config.seed)}."""
    src = source(config)
    params = jax.jit(lambda key: mgm.OBJECTIVE.init_params(src.mgm_config, src.models, key))(
        prng_key(int(config.seed)))  # one compile, not one per initializer
    head = jax.tree.map(np.asarray, nn.meta.unbox(params["mgm_head"]))
    if src.head is not None:
        shapes = lambda t: {k: np.shape(v) for k, v in fmodel.flatten(t).items()}  # noqa: E731
        if shapes(src.head) != shapes(head):
            raise FederatedError(f"config.model.init_from={src.path!r}: its MGM head does not "
                                 "fit its own model config")
        head = jax.tree.map(np.asarray, src.head)
    return {"backbone": jax.tree.map(np.asarray, src.backbone), "mgm_head": head}


# ============================================================================ the site ========
@dataclasses.dataclass
class MGMSite:
    """One site's patients as token arrays; they never leave the site."""

    name: str
    n: int  # training patients (FedAvg's weight)
    train: list  # token arrays (cfm.data.omics_records) of the training patients
    heldout: dict | None  # [n_heldout, L] padded held-out batch, None without held-out patients
    n_heldout: int
    length: int  # tokens per training sample (the site's longest, bucketed, <= max_tokens)


def _length(samples: list, max_tokens: int) -> int:
    longest = max(len(s["gene_ids"]) for s in samples)
    return min(int(max_tokens), -(-longest // BUCKET) * BUCKET)


def _stack(samples: list, length: int, rng: np.random.Generator, shuffle: bool,
           rows: int = 0) -> dict:
    """[max(len(samples), rows), length] token batch; rows past the samples are all padding
    (no token, so nothing of theirs is masked or enters a loss)."""
    padded = [pad_sample(s, length, rng, shuffle) for s in samples]
    out = {k: np.stack([p[k] for p in padded]) for k in padded[0]}
    extra = max(0, rows - len(samples))
    return {k: np.concatenate([v, np.full((extra, length), PAD_ID if k == "gene_ids" else 0,
                                          v.dtype)]) for k, v in out.items()}


def _prepare(config: ml_collections.ConfigDict, site: str, table: str, out: str) -> None:
    src, d = source(config), config.data
    with open(os.path.join(src.ref, "stats.json"), encoding="utf-8") as fh:
        stats = json.load(fh)
    e = stats["expression"]
    argv = ["--input", table, "--out", out, "--vocab", os.path.join(src.ref, "vocab.tsv"),
            "--drop-unknown-genes", "--clip", str(e["clip"]), "--std-floor", str(e["std_floor"]),
            "--n-bins", str(stats["n_bins"]), "--val-fraction", "0",
            "--test-fraction", str(d.holdout), "--seed", str(int(config.seed))]
    transform = d.get("expression_transform", "") or e.get("transform")
    if transform == "per-input":
        raise FederatedError(f"model.init_from={src.path!r} normalised each pretraining source "
                             "on its own (a pan-cohort export): set "
                             "--config.data.expression_transform to the sites' tables' "
                             "transform (signed_log1p for the TCGA tables)")
    argv += ["--expression-transform", transform] if transform else []
    argv += ["--patient-column", d.patient_column] if d.patient_column else []
    if prepare_omics.main(argv) != 0:
        raise FederatedError(f"site {site!r}: data_prep.prepare_omics cannot map {table} onto "
                             f"the vocabulary of {src.path} (its message is above)")
    try:
        compat.check_omics(compat.model_spec(src.path), out)
    except (compat.CompatError, ValueError, OSError) as e:
        raise FederatedError(f"site {site!r}: {e}") from None


@functools.lru_cache(maxsize=8)
def _site(spec: str, site: str) -> MGMSite:
    config = ml_collections.ConfigDict(json.loads(spec))
    d = config.data
    table = os.path.join(d.path, d.table.format(site=site))
    if not os.path.isfile(table):
        raise FederatedError(f"site {site!r} has no data: {table} does not exist")
    with tempfile.TemporaryDirectory(prefix="cfm-mgm-site-") as tmp:
        out = os.path.join(tmp, "prepared")
        _prepare(config, site, table, out)
        _, train = read_samples(out, ("train",))
        _, held = read_samples(out, ("test",))
    if not train:
        raise FederatedError(f"site {site!r} has no data: no training patient in {table} "
                             f"(data.holdout={d.holdout})")
    max_tokens = int(source(config).mgm_config.data.max_tokens)
    shuffle = source(config).mgm_config.model.get("attend_tokens", 0) > 0
    batch = (_stack(held, _length(held, max_tokens), np.random.default_rng([EVAL_SEED]),
                    shuffle, -(-len(held) // ROWS) * ROWS) if held else None)
    return MGMSite(site, len(train), train, batch, len(held), _length(train, max_tokens))


def site_data(config: ml_collections.ConfigDict, site: str) -> MGMSite:
    """Site `site`'s patients mapped onto the export's vocabulary (module docstring); cached."""
    return _site(json.dumps(config.to_dict(), sort_keys=True), site)


# ============================================================================ local steps =====
_FNS: dict = {}


def _fns(config: ml_collections.ConfigDict) -> dict:
    key = (source(config).path, json.dumps(config.train.to_dict(), sort_keys=True))
    if key in _FNS:
        return _FNS[key]
    src = source(config)
    cfg, models, tx = src.mgm_config, src.models, fmodel.local_optimizer(config)

    def loss(params, glob, batch, rng, mu):
        total, aux = mgm.objective(cfg, models.backbone, models.mgm_head, params, batch, rng)
        return total + 0.5 * mu * fmodel.proximal(params, glob), aux["metrics"]["loss"]

    @jax.jit
    def step(params, opt, glob, batch, rng, mu):
        (_, value), g = jax.value_and_grad(loss, has_aux=True)(params, glob, batch, rng, mu)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, value

    @jax.jit
    def heldout(params, batch):
        _, aux = mgm.objective(cfg, models.backbone, models.mgm_head, params, batch,
                               prng_key(EVAL_SEED))
        return aux["metrics"]

    _FNS[key] = {"step": step, "init": jax.jit(tx.init), "heldout": heldout}
    return _FNS[key]


def local_update(config: ml_collections.ConfigDict, params: dict, site: MGMSite, mu: float,
                 seed: int) -> tuple[dict, float]:
    """`train.local_steps` masked-gene steps from `params` on the site's training patients:
    (new params, the last step's masked loss)."""
    fns, rng = _fns(config), np.random.default_rng([seed, 0x3E6])
    shuffle = source(config).mgm_config.model.get("attend_tokens", 0) > 0
    glob = jax.tree.map(np.asarray, params)
    p, opt, value = glob, fns["init"](glob), 0.0
    for i in range(int(config.train.local_steps)):
        idx = rng.choice(site.n, int(config.train.batch_size), replace=site.n < int(
            config.train.batch_size))
        batch = _stack([site.train[j] for j in idx], site.length, rng, shuffle)
        p, opt, value = fns["step"](p, opt, glob, batch, jax.random.fold_in(prng_key(seed), i),
                                    np.float32(mu))
    return jax.tree.map(np.asarray, p), float(value)


def heldout_loss(config: ml_collections.ConfigDict, params: dict, site: MGMSite) -> dict:
    """Masked-gene losses of `params` on the site's held-out patients (fixed masks): total
    and per modality (mean over the masked tokens), as floats."""
    out = _fns(config)["heldout"](params, site.heldout)
    return {k: float(out[k]) for k in ("loss", "expression", "mutation", "cnv")}


# ============================================================================ server side =====
def evaluate_round(grid: Grid, nodes: list[int], params: dict, model: str, r: int,
                  timeout_s: float, keys: tuple[str, ...] = ("heldout_loss",)) -> dict:
    """Send the global `params` to every site (`evaluate` messages); for each metric `key` the
    sites reply with, the history fields {key: {node: value}, key_mean: weighted by held-out
    examples} (model.kind=mgm: the masked loss; data.source=tiles: cfm.federated.tiles)."""
    arrays = fmodel.to_record(params)
    msgs = [Message(RecordDict({"arrays": arrays, "config": ConfigRecord(
        {"server-round": r, "model": model})}), dst_node_id=n, message_type="evaluate",
        group_id=f"eval-{r}") for n in nodes]
    got = {}
    for x in grid.send_and_receive(msgs, timeout=timeout_s):
        if x.has_error():
            raise FederatedError(f"round {r}: a site failed to evaluate: {x.error.reason}")
        m = x.content["metrics"]
        if m["num-examples"]:
            got[str(x.metadata.src_node_id)] = ({k: float(m[k]) for k in keys},
                                                m["num-examples"])
    if not got:
        return {}
    n = sum(k for _, k in got.values())
    out = {}
    for key in keys:
        out[key] = {node: round(v[key], 6) for node, (v, _) in sorted(got.items())}
        out[f"{key}_mean"] = round(sum(v[key] * k for v, k in got.values()) / n, 6)
    return out


def export_backbone(config: ml_collections.ConfigDict, workdir: str, training_config: dict,
                    backbone: dict, init_path: str, step: int, rounds: int,
                    log: Callable[[str], None] = print, note: str = "") -> str:
    """`workdir/export`: `backbone` (numpy) as an export like cfm.export's (its writer; format
    `server.export_format`) of a run whose training config is `training_config`, with the
    federation in its provenance; its path. Shared by model.kind mgm and dino."""
    out = os.path.join(workdir, "export")
    fed = {"init_from": init_path, "rounds": int(rounds), "sites": config.data.sites,
           "strategy": config.server.strategy, "local_steps": int(config.train.local_steps),
           "batch_size": int(config.train.batch_size)}
    export.write_export(out, training_config, backbone, step, config.server.export_format,
                        provenance={"federated": dict(fed, **({"note": note} if note else {}))})
    log(f"cfm.federated server: wrote the backbone as an export to {out}")
    return out


def write_export(config: ml_collections.ConfigDict, params: dict, workdir: str, rounds: int,
                 log: Callable[[str], None] = print) -> str:
    """`workdir/export`: the global backbone as an export (`export_backbone`), carrying the
    init export's vocab.tsv / stats.json; its path."""
    src = source(config)
    tc = copy.deepcopy(src.training_config)
    tc["data"]["path"] = src.ref  # where vocab.tsv, stats.json, manifest.json are copied from
    return export_backbone(config, workdir, tc, params["backbone"], src.path,
                           src.step + rounds * int(config.train.local_steps), rounds, log,
                           "training_config.data.path is where the vocab.tsv and stats.json "
                           "this export carries came from")


def client_log(site: str, r: int, losses: dict) -> None:
    """The site's own log line of its held-out losses (its name stays on the site)."""
    print(f"cfm.federated site {site}: round {r}: held-out masked loss {losses['loss']:.4f} "
          f"(expression {losses['expression']:.4f})", file=sys.stderr, flush=True)
