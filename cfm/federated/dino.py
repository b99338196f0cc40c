"""Federated continued DINOv2 pretraining (`model.kind = "dino"`): each site holds a folder of
tiles, no label is read, and the federation continues the self-supervised pretraining of a ViT
export (`model.init_from`) on every site's tiles without pooling them.

- `init_params`: the SSL state of cfm.train (`cfm.setup`, the objective of `cfm.ssl.dinov2`)
  for the export's training config, student and teacher backbones filled from the export by
  `cfm.init_from.apply_init_from`; the DINO / iBOT heads start fresh (seed `config.seed`, the
  same on every machine), or come from a cfm.train workdir's checkpoint with its teacher.
- `ssl_config`: that training config with the federation's schedule: one "epoch" is a round
  of `train.local_steps` steps of `train.batch_size` images, `server.rounds` of them; lr
  `train.lr` (no batch-size scaling) after `train.warmup_rounds` rounds of warm-up; weight decay
  `train.weight_decay`; the teacher temperature held at `ssl.teacher_temp` (no warm-up: the
  run continues one); the teacher momentum follows its cosine over the federation's steps.
- `site_data`: `<data.path>/<site>/` as cfm.train reads it (`data.tile_source`: "shards", the
  ArrayRecord output of data_prep.tile_wsi, or "folder", image files such as
  data_prep.demo_tiles'). A fraction `data.holdout` of the tiles (whole batches of
  `train.batch_size`, a seeded draw) is held out with fixed crops and fixed iBOT masks.
- `local_update`: `train.local_steps` steps of cfm.setup's jitted DINOv2 step (the step
  cfm.train runs) on the site's training tiles through cfm.data.pipeline, from global step
  (round - 1) * local_steps; the teacher's EMA and the centers update locally as in cfm.train;
  the optimiser state starts fresh every round (as the site optimisers of cfm.federated.model).
- Aggregation: FedAvg over the whole SSL state except the optimiser state: the student, the
  EMA teacher and the softmax centers (the server's weighted mean of the sites' states). One
  consistent choice: averaging the student only would leave each site's teacher to drift from
  the global student. Zhuang et al. 2022 (ICLR, "Divergence-aware Federated Self-Supervised
  Learning", FedEMA) compare which of the online and target networks to share in federated
  BYOL-style SSL; this module shares both.
- `heldout_loss`: what a site answers to the server's `evaluate` messages: the DINOv2 loss of
  the global state on its held-out tiles (total, DINO and iBOT terms), and their number;
  nothing else (no tile or slide name) leaves the site.
- `write_export`: the global teacher backbone (DINOv2 releases the teacher) as an export
  (cfm.export's writer, `pretrain.export_backbone`) that cfm.embed and cfm.load_pretrained read.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import sys
import types
from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cfm import init_from, run_config, setup
from cfm.checkpoint import CheckpointError
from cfm.config_check import ConfigError
from cfm.data import pipeline, sources
from cfm.data.augment import MultiCrop
from cfm.federated import pretrain
from cfm.federated.sites import FederatedError
from cfm.finetune.fusion_train import prng_key
from cfm.models import vit
from cfm.ssl import dinov2

EVAL_SEED = pretrain.EVAL_SEED  # the held-out crops, masks and drop-path key: fixed each round
TERMS = ("loss", "dino", "ibot")


class Run(NamedTuple):
    path: str  # the export folder or cfm.train workdir (absolute)
    training_config: dict  # its training config (written into the final export)
    step: int  # its training step
    setup: setup.Setup  # cfm.setup of `ssl_config` on one device


def is_dino_kind(config: ml_collections.ConfigDict) -> bool:
    """Whether the federation continues DINOv2 pretraining (model.kind = "dino")."""
    return config.model.kind == "dino"


def check_init_from(config: ml_collections.ConfigDict) -> str:
    """`model.init_from`, after a check that reads no weights: FederatedError (one line) when
    it is unset, missing, neither an export nor a workdir, or not a ViT."""
    path = config.model.get("init_from", "")
    if not path:
        raise FederatedError("config.model.init_from is empty: model.kind=dino continues the "
                             "DINOv2 pretraining of a ViT export; set --config.model.init_from="
                             "EXPORT (python -m cfm.export --format safetensors) or a cfm.train "
                             "workdir")
    pretrain.model_spec(path, "vit", "DINOv2 continues a ViT export (configs/dino_vit.py)")
    return path


def ssl_config(config: ml_collections.ConfigDict, training_config: dict
               ) -> ml_collections.ConfigDict:
    """The cfm.train config of the sites' local steps (module docstring): the init model's
    training config with the federation's batch, schedule and one-device mesh."""
    c = run_config.add_run_keys(ml_collections.ConfigDict())  # run keys an older export lacks
    _overlay(c, training_config)
    t = config.train
    c.seed, c.batch_size = int(config.seed), int(t.batch_size)
    c.steps_per_epoch, c.epochs, c.total_steps = int(t.local_steps), int(config.server.rounds), -1
    c.optim.base_lr, c.optim.lr_scaling = float(t.lr), "none"
    c.optim.warmup_epochs = int(t.warmup_rounds)
    c.optim.weight_decay = c.optim.weight_decay_end = float(t.weight_decay)
    c.optim.freeze_last_layer_epochs = 0
    c.ssl.warmup_teacher_temp_epochs = 0
    c.mesh.data = c.mesh.fsdp = c.mesh.tensor = c.mesh.slices = 1
    c.data.source = "synthetic"  # unread: the sites pass their tiles (`local_update`)
    c.data.worker_count, c.data.prefetch = 0, 1
    c.init_from = ""
    return c


