"""Throughput and compute efficiency of the masked-gene-modelling train step on this machine.

    python -m benchmarks.omics_step [--variant omics_base] [--tokens 2048] [--batch 8]

Issue 6's size: a 12-layer, 512-wide omics transformer (`omics_base`) on 2048 genes per sample.
Builds the real jitted step (cfm.train, synthetic samples of exactly `--tokens` tokens, one
device), then prints samples/s and tokens/s over timed steps (after compile and a warm-up
step), XLA's cost-analysis FLOPs against the analytic count (`cfm.flops.omics_step_flops`), and
the model FLOP/s as a fraction of this machine's float32 matmul rate measured in the same run.
Last line: `samples_per_s=<x> tokens_per_s=<y> flops_ratio=<r> matmul_fraction=<z>`.
"""

from __future__ import annotations

import argparse
import os

import jax

from benchmarks.train_step import compile_with_flops, matmul_rate, time_steps
from cfm import config_check, flops, train
from cfm.data import omics_pipeline
from cfm.parallel import mesh as mesh_lib


def main(argv: list[str] | None = None) -> None:
    import importlib.util
    import pathlib

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", default="omics_base")
    ap.add_argument("--tokens", type=int, default=2048, help="genes (tokens) per sample")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3, help="timed steps")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args(argv)
    path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "omics_mgm.py"
    spec = importlib.util.spec_from_file_location("omics_mgm", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config("demo")
    c.model.variant, c.model.dtype = args.variant, args.dtype
    c.batch_size, c.data.max_tokens, c.mesh.data = args.batch, args.tokens, 1
    c.data.synthetic_genes, c.data.synthetic_mutations, c.data.synthetic_cnv = args.tokens, 0, 0
    c = config_check.validate_mgm(c)

    mesh = mesh_lib.make_mesh(c.mesh, jax.devices()[:1])
    models = train.build_models(c)
    state, shardings, tx = train.create_state(c, models, mesh)
    local = next(omics_pipeline.make_train_iterator(c))
    step = train.jit_train_step(c, models, tx, 0, mesh, shardings,
                                {k: v.ndim for k, v in local.items()})
    batch = train.global_batch(local, mesh)
    compiled, compile_s, xla = compile_with_flops(step, state, batch)
    model = flops.omics_step_flops(c, args.tokens)["total"]
    state, out, step_s = time_steps(compiled, state, batch, args.steps)
    peak = matmul_rate()
    print(f"variant {args.variant}, {args.tokens} tokens x batch {args.batch}, dtype "
          f"{args.dtype}, {jax.devices()[0].device_kind} x{os.cpu_count()} cores")
    print(f"compile {compile_s:.1f} s, step {step_s:.3f} s (median of {args.steps}), "
          f"loss {float(out['loss']):.4f}")
    print(f"analytic {model / 1e9:.1f} GFLOP, XLA {xla / 1e9:.1f} GFLOP; model FLOP/s "
          f"{model / step_s / 1e9:.1f} G, float32 matmul peak {peak / 1e9:.1f} G")
    print(f"samples_per_s={args.batch / step_s:.3f} "
          f"tokens_per_s={args.batch * args.tokens / step_s:.0f} flops_ratio={xla / model:.3f} "
          f"matmul_fraction={model / step_s / peak:.3f}")


if __name__ == "__main__":
    main()
