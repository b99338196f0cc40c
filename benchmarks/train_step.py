"""Throughput and compute efficiency of the DINOv2 train step on this machine.

    python benchmarks/train_step.py [--variant vit_s16] [--batch 32] [--local-crops 8]

Builds the real jitted step (DINOv2 defaults: 2x224 global + N x96 local crops, 65536
prototypes) on one device, then prints:
- images/s over timed steps (after compile and one warm-up step);
- XLA's cost-analysis FLOPs of the compiled step and the analytic model FLOPs
  (`cfm.flops`: student forward+backward on all crops, teacher forward on global crops, heads);
  their ratio should be <= 1.10 (no wasted compute; remat off);
- achieved model FLOP/s as a fraction of this machine's float32 matmul rate, measured in the
  same run with a large jitted matmul; target >= 0.5.
Last line: `images_per_s=<x> flops_ratio=<y> matmul_fraction=<z>`.

On CPU the step allocates gigabytes of activations per call; glibc returns them to the kernel and
page-faults them back every step (about 40% of the step time on 2 cores). With `--allocator auto`
(the default) the script re-executes itself under jemalloc with memory retention when
libjemalloc is installed (`apt-get install libjemalloc2`); the same two environment variables
speed up CPU training:
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 \
    MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1
"""

from __future__ import annotations

import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cfm import cli_help, config_loader, flops, setup  # noqa: E402
from cfm.data import masking  # noqa: E402
from cfm.models import vit  # noqa: E402
from cfm.ssl import dinov2  # noqa: E402


def load_config(arg: str, overrides: list[str] | tuple[str, ...] = ()):
    """configs/dino_vit.py:<arg> with `--config.key=value` overrides, as cfm.train reads it."""
    return config_loader.load_config(f"{ROOT}/configs/dino_vit.py:{arg}", overrides)


def matmul_rate(n: int = 2048, reps: int = 8) -> float:
    """float32 FLOP/s of a large jitted matmul chain (the machine's practical peak)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32) / n ** 0.5

    @jax.jit
    def chain(a):
        for _ in range(reps):
            a = a @ b
        return a

    chain(a).block_until_ready()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        chain(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 * reps / best


def compile_with_flops(step, state, batch):
    """(compiled step, compile seconds, XLA cost-analysis FLOPs of one call)."""
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return compiled, compile_s, float(cost["flops"])


def time_steps(compiled, state, batch, steps: int):
    """(state, last metrics, median seconds per step) over `steps` calls after one warm-up."""
    state, out = compiled(state, batch)
    jax.block_until_ready(out)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, out = compiled(state, batch)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t)
    return state, out, float(np.median(times))


JEMALLOC = [f"/usr/lib/{arch}-linux-gnu/libjemalloc.so.2" for arch in ("x86_64", "aarch64")]


def _reexec_with_jemalloc() -> None:
    """Replace this process by itself under jemalloc (retaining freed memory), if installed."""
    lib = next((p for p in JEMALLOC if os.path.exists(p)), None)
    if lib is None or "jemalloc" in os.environ.get("LD_PRELOAD", ""):
        return
    env = dict(os.environ, LD_PRELOAD=lib, MALLOC_CONF="dirty_decay_ms:-1,muzzy_decay_ms:-1")
    os.execve(sys.executable, [sys.executable] + sys.argv, env)


def main() -> None:
    ap = cli_help.parser("benchmarks.train_step", __doc__,
                         "python -m benchmarks.train_step --variant vit_s16 --batch 32")
    ap.add_argument("--variant", default="vit_s16", help="ViT variant (cfm.models.vit)")
    ap.add_argument("--batch", type=int, default=32, help="images per step")
    ap.add_argument("--local-crops", type=int, default=8, help="local crops per image")
    ap.add_argument("--global-size", type=int, default=224, help="global crop side in pixels")
    ap.add_argument("--local-size", type=int, default=96, help="local crop side in pixels")
    ap.add_argument("--steps", type=int, default=3, help="timed steps")
    ap.add_argument("--dtype", default="float32", help="compute dtype (config.model.dtype)")
    ap.add_argument("--remat", action="store_true", help="recompute each block's activations "
                    "in the backward pass (config.model.remat)")
    ap.add_argument("--allocator", choices=("auto", "system"), default="auto",
                    help="auto: re-run under jemalloc when it is installed (see above)")
    args = ap.parse_args()
    if args.allocator == "auto":
        _reexec_with_jemalloc()
    allocator = "jemalloc" if "jemalloc" in os.environ.get("LD_PRELOAD", "") else "system malloc"

    c = load_config("vit_l16")  # DINOv2 defaults, resized below
    c.model.variant = args.variant
    c.model.dtype = args.dtype
    c.model.remat = args.remat
    c.batch_size = args.batch
    c.crops.n_local = args.local_crops
    c.crops.global_size = args.global_size
    c.crops.local_size = args.local_size
    c.model.img_size = args.global_size
    c.mesh.data = 1
    patch = vit.spec(c.model.variant).patch
    grid = args.global_size // patch
    n_crops = 2 * args.batch

    s = setup.setup(c, jax.devices()[:1])  # the trainer's models, state layout and jitted step
    c = s.config
    buffer = dinov2.buffer_size(c)  # the step's masked-token buffer
    state = setup.create_state(s)
    rng = np.random.default_rng(0)
    masks = masking.sample_batch_masks(rng, n_crops, (grid, grid), c.ibot.mask_sample_probability,
                                       c.ibot.mask_ratio_min_max, c.ibot.min_block_patches,
                                       c.ibot.min_aspect, c.ibot.max_mask_fraction)
    local = {
        "global_crops": rng.integers(0, 256, (args.batch, 2, args.global_size, args.global_size,
                                              3), dtype=np.uint8),
        "local_crops": rng.integers(0, 256, (args.batch, args.local_crops, args.local_size,
                                             args.local_size, 3), dtype=np.uint8),
        "masks": masks.reshape(args.batch, 2, grid * grid),
    }
    batch = setup.global_batch(s, local)
    with jax.set_mesh(s.mesh):  # as cfm.train runs the step
        compiled, compile_s, xla_flops = compile_with_flops(s.step, state, batch)
        state, out, step_s = time_steps(compiled, state, batch, args.steps)
    model = flops.dino_step_flops(c, buffer)
    peak = matmul_rate()

    images_per_s = args.batch / step_s
    ratio = xla_flops / model["total"]
    fraction = model["total"] / step_s / peak
    print(f"variant {args.variant}, batch {args.batch}, crops 2x{args.global_size} + "
          f"{args.local_crops}x{args.local_size}, dtype {args.dtype}, remat {args.remat}, "
          f"{jax.devices()[0].device_kind} x{os.cpu_count()} cores, {allocator}")
    print(f"compile {compile_s:.1f} s, step {step_s:.3f} s (median of {args.steps}), "
          f"loss {float(out['loss']):.4f}")
    for k, v in model.items():
        print(f"  analytic {k:<17} {v / 1e9:10.2f} GFLOP")
    print(f"  XLA cost analysis         {xla_flops / 1e9:10.2f} GFLOP")
    print(f"model FLOP/s {model['total'] / step_s / 1e9:.1f} G, float32 matmul peak "
          f"{peak / 1e9:.1f} G")
    print(f"images_per_s={images_per_s:.2f} flops_ratio={ratio:.3f} matmul_fraction={fraction:.3f}")


if __name__ == "__main__":
    main()
