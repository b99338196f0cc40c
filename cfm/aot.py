r"""Will it fit? Ahead-of-time compile of the real train step for a TPU slice, without TPUs.

    python -m cfm.aot --config configs/dino_vit.py:vit_g14 --topology v5p:4x4x4 \
        [--config.key=value ...] [--json PATH]
    python -m cfm.aot --config configs/omics_mgm.py:test --topology cpu:8

`--topology` is `<generation>:<chips per dimension>` (v4:2x2x1, v5e:16x16, v5p:4x4x4,
v6e:8x8; needs libtpu: `pip install -e ".[tpu]"`) or `cpu:N` (N forced host CPU devices, no
libtpu; memory figures only; the catalogue is `cfm.parallel.topology`). The step is
`cfm.train`'s own, for any objective: `cfm.setup.setup` builds the models, the state's shapes
and shardings (allocating nothing) and the jitted step, which is lowered with the mesh of
`config.mesh` on the topology's compile-only devices, the state and the objective's batch as
sharded ShapeDtypeStructs. Prints
per-chip memory from XLA's buffer assignment against the chip's HBM, XLA's FLOPs, an estimated
step time and the MFU it implies; `--json` writes the same figures. Bad input exits with
status 2.

Step-time model (a roofline, per chip): max(XLA FLOPs / peak bf16 FLOP/s, XLA bytes accessed /
HBM bandwidth). It ignores collectives (assumes they overlap with compute) and kernel
inefficiency, so the estimated MFU is an upper bound of what the slice can reach. With
`model.scan_layers` XLA counts one layer per scanned loop, and the estimate falls back to the
analytic FLOPs (a compute-bound ceiling; see `_estimate`).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from typing import Any

import numpy as np

from cfm import errors
from cfm.parallel.topology import (CHIPS, EXAMPLES, GiB, Topology, TopologyError,
                                   parse_topology, prepare_environment, topology_devices)


class AotError(Exception):
    """Bad input (topology, mesh, batch, config, missing libtpu): exit status 2."""


def _bytes(shape, dtype) -> int:
    """Bytes of an array; a PRNG key (not a numpy dtype) is two uint32 words."""
    try:
        return math.prod(shape) * np.dtype(dtype).itemsize
    except TypeError:
        return math.prod(shape) * 8


def compile_step(config, topo: Topology) -> dict[str, Any]:
    """Compile the train step of `config`'s objective for `topo` and return its figures
    (bytes, FLOPs, seconds)."""
    # JAX reads XLA_FLAGS when first imported: cfm.setup (and jax) only after
    # prepare_environment, which main runs first.
    import jax

    from cfm import config_check, setup

    if topo.platform == "tpu" and config.model.attention == "auto":
        # "auto" follows the runtime's backend, which is CPU here; the TPU path is this one.
        config.model.attention = "dot_product_attention"
    try:
        devices = topology_devices(topo)
    except TopologyError as e:
        raise AotError(str(e)) from None
    try:
        s = setup.setup(config, devices)
    except config_check.ConfigError as e:
        if str(e).startswith("config.mesh:"):
            raise AotError(f"config.mesh does not fit --topology={topo.name} ({len(devices)} "
                           f"chips): {str(e)[len('config.mesh: '):]}") from None
        if str(e).startswith("config.batch_size="):
            raise AotError(str(e)) from None
        raise AotError(f"bad config: {e}") from None
    config, mesh, shardings = s.config, s.mesh, s.shardings
    shapes = s.abstract_state
    state, batch = setup.abstract_state(s), setup.abstract_batch(s)
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        lowered = s.step.lower(state, batch)
        try:
            compiled, oom = lowered.compile(), None
        except Exception as e:  # noqa: BLE001 - XLA:TPU refuses programs over HBM
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            compiled, oom = None, str(e)
    compile_s = time.perf_counter() - t0

    dev0 = mesh.devices.flat[0]

    def on_dev0(trees, shardings_) -> tuple[int, int]:  # (bytes on device 0, bytes in all)
        pairs = list(zip(jax.tree.leaves(trees), jax.tree.leaves(shardings_)))
        return (sum(_bytes(sh.shard_shape(x.shape), x.dtype) for x, sh in pairs
                    if dev0 in sh.device_set),
                sum(_bytes(x.shape, x.dtype) for x, _ in pairs))

    dev0_state, total_state = on_dev0((shapes.params, shapes.teacher, shapes.opt_state),
                                      (shardings.params, shardings.teacher,
                                       shardings.opt_state))
    arguments = on_dev0((state, batch), (shardings, {k: v.sharding for k, v in batch.items()}))
    memory = _memory(compiled, oom, arguments[0])
    cost = {} if compiled is None else compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost

    parts = s.objective.flops(config)
    model_flops = parts["total"]
    report: dict[str, Any] = {
        "topology": topo.name, "platform": topo.platform, "generation": topo.generation,
        "n_chips": len(devices), "device_kind": devices[0].device_kind,
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "variant": config.model.variant, "batch_size": int(config.batch_size),
        "dtype": config.model.dtype, "remat": bool(config.model.remat),
        "scan_layers": bool(config.model.get("scan_layers", False)),
        "attention": config.model.attention,
        "compile_s": compile_s, "compile_error": oom.splitlines()[0] if oom else None,
        "memory_bytes": memory,
        "state_bytes": {"per_chip": dev0_state, "total": total_state,
                        "total_over_chips": total_state / len(devices)},
        # XLA's cost analysis is of the SPMD-partitioned module, i.e. of one chip's program
        # (checked: a matmul split 4 ways reports a quarter of its FLOPs).
        "xla_flops_per_chip": float(cost["flops"]) if "flops" in cost else None,
        "xla_bytes_accessed_per_chip": float(cost["bytes accessed"])
        if "bytes accessed" in cost else None,
        "xla_optimal_seconds": float(cost["optimal_seconds"]) if "optimal_seconds" in cost
        else None,
        "model_flops_per_step": model_flops,
        "objective": s.objective.name,
        "model_flops_backbone": parts["backbone"],
        # scan: XLA's FLOPs and bytes count each scanned layer loop's body once (see _estimate)
        "xla_cost_counts_scan_body_once": bool(config.model.get("scan_layers", False)),
    }
    report.update(_estimate(report, topo, len(devices)))
    report.update(_fits(report))
    return report


def _fits(r: dict[str, Any]) -> dict[str, Any]:
    """Bytes one chip needs and whether it fits. XLA:TPU refuses a program whose buffers do not
    fit in HBM, and one it accepts may have temporaries larger than HBM (ViT-g/14 on v5p: 130
    GiB of temporaries, accepted with a 93 GiB heap peak): on TPU the figure is the heap peak of
    an accepted program, or the requirement in XLA's refusal. CPU devices are held to the
    host's RAM / N with the sum of the buffers."""
    m = r["memory_bytes"]
    if r["platform"] == "tpu":
        need = m["peak"] if r["compile_error"] is None and m["peak"] else m["total"]
        return {"need_bytes": need, "fits": r["compile_error"] is None}
    return {"need_bytes": m["total"], "fits": m["total"] <= r["hbm_bytes"]}


