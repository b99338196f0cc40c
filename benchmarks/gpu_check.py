"""Loss and gradients of the DINOv2 step with one attention implementation against another.

    python benchmarks/gpu_check.py            # GPU: cuDNN flash vs XLA attention, bfloat16
    python benchmarks/gpu_check.py --quick    # any backend, tiny ViT (the CPU check)

On a GPU it computes the loss and the gradient of the real DINOv2 objective (`cfm.ssl.dinov2`,
the trainer's loss; same parameters, batch, masks and drop-path keys) three times: bfloat16 with
`model.attention=cudnn` (`jax.nn.dot_product_attention(..., implementation="cudnn")`), bfloat16
with `xla`, and float32 with `xla` as the reference. cuDNN passes when its loss and gradient
errors against float32 are at most 1.5x XLA-bf16's plus a small floor (bfloat16 itself is the
error budget; flash attention reorders sums, it must not add more). On CPU (no cuDNN) it checks
cfm's heads-major einsum against `xla` in float32, which must agree to 1e-4.
Last line: `loss_diff=<a> grad_rel_err=<b> ref_grad_rel_err=<c> ok=<0|1>`.
`benchmarks/gpu_run.sh` runs this and the ViT-L/16 step benchmark on the device machine.
"""

from __future__ import annotations

import pathlib
import sys

import flax.linen as nn
import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import train_step  # noqa: E402
from cfm import cli_help  # noqa: E402
from cfm import schedules, setup  # noqa: E402


def loss_and_grads(config, seed: int = 0) -> tuple[float, list[np.ndarray]]:
    """The DINOv2 loss and its gradient (flattened leaves, float32 numpy) at the initial state
    of `config` on one synthetic batch: what the trainer's step differentiates."""
    s = setup.setup(config, jax.devices()[:1])
    state = setup.create_state(s)
    batch = setup.global_batch(s, train_step.synthetic_batch(s.config, seed))
    c = s.config

    def f(state, batch):
        with nn.logical_axis_rules(s.rules):
            sched = dict(schedules.optimizer_schedules(c, state.step),
                         **s.objective.step_schedules(c, state.step))
            rng = jax.random.fold_in(state.rng, state.step)
            return jax.value_and_grad(lambda p: s.objective.loss(
                c, s.models, p, state, batch, sched, rng)[0])(state.params)

    with jax.set_mesh(s.mesh):
        loss, grads = jax.jit(f)(state, batch)
    return float(loss), [np.asarray(g, np.float32) for g in jax.tree.leaves(grads)]


def rel_err(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """||a - b|| / ||b|| over all gradient leaves together."""
    num = sum(float(np.sum((x - y) ** 2)) for x, y in zip(a, b))
    den = sum(float(np.sum(y ** 2)) for y in b)
    return (num / den) ** 0.5


def main() -> None:
    ap = cli_help.parser("benchmarks.gpu_check", __doc__,
                         "python -m benchmarks.gpu_check --quick")
    ap.add_argument("--quick", action="store_true", help="tiny ViT, float32: heads_major vs xla")
    ap.add_argument("--variant", default="vit_s16", help="ViT variant on a GPU")
    ap.add_argument("--batch", type=int, default=8, help="images per step on a GPU")
    args = ap.parse_args()
    gpu = jax.default_backend() == "gpu" and not args.quick
    if gpu:
        shape = (args.variant, args.batch, 4, 224, 96)
        runs = {"cudnn": ("bfloat16", "cudnn"), "xla": ("bfloat16", "xla"),
                "f32": ("float32", "xla")}
    else:
        shape = ("vit_test", 4, 2, 32, 16)
        runs = {"heads_major": ("float32", "heads_major"), "xla": ("float32", "xla")}
    out = {}
    for name, (dtype, impl) in runs.items():
        c = train_step.configure(*shape, dtype=dtype, attention=impl)
        c.head.n_prototypes = 4096 if gpu else 256
        out[name] = loss_and_grads(c)
        print(f"{name:12s} dtype {dtype:9s} attention {impl:12s} loss {out[name][0]:.6f}")
    if gpu:
        (l_c, g_c), (l_x, g_x), (l_f, g_f) = out["cudnn"], out["xla"], out["f32"]
        loss_diff, err, ref_err = abs(l_c - l_f), rel_err(g_c, g_f), rel_err(g_x, g_f)
        ok = loss_diff <= 1.5 * abs(l_x - l_f) + 1e-3 and err <= 1.5 * ref_err + 1e-3
        print(f"cuDNN vs XLA (both bf16): loss diff {abs(l_c - l_x):.2e}, "
              f"grad rel err {rel_err(g_c, g_x):.2e}")
    else:
        (l_c, g_c), (l_f, g_f) = out["heads_major"], out["xla"]
        loss_diff, err, ref_err = abs(l_c - l_f), rel_err(g_c, g_f), 0.0
        ok = loss_diff <= 1e-4 * abs(l_f) and err <= 1e-4
    print(f"{jax.devices()[0].device_kind}, {shape}")
    print(f"loss_diff={loss_diff:.3e} grad_rel_err={err:.3e} ref_grad_rel_err={ref_err:.3e} "
          f"ok={int(ok)}")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
