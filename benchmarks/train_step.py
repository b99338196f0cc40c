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
Last line: `images_per_s=<x> flops_ratio=<y> matmul_fraction=<z>`; on a GPU `mfu=<z>` instead
(model FLOP/s over the chip's dense bf16 peak, `GPU_BF16_PEAK`). With `--peer torch` the same
step in plain PyTorch (`benchmarks/torch_reference.py`: eager, SDPA attention, bf16 autocast
when `--dtype bfloat16`) runs first, in its own process, on the same shapes and masks, and the
line ends with `torch_images_per_s=<t> ratio=<x/t>` (target: >= 1.0 on CPU, >= 1.2 on GPU).

On CPU the step allocates gigabytes of activations per call; glibc returns them to the kernel and
page-faults them back every step (about 40% of the step time on 2 cores). With `--allocator auto`
(the default) the script re-executes itself under jemalloc with memory retention when
libjemalloc is installed (`apt-get install libjemalloc2`); the same two environment variables
speed up CPU training:
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 \
    MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile
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


# Dense bfloat16 tensor-core peak FLOP/s by device kind (NVIDIA data sheets, SXM parts;
# H100 PCIe 756 T). The MFU of the GPU step is model FLOP/s over this.
GPU_BF16_PEAK = {"H100 PCIe": 756e12, "H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}


def gpu_peak(kind: str) -> float | None:
    """The bf16 peak of a device kind string such as 'NVIDIA H100 80GB HBM3', None if unknown."""
    return next((v for k, v in GPU_BF16_PEAK.items() if k in kind), None)


def matmul_rate(n: int = 2048, reps: int = 8, dtype=jnp.float32) -> float:
    """FLOP/s of a large jitted matmul chain (the machine's practical peak for `dtype`)."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = (jax.random.normal(jax.random.key(1), (n, n), jnp.float32) / n ** 0.5).astype(dtype)

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


def _reexec_with_jemalloc(args: list[str] | None = None) -> None:
    """Replace this process by itself under jemalloc (retaining freed memory), if installed;
    `args`: the interpreter arguments that start it again (default: sys.argv)."""
    lib = next((p for p in JEMALLOC if os.path.exists(p)), None)
    if lib is None or "jemalloc" in os.environ.get("LD_PRELOAD", ""):
        return
    env = dict(os.environ, LD_PRELOAD=lib, MALLOC_CONF="dirty_decay_ms:-1,muzzy_decay_ms:-1")
    os.execve(sys.executable, [sys.executable] + (sys.argv if args is None else args), env)


def configure(variant: str, batch: int, local_crops: int, global_size: int, local_size: int,
              dtype: str = "float32", remat: bool = False, attention: str = "auto"):
    """DINOv2's defaults (the vit_l16 preset) resized to this benchmark's shapes, one device."""
    c = load_config("vit_l16")
    c.model.variant, c.model.dtype, c.model.remat = variant, dtype, remat
    c.model.attention = attention
    c.batch_size = batch
    c.crops.n_local, c.crops.global_size, c.crops.local_size = local_crops, global_size, local_size
    c.model.img_size = global_size
    c.mesh.data = 1
    return c


def synthetic_batch(c, seed: int = 0) -> dict[str, np.ndarray]:
    """Random uint8 crops and DINOv2 block masks of config `c`'s shapes (host numpy)."""
    b, g, n_loc, loc = c.batch_size, c.crops.global_size, c.crops.n_local, c.crops.local_size
    grid = g // vit.spec(c.model.variant).patch
    rng = np.random.default_rng(seed)
    masks = masking.sample_batch_masks(rng, 2 * b, (grid, grid), c.ibot.mask_sample_probability,
                                       c.ibot.mask_ratio_min_max, c.ibot.min_block_patches,
                                       c.ibot.min_aspect, c.ibot.max_mask_fraction)
    return {"global_crops": rng.integers(0, 256, (b, 2, g, g, 3), dtype=np.uint8),
            "local_crops": rng.integers(0, 256, (b, n_loc, loc, loc, 3), dtype=np.uint8),
            "masks": masks.reshape(b, 2, grid * grid)}


def run_torch_peer(c, local: dict[str, np.ndarray], steps: int) -> dict:
    """benchmarks/torch_reference.py on the same shapes and masks, in a child process (its own
    thread pool and GPU memory; the allocator environment is inherited), on CUDA when torch sees
    a GPU. Run it before JAX touches the GPU: JAX takes 75% of its memory when it starts."""
    s = vit.spec(c.model.variant)
    with tempfile.TemporaryDirectory() as tmp:
        masks = os.path.join(tmp, "masks.npy")
        np.save(masks, local["masks"].reshape(2 * c.batch_size, -1))
        cmd = [sys.executable, str(ROOT / "benchmarks" / "torch_reference.py"),
               "--spec", f"{s.width},{s.depth},{s.heads},{s.mlp_dim},{s.patch}",
               "--batch", str(c.batch_size), "--local-crops", str(c.crops.n_local),
               "--global-size", str(c.crops.global_size),
               "--local-size", str(c.crops.local_size), "--prototypes", str(c.head.n_prototypes),
               "--buffer", str(dinov2.buffer_size(c)), "--masks", masks, "--steps", str(steps),
               "--device", "auto",
               "--drop-path", str(c.model.drop_path_rate)]
        if c.model.dtype == "bfloat16":
            cmd.append("--bf16")
        res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"torch peer failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


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
    ap.add_argument("--attention", default="auto", help="config.model.attention: auto, "
                    "dot_product_attention, cudnn, xla or heads_major (cfm.models.ops)")
    ap.add_argument("--peer", choices=("none", "torch"), default="none",
                    help="torch: also time benchmarks/torch_reference.py, print the ratio")
    ap.add_argument("--allocator", choices=("auto", "system"), default="auto",
                    help="auto: re-run under jemalloc when it is installed (see above)")
    args = ap.parse_args()
    if args.allocator == "auto":
        _reexec_with_jemalloc()
    allocator = "jemalloc" if "jemalloc" in os.environ.get("LD_PRELOAD", "") else "system malloc"

    c = configure(args.variant, args.batch, args.local_crops, args.global_size, args.local_size,
                  args.dtype, args.remat, args.attention)
    local = synthetic_batch(c)
    peer = run_torch_peer(c, local, args.steps) if args.peer == "torch" else None
    gpu = jax.default_backend() == "gpu"

    s = setup.setup(c, jax.devices()[:1])  # the trainer's models, state layout and jitted step
    c = s.config
    buffer = dinov2.buffer_size(c)  # the step's masked-token buffer
    state = setup.create_state(s)
    batch = setup.global_batch(s, local)
    with jax.set_mesh(s.mesh):  # as cfm.train runs the step
        compiled, compile_s, xla_flops = compile_with_flops(s.step, state, batch)
        state, out, step_s = time_steps(compiled, state, batch, args.steps)
    model = flops.dino_step_flops(c, buffer)
    kind = jax.devices()[0].device_kind
    peak = matmul_rate(8192, 8, jnp.bfloat16) if gpu else matmul_rate()

    images_per_s = args.batch / step_s
    ratio = xla_flops / model["total"]
    achieved = model["total"] / step_s
    print(f"variant {args.variant}, batch {args.batch}, crops 2x{args.global_size} + "
          f"{args.local_crops}x{args.local_size}, dtype {args.dtype}, remat {args.remat}, "
          f"attention {c.model.attention}, {kind} x{os.cpu_count()} cores, {allocator}")
    print(f"compile {compile_s:.1f} s, step {step_s:.3f} s (median of {args.steps}), "
          f"loss {float(out['loss']):.4f}")
    for k, v in model.items():
        print(f"  analytic {k:<17} {v / 1e9:10.2f} GFLOP")
    print(f"  XLA cost analysis         {xla_flops / 1e9:10.2f} GFLOP")
    line = f"images_per_s={images_per_s:.2f} flops_ratio={ratio:.3f} "
    if gpu:
        bf16_peak = gpu_peak(kind) or float("nan")
        print(f"model FLOP/s {achieved / 1e12:.1f} T, bf16 matmul measured {peak / 1e12:.1f} T, "
              f"data-sheet bf16 peak {bf16_peak / 1e12:.1f} T")
        line += f"mfu={achieved / bf16_peak:.3f}"
    else:
        print(f"model FLOP/s {achieved / 1e9:.1f} G, float32 matmul peak {peak / 1e9:.1f} G")
        line += f"matmul_fraction={achieved / peak:.3f}"
    if peer is not None:
        print(f"torch {peer['torch']} on {peer['device']} ({peer['threads']} threads): step {peer['step_s']:.3f} s, "
              f"loss {peer['loss']:.4f}")
        line += (f" torch_images_per_s={peer['images_per_s']:.2f} "
                 f"ratio={images_per_s / peer['images_per_s']:.3f}")
    print(line)


if __name__ == "__main__":
    main()
