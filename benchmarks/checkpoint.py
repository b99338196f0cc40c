"""Save and restore time of a DINOv2 train state with cfm.checkpoint (async orbax), and what an
in-flight asynchronous save costs the train step.

    python benchmarks/checkpoint.py [--variant vit_l16] [--rounds 3] [--dir /tmp/cfm_bench_ckpt]
    python benchmarks/checkpoint.py --quick  # tiny model, seconds: a smoke run

The state is the full `configs/dino_vit.py` preset state of `--variant` (student + teacher + Adam
mu/nu + centers, 65536 prototypes; ViT-L/16: 1.3 G float32 values, 5.3 GB), created sharded on
one device (a 1-device mesh) and checkpointed with `cfm.checkpoint.manager` / `save` /
`checkpoint.restore` under `--dir` (local disk). The train step is the real jitted DINOv2 step
(`cfm.setup`, as cfm.train builds it) of that same state, run on a small batch of small crops
(default batch 2, 2x112 global + 2x48 local crops; parameter shapes stay the preset's, position
embeddings are resampled) so that a step takes seconds on CPU while still reading and writing
the whole state (optimiser update, teacher EMA), as a full-size step does.

Memory: peak RSS is about 3x the state for saving and restoring alone (ViT-L/16: 15.5 GB) and
4.7-5.8x with the train step (ViT-B/16), so on a 24 GiB machine the ViT-L/16 state fits only with
`--no-train` (save and restore figures); `--variant vit_b16` gives all figures. The system
allocator is the default: under train_step.py's jemalloc with retention (`--allocator auto`)
RSS grows by about a state's worth per save (ViT-B/16: 8.7, 11.3, 14.8 GB over three rounds)
and the full ViT-L/16 run was killed for memory at 18.8 GB.

Each of `--rounds` rounds, interleaved so that load from other processes hits all figures alike:
1. `--steps` steps with no save in flight: the steady-state step time;
2. a save with nothing else running (after a first save, which also starts orbax's threads
   and faults in its host buffers, timed and printed apart): its blocking time (what the
   train loop waits for in `save`) and the time until `wait_until_finished` returns; then the
   checkpoint files are flushed to disk (fdatasync) and dropped from the page cache
   (posix_fadvise), timed apart;
3. a save followed by train steps for as long as it is in flight: the time of each step that
   starts while the save is still in progress.
Then `checkpoint.restore` into the abstract state (shapes, dtypes, 1-device shardings), from a
cold page cache each time, plus one warm restore. Figures are medians over rounds.
Last line: `save_block_s=.. save_total_s=.. restore_s=.. state_gb=.. step_s=..
step_s_during_save=.. slowdown_pct=..`.
"""

from __future__ import annotations

import os
import pathlib
import resource
import shutil
import statistics
import sys
import time
from typing import Any

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from cfm import checkpoint, cli_help, setup  # noqa: E402
from cfm.data import masking  # noqa: E402
from cfm.models import vit  # noqa: E402
from train_step import _reexec_with_jemalloc, load_config  # noqa: E402

GB = 1e9


def make_batch(config: Any, rng: np.random.Generator) -> dict:
    """A random uint8 batch of `config`'s crops and its iBOT masks."""
    b, cr = config.batch_size, config.crops
    grid = cr.global_size // vit.spec(config.model.variant).patch
    n_crops = 2 * b
    masks = masking.sample_batch_masks(
        rng, n_crops, (grid, grid), config.ibot.mask_sample_probability,
        config.ibot.mask_ratio_min_max, config.ibot.min_block_patches, config.ibot.min_aspect,
        config.ibot.max_mask_fraction)
    local = {
        "global_crops": rng.integers(0, 256, (b, 2, cr.global_size, cr.global_size, 3),
                                     dtype=np.uint8),
        "local_crops": rng.integers(0, 256, (b, cr.n_local, cr.local_size, cr.local_size, 3),
                                    dtype=np.uint8),
        "masks": masks.reshape(b, 2, grid * grid),
    }
    return local


def evict(path: pathlib.Path) -> float:
    """Flush every file under `path` to disk and drop it from the page cache (only these files:
    other processes' cache is untouched). Returns the seconds the flush took."""
    t = time.perf_counter()
    for f in path.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return time.perf_counter() - t


