"""The training engine of the fusion tasks: jitted init / step / score / integrated-gradient
functions compiled once per model and head (`compiled`), full-batch AdamW training of one
FusionModel with early stopping on an inner stratified validation split (`Trainer`), and the
ensemble's integrated gradients over the test patients (`attribute`).

Row sets are padded to a few bucket sizes (`pad_bucket`; padding rows get weight 0), so every
split, ensemble member and cohort of similar size reuses the same executables: compiling
dominates the run time of these small models on CPU otherwise.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cfm.explain import attributions
from cfm.finetune.encoder_tune import encoder_optimizer
from cfm.finetune.fusion_data import device_batch
from cfm.finetune.losses import explain_fn, loss_fn, score_fn
from cfm.models.fusion import FusionModel

_COMPILED: dict = {}


def prng_key(seed: int) -> jax.Array:
    """A typed key of the `rbg` PRNG: XLA's RngBitGenerator compiles about 4x faster on CPU than
    the default threefry (whose hash is unrolled into every parameter's initializer and dropout
    mask), which dominates the run time of these small models."""
    return jax.random.key(seed, impl="rbg")


def compiled(model: FusionModel, head: str, lr: float, wd: float, alpha: float,
             tune: tuple | None = None) -> dict:
    """The jitted init / train step / validation loss / score / IG functions of one model and
    head, built once per process: every split, member and cohort with the same shapes reuses
    the same executables (compiling dominates the run time on CPU otherwise). `tune`: a
    tuned omics encoder's layer-wise lr spec (cfm.finetune.encoder_tune.tune_spec)."""
    key = (model, head, lr, wd, alpha, tune)
    if key in _COMPILED:
        return _COMPILED[key]
    tx = encoder_optimizer(lr, wd, tune)

    def loss(params, batch, tg, w, rng, train):
        out = model.apply({"params": params}, batch, train=train, rngs={"dropout": rng})
        return loss_fn(head, out, tg, w, alpha)

    @jax.jit
    def init(rng, batch, backbone=None):
        params = model.init({"params": rng, "dropout": rng}, batch)["params"]
        if backbone is not None:  # a pretrained encoder replaces its random init
            params = dict(params, backbone=backbone)
        return params, tx.init(params)

    @jax.jit
    def step(params, opt_state, batch, tg, w, rng):
        val, grads = jax.value_and_grad(loss)(params, batch, tg, w, rng, True)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, val

    @jax.jit
    def evaluate(params, batch, tg, w):
        return loss(params, batch, tg, w, prng_key(0), False)

    @jax.jit
    def score(params, batch):
        return score_fn(head, model.apply({"params": params}, batch))

    def explained(stacked, batch):  # ensemble mean of the explained scalar, [B]
        outs = jax.vmap(lambda p: explain_fn(head, model.apply({"params": p}, batch)))(stacked)
        return outs.mean(0)

    @functools.partial(jax.jit, static_argnames=("steps",))
    def ig(stacked, batch, keys_base, steps):
        """Integrated gradients over the inputs named in keys_base (dict of baselines)."""
        fixed = {k: v for k, v in batch.items() if k not in keys_base}
        f = lambda inp: explained(stacked, dict(fixed, **inp))  # noqa: E731
        x = {k: batch[k] for k in keys_base}
        attr = attributions.integrated_gradients_fn(f, x, keys_base, steps)
        return attr, f(x) - f(keys_base)  # attributions, f(x) - f(baseline) per patient

    fns = {"init": init, "step": step, "evaluate": evaluate, "score": score, "ig": ig}
    _COMPILED[key] = fns
    return fns