def _overlay(c: ml_collections.ConfigDict, values: dict) -> None:
    """Set `values` (nested dicts) into `c`, keeping c's keys that `values` lacks."""
    for k, v in values.items():
        if isinstance(v, dict) and isinstance(c.get(k), ml_collections.ConfigDict):
            _overlay(c[k], v)
        else:
            c[k] = copy.deepcopy(v)


@functools.lru_cache(maxsize=4)
def _run(spec: str) -> Run:
    config = ml_collections.ConfigDict(json.loads(spec))
    path = check_init_from(config)
    full, ms = pretrain.model_spec(path, "vit", "")
    if not ms.config:
        raise FederatedError(f"config.model.init_from={path!r}: its config.json carries no "
                             "training config (DINOv2's heads and crops); export it with "
                             "python -m cfm.export")
    try:
        if ms.kind == "export":
            with open(os.path.join(full, "config.json"), encoding="utf-8") as fh:
                step = json.load(fh)["provenance"]["step"]
        else:
            step = init_from.read_source(full).step
        s = setup.setup(ssl_config(config, ms.config), jax.devices()[:1])
    except (CheckpointError, ConfigError, KeyError, OSError) as e:
        raise FederatedError(f"config.model.init_from={path!r}: {e}") from None
    return Run(full, ms.config, int(step), s)


def run(config: ml_collections.ConfigDict) -> Run:
    """The init model and the one-device cfm.setup of its continued pretraining (cached)."""
    return _run(json.dumps(config.to_dict(), sort_keys=True))


def fingerprint(config: ml_collections.ConfigDict) -> str:
    """What fixes the SSL state's shapes and the objective (architecture, heads, crops, SSL
    terms) as canonical JSON; no path (it differs between machines)."""
    c = run(config).setup.config
    return json.dumps({"kind": "dino", "model": c.model.to_dict(), "head": c.head.to_dict(),
                       "ibot": c.ibot.to_dict(), "ssl": c.ssl.to_dict(),
                       "crops": c.crops.to_dict()}, sort_keys=True)


def _numpy(tree):
    return jax.tree.map(np.asarray, tree)


def init_params(config: ml_collections.ConfigDict) -> dict:
    """Round-0 SSL state {student, teacher, centers} (numpy): cfm.setup's fresh state (heads
    of seed config.seed) with the export's backbone in student and teacher (a workdir: its
    student, teacher and heads), as `python -m cfm.train --config.init_from` starts."""
    if config.server.strategy == "fedprox":
        raise FederatedError("config.server.strategy=fedprox: model.kind=dino has no FedProx "
                             "term; use fedavg or fedadam")
    r = run(config)
    with jax.set_mesh(r.setup.mesh), nn.logical_axis_rules(r.setup.rules):  # as create_state,
        state = jax.jit(r.setup.init, out_shardings=r.setup.shardings)(  # an rbg key (faster
            prng_key(int(config.seed)))  # compiles, cfm.finetune.fusion_train.prng_key)
    try:
        state, _ = init_from.apply_init_from(state, r.setup.config, r.path)
    except init_from.InitFromError as e:
        raise FederatedError(str(e)) from None
    return {"student": _numpy(state.params), "teacher": _numpy(state.teacher),
            "centers": _numpy(state.centers)}


# ============================================================================ the site ========
class Subset:
    """Tiles `indices` of an image source (grain reads it like a source)."""

    def __init__(self, source, indices: np.ndarray):
        self.source, self.indices = source, np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.source[int(self.indices[int(i)])]


@dataclasses.dataclass
class DinoSite:
    """One site's tiles; they (and their names) never leave the site."""

    name: str
    n: int  # training tiles (FedAvg's weight)
    train: Subset
    heldout: list  # held-out batches of train.batch_size tiles, fixed crops and masks
    n_heldout: int


