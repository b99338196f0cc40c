"""Probes on frozen tile embeddings: a linear head (`train_linear`, `predict_linear`) and
weighted k-nearest neighbours (`knn_predict`); cfm.finetune.tile and cfm.finetune.tme use them.

- linear (kaiko-ai eva's patch-level protocol; e.g. eva's
  `configs/vision/pathology/offline/classification/crc.yaml` and `bach.yaml`): the encoder is
  frozen, a linear head on the CLS embeddings is trained with cross-entropy, SGD with momentum
  0.9 and no weight decay (`optimizer="adamw"` for AdamW instead), batch 256, a cosine
  schedule to 0 over at most 12500 steps, validation accuracy checked every epoch, early
  stopping after `patience` epochs without improvement and the best checkpoint kept; one
  departure: features are z-scored with the training part's statistics (`standardize`, folded
  into the head afterwards), which tiny encoders' low-spread features need;
- kNN: weighted k-nearest neighbours on L2-normalised embeddings (Wu et al. 2018; the DINO
  evaluation, Caron et al. 2021: k = 20, weights exp(cos / 0.07)).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cfm.finetune.common import FinetuneError

MIN_CHECK_STEPS = 25


# ============================================================================ heads ===========
class LinearHead(nn.Module):
    """Linear classifier on [B, D] features (logical axes embed -> vocab)."""

    n_classes: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(self.n_classes, kernel_init=nn.with_logical_partitioning(
            nn.initializers.zeros, ("embed", "vocab")), bias_init=nn.with_logical_partitioning(
            nn.initializers.zeros, ("vocab",)), name="linear")(x)


def make_optimizer(name: str, lr: float, steps: int, weight_decay: float, warmup: int = 0
                   ) -> optax.GradientTransformation:
    """SGD with momentum 0.9 (eva) or AdamW over a cosine schedule to 0 in `steps` steps, after
    `warmup` linear warm-up steps; `weight_decay` is L2 (sgd) or decoupled (adamw)."""
    if warmup > 0:
        schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1))
    else:
        schedule = optax.cosine_decay_schedule(lr, max(steps, 1))
    if name == "sgd":
        return optax.chain(optax.add_decayed_weights(weight_decay),
                           optax.sgd(schedule, momentum=0.9))
    if name == "adamw":
        return optax.adamw(schedule, weight_decay=weight_decay)
    raise FinetuneError(f"config.optimizer={name!r}: choose 'sgd' (eva) or 'adamw'")


# ============================================================================ linear probe ====
def train_linear(x_tr: np.ndarray, y_tr: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                 n_classes: int, lr: float = 0.01, optimizer: str = "sgd", max_steps: int = 12500,
                 batch_size: int = 256, patience: int = 24, weight_decay: float = 0.0,
                 seed: int = 0, standardize: bool = True) -> tuple[dict, dict]:
    """Linear head on frozen features with early stopping on validation accuracy; returns
    (best params, history dict). Batches are drawn at random (with replacement); validation
    accuracy is checked every max(ceil(n_train / batch), MIN_CHECK_STEPS) steps, and training
    stops after `patience` checks without improvement (the best parameters are kept).

    `standardize` z-scores the features with the training part's mean and std while training
    and folds that affine map into the returned head (W / std, b - (mean / std) W), so the head
    applies to raw features. The optimum is the same; only the conditioning changes, which
    matters for features with a large common offset and small spread (tiny encoders: std
    ~0.02 per dimension around a norm of ~6), where SGD barely moves in eva's step budget."""
    mu = x_tr.mean(0) if standardize else np.zeros(x_tr.shape[1], np.float32)
    sd = x_tr.std(0) if standardize else np.ones(x_tr.shape[1], np.float32)
    sd = np.where(sd > 0, sd, 1.0).astype(np.float32)
    x_tr, x_val = (x_tr - mu) / sd, (x_val - mu) / sd
    head = LinearHead(n_classes)
    tx = make_optimizer(optimizer, lr, max_steps, weight_decay)

    @jax.jit
    def init(key):  # one compile instead of one per initialiser op
        p = nn.meta.unbox(head.init(key, jnp.zeros((1, x_tr.shape[1])))["params"])
        return p, tx.init(p)

    params, opt_state = init(jax.random.key(seed))
    x_tr_j, y_tr_j = jnp.asarray(x_tr), jnp.asarray(y_tr)  # arguments, not jit constants
    batch = min(batch_size, len(x_tr))
    # One check of the validation accuracy per epoch, but at least every MIN_CHECK_STEPS steps
    # apart: with a few hundred tiles an epoch is 1-2 steps, and eva's patience (24 checks on
    # CRC's 25-step epochs, 400 on BACH's 2-step ones) is meant as ~600-800 steps.
    epoch = max(MIN_CHECK_STEPS, -(-len(x_tr) // batch))

    def loss_fn(p, xb, yb):
        logits = head.apply({"params": p}, xb)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    @jax.jit
    def run_epoch(p, s, xs, ys, key):
        def step(carry, k):
            p, s = carry
            idx = jax.random.randint(k, (batch,), 0, xs.shape[0])
            loss, g = jax.value_and_grad(loss_fn)(p, xs[idx], ys[idx])
            upd, s = tx.update(g, s, p)
            return (optax.apply_updates(p, upd), s), loss
        (p, s), losses = jax.lax.scan(step, (p, s), jax.random.split(key, epoch))
        return p, s, losses.mean()

    predict = jax.jit(lambda p, x: head.apply({"params": p}, x).argmax(-1))
    key = jax.random.key(seed + 1)
    best, best_acc, bad, history = params, -1.0, 0, []
    for e in range(max(1, max_steps // epoch)):
        key, sub = jax.random.split(key)
        params, opt_state, loss = run_epoch(params, opt_state, x_tr_j, y_tr_j, sub)
        acc = float((np.asarray(predict(params, x_val)) == y_val).mean())
        history.append((float(loss), acc))
        if acc > best_acc:
            best, best_acc, bad = params, acc, 0
        else:
            bad += 1
            if bad >= patience:
                break
    best = jax.tree.map(np.asarray, best)
    w = best["linear"]["kernel"] / sd[:, None]
    best = {"linear": {"kernel": w, "bias": best["linear"]["bias"] - (mu / sd) @ best["linear"][
        "kernel"]}}
    return best, {"epochs": len(history), "steps": len(history) * epoch,
                  "best_val_accuracy": best_acc, "final_train_loss": history[-1][0]}


def predict_linear(params: dict, x: np.ndarray) -> np.ndarray:
    """Class probabilities [N, C] of a linear head."""
    w, b = (np.asarray(params["linear"][k], np.float64) for k in ("kernel", "bias"))
    logits = np.asarray(x, np.float64) @ w + b  # numpy: no compile for a matmul
    e = np.exp(logits - logits.max(1, keepdims=True))
    return (e / e.sum(1, keepdims=True)).astype(np.float32)


# ============================================================================ kNN =============
def knn_predict(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, n_classes: int,
                k: int = 20, temperature: float = 0.07) -> np.ndarray:
    """Weighted kNN class probabilities [N, C] (cosine similarity, weights exp(sim / T))."""
    def norm(a):
        a = np.asarray(a, np.float32)
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

    sim = norm(x_test) @ norm(x_train).T
    k = min(k, len(x_train))
    top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    w = np.exp(np.take_along_axis(sim, top, 1) / temperature)
    votes = np.zeros((len(x_test), n_classes))
    np.add.at(votes, (np.arange(len(x_test))[:, None], y_train[top]), w)
    return votes / votes.sum(1, keepdims=True)