def pad_bucket(n: int) -> int:
    """Padded row count: 32, 64, 128, then multiples of 128. Few distinct shapes (so cohorts and
    cancer types of similar size share compiled steps) without padding 21 patients to 264."""
    for b in (32, 64, 128):
        if n <= b:
            return b
    return -(-n // 128) * 128


def pad_rows(rows: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(`rows` padded to `n` by repeating the first, weights: 1 on real rows, 0 on padding)."""
    w = np.zeros(n, np.float32)
    w[:len(rows)] = 1.0
    return np.concatenate([rows, np.full(n - len(rows), rows[0])]).astype(np.int64), w


class Trainer:
    """Full-batch AdamW training of one FusionModel with early stopping on an inner validation
    split. Row sets are padded to `n_pad` rows (weight 0) so all splits share one compile.
    For an EncoderFusion model, `backbone` holds the pretrained encoder's params (each member
    starts from them) and `tune` its layer-wise lr spec (cfm.finetune.encoder_tune)."""

    def __init__(self, model: FusionModel, head: str, config: ml_collections.ConfigDict,
                 tgt: dict, feats: dict, n_pad: int, backbone: dict | None = None,
                 tune: tuple | None = None):
        self.model, self.head, self.config, self.tgt, self.feats = model, head, config, tgt, feats
        self.n_pad, self.backbone = n_pad, backbone
        alpha = float(config.survival.alpha) if head == "nll" else 0.0
        self.fns = compiled(model, head, float(config.train.lr),
                            float(config.train.weight_decay), alpha, tune)

    def _rows(self, rows: np.ndarray, class_weights: bool):
        idx, w = pad_rows(rows, self.n_pad)
        if class_weights and self.head in ("binary", "multiclass"):
            y = np.asarray(self.tgt["y"])[rows].astype(int)
            counts = np.bincount(y, minlength=int(y.max()) + 1).astype(np.float32)
            cw = len(y) / (np.count_nonzero(counts) * np.maximum(counts, 1))
            w[:len(rows)] *= cw[y]
        batch = device_batch(self.feats, idx)
        tg = {k: v[idx] for k, v in self.tgt.items()}
        return batch, tg, jnp.asarray(w)

    def fit(self, train: np.ndarray, strata: np.ndarray, seed: int) -> tuple[dict, dict]:
        """Train on `train` rows minus an inner validation split; returns (best params, log)."""
        tc = self.config.train
        rng = np.random.default_rng(seed)
        val_parts = []
        for s in np.unique(strata[train]):
            members = rng.permutation(train[strata[train] == s])
            n_val = int(round(tc.val_fraction * len(members)))
            val_parts.append(members[:min(n_val, len(members) - 1)])
        val = np.sort(np.concatenate(val_parts))
        fit = np.setdiff1d(train, val)
        fb, ft, fw = self._rows(fit, True)
        vb, vt, vw = self._rows(val if len(val) else fit, True)
        key = prng_key(seed)
        params, opt_state = self.fns["init"](key, fb, self.backbone)
        best, best_loss, best_epoch, bad = params, np.inf, 0, 0
        for epoch in range(tc.max_epochs):
            params, opt_state, _ = self.fns["step"](params, opt_state, fb, ft, fw,
                                                    jax.random.fold_in(key, epoch + 1))
            v = float(self.fns["evaluate"](params, vb, vt, vw))
            if epoch + 1 < tc.min_epochs:  # the first epochs only warm up: no stopping
                continue
            if v < best_loss - 1e-4:
                best, best_loss, best_epoch, bad = params, v, epoch + 1, 0
            else:
                bad += 1
                if bad >= tc.patience:
                    break
        return best, {"best_epoch": best_epoch, "val_loss": best_loss, "n_fit": len(fit),
                      "n_val": len(val)}

    def scores(self, params: dict, rows: np.ndarray) -> np.ndarray:
        """The head's evaluated scores (`score_fn`) of `rows` under `params`."""
        idx, _ = pad_rows(rows, self.n_pad)
        return np.asarray(self.fns["score"](params, device_batch(self.feats, idx)))[:len(rows)]


def attribute(trainer: Trainer, params_list: list, feats: dict, rows: np.ndarray,
              n_pad: int, config: ml_collections.ConfigDict) -> dict:
    """IG of the ensemble-mean explained output (logit / risk) over omics features and clinical
    values of the test patients; baseline = the training mean (0 after standardising)."""
    keys = [k for k in ("omics", "clinical") if k in feats]
    idx, _ = pad_rows(rows, n_pad)
    batch = device_batch(trainer.feats, idx)
    stacked = jax.tree_util.tree_map(lambda *p: jnp.stack(p), *params_list)
    base = {k: jnp.zeros_like(batch[k]) for k in keys}
    ig, delta = trainer.fns["ig"](stacked, batch, base, steps=int(config.explain.ig_steps))
    n = len(rows)
    ig = {k: np.asarray(v)[:n] for k, v in ig.items()}
    gap = sum(v.reshape(n, -1).sum(1) for v in ig.values()) - np.asarray(delta)[:n]
    return {"rows": rows, "ig": ig, "values": {k: feats[k][rows] for k in keys}, "gap": gap,
            "names": {"omics": feats.get("omics_names", []),
                      "clinical": feats.get("clinical_names", [])},
            "kinds": feats.get("omics_kinds", [])}