def _heldout(cfg: ml_collections.ConfigDict, images: list[np.ndarray]) -> list[dict]:
    """Fixed DINOv2 batches of `images` (crops seeded by EVAL_SEED and the tile's position,
    masks by the batch's), `cfg.batch_size` tiles each, as cfm.data.pipeline makes them."""
    aug = pipeline._Augment(MultiCrop(cfg.crops, cfg.augment), EVAL_SEED)
    masks = pipeline._AttachMasks(cfg, pipeline._grid(cfg, vit.spec(cfg.model.variant).patch), 1)
    crops = [aug(i, img) for i, img in enumerate(images)]
    b = int(cfg.batch_size)
    return [masks(j, {k: np.stack([c[k] for c in crops[j * b:(j + 1) * b]]) for k in crops[0]})
            for j in range(len(images) // b)]


@functools.lru_cache(maxsize=8)
def _site(spec: str, site: str) -> DinoSite:
    config = ml_collections.ConfigDict(json.loads(spec))
    cfg = run(config).setup.config
    folder = os.path.join(config.data.path, site)
    data = ml_collections.ConfigDict({"source": config.data.tile_source, "path": folder})
    try:
        sources.check_source(data)
        src = sources.make_source(data, int(config.seed))
    except (OSError, ValueError) as e:
        raise FederatedError(f"site {site!r} has no data: {e}") from None
    n, b = len(src), int(cfg.batch_size)
    k = b * max(1, round(float(config.data.holdout) * n / b))  # whole held-out batches
    if n < k + b:
        raise FederatedError(f"site {site!r} has no data: {n} tiles, fewer than its {k} "
                             f"held-out tiles plus one batch of train.batch_size={b}")
    order = np.random.default_rng([int(config.seed), EVAL_SEED]).permutation(n)
    held = _heldout(cfg, [src[int(i)] for i in np.sort(order[:k])])
    return DinoSite(site, n - k, Subset(src, np.sort(order[k:])), held, k)


def site_data(config: ml_collections.ConfigDict, site: str) -> DinoSite:
    """Site `site`'s tiles split into training tiles and fixed held-out batches; cached."""
    return _site(json.dumps(config.to_dict(), sort_keys=True), site)


# ============================================================================ local steps =====
def _state(s: setup.Setup, params: dict, step: int, seed: int) -> setup.TrainState:
    """A TrainState at global `step` holding `params`, a fresh optimiser state, on s's mesh."""
    state = setup.TrainState(step=jnp.asarray(step, jnp.int32), params=params["student"],
                             teacher=params["teacher"], opt_state=s.tx.init(params["student"]),
                             centers=params["centers"], rng=prng_key(seed))
    return jax.device_put(state, s.shardings)


def local_update(config: ml_collections.ConfigDict, params: dict, site: DinoSite, mu: float,
                 seed: int, r: int = 1) -> tuple[dict, float]:
    """`train.local_steps` DINOv2 steps of round `r` from the global SSL state `params` on the
    site's training tiles: (new state, the last step's loss)."""
    s = run(config).setup
    start = (int(r) - 1) * int(config.train.local_steps)
    state = _state(s, params, start, seed)
    batches = pipeline.make_train_iterator(s.config, patch_size=vit.spec(
        s.config.model.variant).patch, start_step=start, source=site.train)
    value = float("nan")
    with jax.set_mesh(s.mesh):
        for _ in range(int(config.train.local_steps)):
            state, metrics = s.step(state, setup.global_batch(s, next(batches)))
            value = float(metrics["loss"])
    return ({"student": _numpy(state.params), "teacher": _numpy(state.teacher),
             "centers": _numpy(state.centers)}, value)


@functools.lru_cache(maxsize=4)
def _eval_fn(spec: str) -> Callable:
    s = run(ml_collections.ConfigDict(json.loads(spec))).setup
    sched = dinov2.step_schedules(s.config, 0)  # the teacher temperature: ssl.teacher_temp

    @jax.jit
    def fn(params, batch):
        with nn.logical_axis_rules(s.rules):
            st = types.SimpleNamespace(teacher=params["teacher"], centers=params["centers"])
            _, aux = s.objective.loss(s.config, s.models, params["student"], st, batch, sched,
                                      prng_key(EVAL_SEED))
        return {k: aux["metrics"][k] for k in TERMS}

    return fn


def heldout_loss(config: ml_collections.ConfigDict, params: dict, site: DinoSite) -> dict:
    """DINOv2 loss of the SSL state `params` on the site's held-out batches (fixed crops,
    masks and drop-path key): the total and its DINO and iBOT terms, means over the batches."""
    fn = _eval_fn(json.dumps(config.to_dict(), sort_keys=True))
    got = [fn(params, b) for b in site.heldout]
    return {k: float(np.mean([float(g[k]) for g in got])) for k in TERMS}


def client_log(site: str, r: int, losses: dict) -> None:
    """The site's own log line of its held-out losses (its name stays on the site)."""
    print(f"cfm.federated site {site}: round {r}: held-out DINOv2 loss {losses['loss']:.4f} "
          f"(DINO {losses['dino']:.4f}, iBOT {losses['ibot']:.4f})", file=sys.stderr,
          flush=True)


# ============================================================================ server side =====
def write_export(config: ml_collections.ConfigDict, params: dict, workdir: str, rounds: int,
                 log: Callable[[str], None] = print) -> str:
    """`workdir/export`: the global teacher backbone as a ViT export; its path."""
    r = run(config)
    return pretrain.export_backbone(config, workdir, r.training_config,
                                    params["teacher"]["backbone"], r.path,
                                    r.step + rounds * int(config.train.local_steps), rounds, log)