def _size(text: str) -> float:
    """'101.35G' / '530.00M' / '0B' (XLA's units, powers of 1024) -> bytes."""
    scale = {"B": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
    return float(text[:-1]) * scale[text[-1]]


def _memory(compiled, oom: str | None, argument_bytes: int) -> dict[str, Any]:
    """Per-chip bytes from XLA's buffer assignment; from the error message when over HBM."""
    if compiled is not None:
        mem = compiled.memory_analysis()
        m: dict[str, Any] = {k: int(getattr(mem, f"{k}_size_in_bytes")) for k in
                             ("argument", "output", "alias", "temp", "generated_code")}
        # Donated state buffers are both arguments and outputs: count them once.
        m["total"] = (m["argument"] + m["output"] - m["alias"] + m["temp"]
                      + m["generated_code"])
        m["peak"] = int(getattr(mem, "peak_memory_in_bytes", 0))
        return m
    # XLA:TPU stops at buffer assignment; its message gives the temporaries or the total.
    num = r"([0-9.]+[BKMGT])"
    temp = re.search(rf"HLO temporaries \({num}\)", oom)
    total = re.search(rf"Total hbm usage >= {num}", oom)
    used = re.search(rf"Used {num} of", oom)
    m = {"argument": argument_bytes, "output": None, "alias": None, "generated_code": None,
         "temp": _size(temp.group(1)) if temp else None, "peak": None}
    if total or used:
        m["total"] = _size((total or used).group(1))
    else:
        m["total"] = argument_bytes + (m["temp"] or 0)
    return m


def _estimate(r: dict[str, Any], topo: Topology, n_chips: int) -> dict[str, Any]:
    """HBM, peak and the roofline step time / MFU (None where there is nothing to estimate).

    With `model.scan_layers` XLA's cost analysis counts each scanned loop body once, not once
    per layer (HloCostAnalysis does not multiply while-loop bodies by their trip count; a
    10-step scan of a matmul reports one matmul), so its FLOPs and bytes are far too low. Then
    the compute time comes from the analytic FLOPs instead (plus one more student-backbone
    forward under remat), the HBM time from bytes that miss all layers but one, and the MFU is
    a ceiling (`est_source` says which)."""
    none = dict(peak_flops_per_chip=None, hbm_bandwidth=None, est_compute_s=None,
                est_memory_s=None, est_step_s=None, est_mfu=None, xla_optimal_mfu=None,
                est_source=None)
    if topo.platform == "cpu":  # CPU devices share the host's memory; no peak to speak of
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return dict(none, hbm_bytes=host / n_chips)
    chip = CHIPS[topo.generation]
    out = dict(none, hbm_bytes=chip.hbm_bytes, peak_flops_per_chip=chip.peak_flops,
               hbm_bandwidth=chip.hbm_bw)
    if r["xla_flops_per_chip"] is None:
        return out
    ideal = n_chips * chip.peak_flops
    if r["scan_layers"]:
        work = r["model_flops_per_step"] + (r["model_flops_backbone"] / 3
                                            if r["remat"] else 0.0)
        compute_s = work / ideal
        # bytes of one layer per loop: a lower bound of the HBM time, as compute_s is of
        # the compute time, so their max still bounds the step time from below
        memory_s = (r["xla_bytes_accessed_per_chip"] or 0.0) / chip.hbm_bw
        source = "analytic FLOPs, XLA bytes of one layer per scan loop (ceiling)"
    else:
        compute_s = r["xla_flops_per_chip"] / chip.peak_flops
        memory_s = (r["xla_bytes_accessed_per_chip"] or 0.0) / chip.hbm_bw
        source = "XLA FLOPs and bytes"
    step_s = max(compute_s, memory_s)
    out.update(est_compute_s=compute_s, est_memory_s=memory_s, est_step_s=step_s,
               est_mfu=r["model_flops_per_step"] / (ideal * step_s), est_source=source)
    if r["xla_optimal_seconds"] and r["xla_optimal_seconds"] > 0 and not r["scan_layers"]:
        out["xla_optimal_mfu"] = r["model_flops_per_step"] / (ideal * r["xla_optimal_seconds"])
    return out


def _fmt(b: float | None) -> str:
    if b is None:
        return "        ?    "
    return f"{b / GiB:9.2f} GiB" if b >= GiB / 10 else f"{b / 2 ** 20:9.2f} MiB"


def _flop(x: float) -> str:
    return f"{x / 1e12:9.3f} TFLOP" if x >= 1e11 else f"{x / 1e9:9.3f} GFLOP"


def format_report(r: dict[str, Any]) -> str:
    """A readable table of one report."""
    m, g, s = r["memory_bytes"], _fmt, r["state_bytes"]
    mem_name = "HBM per chip" if r["platform"] == "tpu" else "host RAM / devices"
    verdict = "fits" if r["fits"] else "DOES NOT FIT"
    lines = [
        f"cfm.aot: {r['variant']}, batch {r['batch_size']}, {r['dtype']}, remat {r['remat']}, "
        f"scan {r['scan_layers']}, attention {r['attention']}",
        f"  topology {r['topology']}: {r['n_chips']} x {r['device_kind']}, mesh {r['mesh']}, "
        f"compiled in {r['compile_s']:.1f} s",
        "  per-chip memory (XLA buffer assignment)",
        f"    arguments          {g(m['argument'])}",
        f"    outputs            {g(m['output'])}  ({g(m['alias']).strip()} of them aliased to "
        "donated arguments)",
        f"    temporaries        {g(m['temp'])}",
        f"    generated code     {g(m['generated_code'])}",
        f"    total              {g(m['total'])}  (sum of the above)",
        f"    heap peak          {g(m['peak'] or None)}  (XLA's heap simulation)",
        f"    needed             {g(r['need_bytes'])}  of {g(r['hbm_bytes']).strip()} {mem_name}: "
        f"{verdict}",
    ]
    if r["compile_error"]:
        lines.append(f"    XLA refused the program: {r['compile_error']}")
    lines.append(f"  params+teacher+Adam  {g(s['per_chip'])} on chip 0; {g(s['total']).strip()} "
                 f"in all / {r['n_chips']} chips = {g(s['total_over_chips']).strip()}")
    if r["xla_flops_per_chip"] is not None:
        once = " (scan: loop bodies counted once)" if r["xla_cost_counts_scan_body_once"] else ""
        lines.append(f"  XLA FLOPs per chip   {_flop(r['xla_flops_per_chip'])}; bytes "
                     f"accessed per chip {g(r['xla_bytes_accessed_per_chip']).strip()}{once}")
    lines.append(f"  model FLOPs per step {_flop(r['model_flops_per_step'])} "
                 "(cfm.flops, whole global batch)")
    if r["est_step_s"] is not None:
        how = (f"max(FLOPs/peak {r['est_compute_s']:.3f} s, bytes/HBM bandwidth "
               f"{r['est_memory_s']:.3f} s)")
        lines += [
            f"  est. step time       {r['est_step_s']:9.3f} s = {how}; collectives assumed hidden",
            f"  est. MFU             {100 * r['est_mfu']:9.1f} %  = model FLOPs / ("
            f"{r['n_chips']} chips x {r['peak_flops_per_chip'] / 1e12:.0f} TFLOP/s x est. step); "
            f"from {r['est_source']}"]
    if r["xla_optimal_mfu"] is not None:
        lines.append(f"  XLA optimal_seconds  {r['xla_optimal_seconds']:9.3f} s (XLA:TPU's own "
                     f"cost model; MFU at that time {100 * r['xla_optimal_mfu']:.1f} %)")
    return "\n".join(lines)


def _prescan(argv: list[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
    return None


def _main(argv: list[str]) -> None:
    # cfm.config_loader imports no JAX; the config files it loads may, and they load only in
    # parse_command_line, after prepare_environment
    from absl import flags

    from cfm import config_loader

    name = _prescan(argv, "topology")
    if name is not None:
        topo = parse_topology(name)
        prepare_environment(topo)  # before the config file imports jax
    elif not config_loader.help_requested(argv):  # --help needs no topology
        raise AotError(f"--topology is required, e.g. {EXAMPLES}")

    def define(fv: flags.FlagValues) -> None:
        flags.DEFINE_string("topology", None, "the slice to compile for, <generation>:<chips "
                            f"per dimension> or cpu:N, e.g. {EXAMPLES}", flag_values=fv)
        flags.DEFINE_string("json", None, "also write the figures to this JSON file",
                            flag_values=fv)

    try:
        fv = config_loader.parse_command_line(
            argv, define, doc=__doc__, required=("config", "topology"),
            example="python -m cfm.aot --config configs/omics_mgm.py:test --topology cpu:8")
    except config_loader.CommandLineError as e:
        raise AotError(f"bad command line: {e}") from None
    if fv.json and not os.path.isdir(os.path.dirname(os.path.abspath(fv.json))):
        raise AotError(f"--json {fv.json}: its folder does not exist")
    report = compile_step(fv.config, topo)
    print(format_report(report), flush=True)
    if fv.json:
        with open(fv.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1, default=str)


def main(argv: list[str] | None = None) -> int:
    """Command line entry; returns the exit status (0 ok, 2 bad input with one line on stderr,
    1 a bug, with its traceback)."""
    argv = list(sys.argv if argv is None else argv)
    return errors.run_cli("cfm.aot", lambda: _main(argv), {AotError: "", TopologyError: ""})


if __name__ == "__main__":
    sys.exit(main())