def dir_bytes(path: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def rss_gb() -> float:
    """Peak resident set size of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB


def mem_available_gb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / GB
    return float("nan")


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def spread(xs: list[float]) -> str:
    return f"[{min(xs):.3f} .. {max(xs):.3f}], n={len(xs)}" if xs else "n=0"


def main() -> None:
    ap = cli_help.parser("benchmarks.checkpoint", __doc__,
                         "python -m benchmarks.checkpoint --quick")
    ap.add_argument("--variant", default="vit_l16",
                    help="preset whose state is saved (vit_b16 where vit_l16 does not fit)")
    ap.add_argument("--batch", type=int, default=2, help="images per train step")
    ap.add_argument("--global-size", type=int, default=112, help="global crop side in pixels")
    ap.add_argument("--local-crops", type=int, default=2, help="local crops per image")
    ap.add_argument("--local-size", type=int, default=48, help="local crop side in pixels")
    ap.add_argument("--steps", type=int, default=3, help="steps without a save, per round")
    ap.add_argument("--rounds", type=int, default=3, help="save + restore rounds")
    ap.add_argument("--dir", default="/tmp/cfm_bench_ckpt", help="emptied, then written")
    ap.add_argument("--no-train", action="store_true",
                    help="save and restore only: no train step (step figures print nan)")
    ap.add_argument("--quick", action="store_true",
                    help="configs/dino_vit.py:test's tiny model and crops, 2 rounds")
    ap.add_argument("--allocator", choices=("auto", "system"), default="system",
                    help="auto: re-run under jemalloc with retention when installed (see "
                    "train_step.py); it keeps every save's freed host copy: RSS grows per save")
    args = ap.parse_args()
    if args.allocator == "auto":
        _reexec_with_jemalloc()
    allocator = "jemalloc" if "jemalloc" in os.environ.get("LD_PRELOAD", "") else "system malloc"
    mem0 = mem_available_gb()

    if args.quick:
        c = load_config("test")
        args.rounds = min(args.rounds, 2)
    else:
        c = load_config(args.variant)
        c.batch_size = args.batch
        c.crops.global_size = args.global_size
        c.crops.local_size = args.local_size
        c.crops.n_local = args.local_crops
        # c.model.img_size stays the preset's: the state has the preset's exact shapes.
    c.mesh.data = 1
    c.keep_checkpoints = 2
    workdir = pathlib.Path(args.dir)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)

    s = setup.setup(c, jax.devices()[:1])  # the trainer's models, state layout and step
    c = s.config
    state = setup.create_state(s)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    leaves = jax.tree.leaves(state)
    state_bytes = sum(x.nbytes for x in leaves)
    n_values = sum(x.size for x in leaves)
    print(f"state: {c.model.variant}, {c.head.n_prototypes} prototypes, {len(leaves)} arrays, "
          f"{n_values / 1e9:.4g} G values, {state_bytes / GB:.4g} GB; MemAvailable at start "
          f"{mem0:.1f} GB", flush=True)

    compile_s, loss = float("nan"), float("nan")
    if not args.no_train:
        batch = setup.global_batch(s, make_batch(c, np.random.default_rng(0)))
        t = time.perf_counter()
        with jax.set_mesh(s.mesh):
            compiled = s.step.lower(state, batch).compile()
        compile_s = time.perf_counter() - t
        state, out = compiled(state, batch)  # warm-up
        jax.block_until_ready((state, out))
        loss = float(out["loss"])

    def timed_step() -> float:
        nonlocal state, out
        t = time.perf_counter()
        state, out = compiled(state, batch)
        jax.block_until_ready((state, out))
        return time.perf_counter() - t

    mngr = checkpoint.manager(str(workdir), c)
    ckpt_dir = workdir / "checkpoints"
    n_saves = 0

    def save() -> tuple[float, float]:
        """One save of the current state: (blocking s, s until wait_until_finished returns
        when nothing else runs meanwhile)."""
        nonlocal n_saves
        n_saves += 1
        t = time.perf_counter()
        checkpoint.save(mngr, n_saves, state, c, force=True)
        block = time.perf_counter() - t
        mngr.wait_until_finished()
        return block, time.perf_counter() - t

    # The first save also starts orbax's threads and faults in its host buffers: apart.
    first_block, first_total = save()
    evict(ckpt_dir)
    print(f"first save: block {first_block:.3f} s, total {first_total:.3f} s; peak RSS "
          f"{rss_gb():.1f} GB", flush=True)
    step_s, during, blocks, totals, cpu_util, flushes = [], [], [], [], [], []
    overlap_blocks, overlap_totals = [], []
    for r in range(args.rounds):
        # 1. steady state, no save in flight
        if not args.no_train:
            step_s += [timed_step() for _ in range(args.steps)]
        # 2. a save alone
        cpu0 = time.process_time()
        block, total = save()
        cpu_util.append((time.process_time() - cpu0) / total)
        blocks.append(block)
        totals.append(total)
        flushes.append(evict(ckpt_dir))
        if args.no_train:
            print(f"round {r + 1}/{args.rounds}: save block {block:.3f} s, total {total:.3f} s "
                  f"(flush {flushes[-1]:.3f} s); peak RSS {rss_gb():.1f} GB", flush=True)
            continue
        # 3. a save with train steps running until it is done
        n_saves += 1
        t = time.perf_counter()
        checkpoint.save(mngr, n_saves, state, c, force=True)
        overlap_blocks.append(time.perf_counter() - t)
        these = []
        while mngr.is_saving_in_progress():
            these.append(timed_step())
        mngr.wait_until_finished()
        overlap_totals.append(time.perf_counter() - t)
        during += these
        evict(ckpt_dir)
        print(f"round {r + 1}/{args.rounds}: steps median {med(step_s[-args.steps:]):.3f} s; "
              f"save block {block:.3f} s, total {total:.3f} s (flush {flushes[-1]:.3f} s); "
              f"during a save: block {overlap_blocks[-1]:.3f} s, {len(these)} steps "
              f"{[round(x, 3) for x in these[:8]]}{' ...' if len(these) > 8 else ''} s, "
              f"save total {overlap_totals[-1]:.3f} s; "
              f"peak RSS {rss_gb():.1f} GB", flush=True)
    latest = ckpt_dir / str(mngr.latest_step())
    disk_bytes = dir_bytes(latest)

    # restore: drop the live state first so that the restored copy has the memory it would have
    del state
    if not args.no_train:
        del out, compiled
    restores = []
    for _ in range(args.rounds):
        evict(ckpt_dir)
        t = time.perf_counter()
        restored, at = checkpoint.restore(mngr, abstract)
        jax.block_until_ready(restored)
        restores.append(time.perf_counter() - t)
        del restored
    t = time.perf_counter()
    restored, at = checkpoint.restore(mngr, abstract)  # page cache warm
    jax.block_until_ready(restored)
    warm_restore = time.perf_counter() - t
    ok = all(r.sharding == a.sharding and r.shape == a.shape
             for r, a in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract)))
    del restored
    mngr.close()
    peak = rss_gb()
    shutil.rmtree(workdir, ignore_errors=True)

    gb = state_bytes / GB
    save_block, save_total, restore_s = med(blocks), med(totals), med(restores)
    step_med, during_med = med(step_s), med(during)
    slowdown = 100.0 * (during_med / step_med - 1.0)
    print(f"{c.model.variant}: batch {c.batch_size}, crops 2x{c.crops.global_size} + "
          f"{c.crops.n_local}x{c.crops.local_size}, {jax.devices()[0].device_kind} x"
          f"{os.cpu_count()} cores, {allocator}, checkpoints in {workdir}; compile {compile_s:.1f}"
          f" s, loss {loss:.4f}; load average {os.getloadavg()[0]:.1f}")
    print(f"state {gb:.4g} GB in memory, {disk_bytes / GB:.4g} GB on disk (step {at})")
    print(f"first save: blocking {first_block:.3f} s, until finished {first_total:.3f} s")
    print(f"save, blocking:       {save_block:.3f} s  {spread(blocks)}")
    print(f"save, until finished: {save_total:.3f} s  {spread(totals)} = {gb / save_total:.2f} "
          f"GB/s; process CPU {med(cpu_util):.2f} cores meanwhile; fdatasync after it "
          f"{med(flushes):.3f} s")
    if not args.no_train:
        print(f"save with steps running: blocking {med(overlap_blocks):.3f} s, until finished "
              f"{med(overlap_totals):.3f} s  {spread(overlap_totals)}")
    print(f"restore (cold page cache): {restore_s:.3f} s  {spread(restores)} = "
          f"{gb / restore_s:.2f} GB/s; warm {warm_restore:.3f} s; shardings match: {ok}")
    print(f"step: {step_med:.3f} s  {spread(step_s)}; while a save is in flight "
          f"{during_med:.3f} s  {spread(during)} -> {slowdown:+.1f}%")
    print(f"peak RSS {peak:.1f} GB ({peak / gb:.1f}x the state)")
    print(f"save_block_s={save_block:.3f} save_total_s={save_total:.3f} restore_s={restore_s:.3f} "
          f"state_gb={gb:.4g} step_s={step_med:.3f} step_s_during_save={during_med:.3f} "
          f"slowdown_pct={slowdown:.1f}")


if __name__ == "__main__":
    main()
