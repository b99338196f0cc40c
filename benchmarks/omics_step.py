"""Throughput and compute efficiency of the masked-gene-modelling train step on this machine.

    python -m benchmarks.omics_step [--variant omics_base] [--tokens 2048] [--batch 8]

Issue 6's size: a 12-layer, 512-wide omics transformer (`omics_base`) on 2048 genes per sample.
Builds the real jitted step (`cfm.setup`, as cfm.train does; synthetic samples of exactly
`--tokens` tokens, one device), then prints samples/s and tokens/s over timed steps (after
compile and a warm-up step), XLA's cost-analysis FLOPs against the analytic count
(`cfm.flops.omics_step_flops`), and the model FLOP/s as a fraction of this machine's float32
matmul rate measured in the same run.
Last line: `samples_per_s=<x> tokens_per_s=<y> flops_ratio=<r> matmul_fraction=<z>`
(target, issue 19: matmul_fraction >= 0.5 for omics_base). Like train_step.py it re-executes
itself under jemalloc with retention when installed (`--allocator system` to opt out).
"""

from __future__ import annotations

import os
import pathlib
import sys

import jax

from benchmarks.train_step import (_reexec_with_jemalloc, compile_with_flops, matmul_rate,
                                   time_steps)
from cfm import cli_help, config_loader, flops, setup

ROOT = pathlib.Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    ap = cli_help.parser("benchmarks.omics_step", __doc__,
                         "python -m benchmarks.omics_step --variant omics_base --tokens 2048")
    ap.add_argument("--variant", default="omics_base", help="omics model variant")
    ap.add_argument("--tokens", type=int, default=2048, help="genes (tokens) per sample")
    ap.add_argument("--batch", type=int, default=8, help="samples per step")
    ap.add_argument("--steps", type=int, default=3, help="timed steps")
    ap.add_argument("--dtype", default="float32", help="compute dtype (config.model.dtype)")
    ap.add_argument("--allocator", choices=("auto", "system"), default="auto",
                    help="auto: re-run under jemalloc when it is installed (train_step.py)")
    args = ap.parse_args(argv)
    if args.allocator == "auto" and argv is None:
        _reexec_with_jemalloc(["-m", "benchmarks.omics_step"] + sys.argv[1:])
    allocator = "jemalloc" if "jemalloc" in os.environ.get("LD_PRELOAD", "") else "system malloc"
    c = config_loader.load_config(f"{ROOT}/configs/omics_mgm.py:demo", [
        f"--config.model.variant={args.variant}", f"--config.model.dtype={args.dtype}",
        f"--config.batch_size={args.batch}", f"--config.data.max_tokens={args.tokens}",
        "--config.mesh.data=1", f"--config.data.synthetic_genes={args.tokens}",
        "--config.data.synthetic_mutations=0", "--config.data.synthetic_cnv=0"])

    s = setup.setup(c, jax.devices()[:1])  # fills vocab_size/n_bins from the data
    c = s.config
    state = setup.create_state(s)
    batch = setup.global_batch(s, next(s.objective.batches(c, 0, 0, 1)))
    with jax.set_mesh(s.mesh):  # as cfm.train runs the step
        compiled, compile_s, xla = compile_with_flops(s.step, state, batch)
        state, out, step_s = time_steps(compiled, state, batch, args.steps)
    model = flops.omics_step_flops(c, args.tokens)["total"]
    peak = matmul_rate()
    print(f"variant {args.variant}, {args.tokens} tokens x batch {args.batch}, dtype "
          f"{args.dtype}, {jax.devices()[0].device_kind} x{os.cpu_count()} cores, {allocator}")
    print(f"compile {compile_s:.1f} s, step {step_s:.3f} s (median of {args.steps}), "
          f"loss {float(out['loss']):.4f}")
    print(f"analytic {model / 1e9:.1f} GFLOP, XLA {xla / 1e9:.1f} GFLOP; model FLOP/s "
          f"{model / step_s / 1e9:.1f} G, float32 matmul peak {peak / 1e9:.1f} G")
    print(f"samples_per_s={args.batch / step_s:.3f} "
          f"tokens_per_s={args.batch * args.tokens / step_s:.0f} flops_ratio={xla / model:.3f} "
          f"matmul_fraction={model / step_s / peak:.3f}")


if __name__ == "__main__":
    main()
