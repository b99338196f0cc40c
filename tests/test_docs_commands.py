"""Every command in README.md and docs/*.md is run here with tiny settings, or marked.

A command is a `python -m MODULE ...` or `python benchmarks/NAME.py ...` line of a ```bash block
(lines ending in `\\` joined; `&&` chains split; a leading `path/to/python` counts too).
`python -m venv` and `python -m pytest` are the install and CI's own command (b): not run here.

Marks: an HTML comment on the line(s) before a block's fence applies to every command in it.
- `<!-- needs: tpu|gpu|slurm|libtpu -->`: not run (libtpu: the `tpu` extra, which CI does not
  install; no chip needed). Only the mark is checked.
- `<!-- expect: exit N -->`: run, and the exit status must be N (error examples).
Every other command must exit 0.

Commands run in document order (PAGES), so later pages reuse what earlier ones made (the demo
run of README command (a), the tiles of docs/slides.md, ...). The rewrite table (`rewrite`):
- `/tmp/...` -> a fresh session folder; `../shared/data` -> the `shared_data` fixture's path;
- config presets -> their tiny test presets (PRESETS), plus every `/tmp/...` default of the
  documented preset passed explicitly (so `demo`'s data.path or the fine-tuning configs' encoder
  and shard paths follow the folder); `cfm.train`'s `total_steps` -> 2 (added where absent);
- `cfm.export --step N` -> the last step of the tiny run (2);
- launchers -> `--dry-run` (prints every command, runs none);
- benchmarks and data generators -> the smallest sizes (EXTRA_ARGS, appended: the last value of
  a flag wins).
Every command runs in a fresh process, as a user runs it (the test session's JAX compilation
cache is shared, so programs compiled by earlier tests are not compiled again). Two run at a time
(CI has 2 cores; most of a command is a single-threaded jax import): a command waits for every
earlier command whose folders overlap its own (`after`), so each still sees what the commands
before it in the docs made, and no two commands write one folder at once.
"""

from __future__ import annotations

import concurrent.futures
import os
import pathlib
import re
import shlex
import subprocess
import sys
import time

from tests.conftest import ROOT, load_config

PAGES = ["README.md", "docs/slides.md", "docs/pretraining.md", "docs/checkpoints.md",
         "docs/omics.md", "docs/finetuning.md", "docs/scale_out.md", "docs/launching.md",
         "docs/benchmarks.md"]  # the order the commands run in; other docs/*.md come last
NEEDS = {"tpu", "gpu", "slurm", "libtpu"}
SETUP_MODULES = {"venv", "pytest", "pip"}  # the install and CI's command (b)
LAUNCHERS = {"launch.tpu", "launch.slurm", "launch.local"}

# documented preset -> (test preset, extra overrides)
PRESETS = {
    "configs/dino_vit.py:demo": ("configs/dino_vit.py:test", ["--config.data.source=folder"]),
    "configs/omics_mgm.py:demo": ("configs/omics_mgm.py:test", []),
    "configs/omics_mgm.py:tcga": ("configs/omics_mgm.py:tcga", [
        "--config.model.variant=omics_test", "--config.batch_size=8",
        "--config.evals.mgm.every=0", "--config.evals.health.every=0"]),
    "configs/finetune/domain_adapt.py:uni": ("configs/finetune/domain_adapt.py:test", []),
    "configs/finetune/icb_response.py:loco": ("configs/finetune/icb_response.py:test", []),
    "configs/finetune/tcga_survival.py:blca": ("configs/finetune/tcga_survival.py:test", []),
}
for _task in ("tile_probe", "slide_mil", "spatial", "tme"):
    PRESETS[f"configs/finetune/{_task}.py:synthetic"] = (f"configs/finetune/{_task}.py:test", [])
PRESETS["configs/finetune/tme.py:cmu"] = ("configs/finetune/tme.py:test", [])

# module or script -> arguments appended (tiny sizes)
EXTRA_ARGS = {
    "data_prep.synthetic_tme": ["--patients", "6", "--tiles-per-class", "3", "--slides", "8",
                                "--grid", "4"],
    "benchmarks.omics_eval": ["--splits", "test"],
    "benchmarks.omics_step": ["--variant", "omics_test", "--tokens", "48", "--batch", "8",
                              "--steps", "1"],
    "benchmarks/train_step.py": ["--variant", "vit_test", "--batch", "8", "--global-size", "32",
                                 "--local-size", "16", "--local-crops", "2", "--steps", "1"],
    "benchmarks/input_pipeline.py": ["--preset", "test", "--samples", "4", "--rounds", "1",
                                     "--tiles", "4", "--tile-size", "64"],
    "benchmarks/tile_wsi.py": ["--repeats", "1", "--only-shared"],
    "benchmarks/active_learning.py": ["--data", "/tmp/cfm_ft/data", "--model",
                                      "/tmp/cfm_ft/encoder", "--workdir", "/tmp/cfm_al_bench",
                                      "--seeds", "1",
                                      "--tile-pool-slides", "8", "--tile-rounds", "2",
                                      "--slide-rounds", "2", "--plot", "/tmp/cfm_al_bench/p.png"],
    "benchmarks/checkpoint.py": ["--variant", "test", "--batch", "2", "--global-size", "32",
                                 "--local-size", "16", "--steps", "1", "--rounds", "1",
                                 "--dir", "/tmp/cfm_bench_ckpt"],
}
TINY_STEPS = 2

_CMD = re.compile(r"^(?:\S*/)?python\s+(?:-m\s+(?P<module>\S+)|(?P<script>benchmarks/\S+\.py))")
_MARK = re.compile(r"<!--\s*(needs|expect):\s*([^>]*?)\s*-->")


def extract(path: pathlib.Path) -> list[dict]:
    """The commands of `path`'s ```bash blocks: {page, line, text, needs, expect}."""
    out, lines = [], path.read_text().splitlines()
    i, mark = 0, {}
    while i < len(lines):
        line = lines[i].strip()
        m = _MARK.fullmatch(line)
        if m:
            mark = {m.group(1): m.group(2)}
        elif line.startswith("```bash"):
            i += 1
            while i < len(lines) and not lines[i].strip().startswith("```"):
                start, text = i + 1, lines[i].rstrip()
                while text.endswith("\\") and i + 1 < len(lines):
                    i += 1
                    text = text[:-1].rstrip() + " " + lines[i].strip()
                for part in text.split("&&"):
                    part = re.sub(r"\s+#.*$", "", part.strip())
                    c = _CMD.match(part)
                    if c and (c.group("module") or "").split(".")[0] not in SETUP_MODULES:
                        out.append({"page": str(path.relative_to(ROOT)), "line": start,
                                    "text": part, "needs": mark.get("needs"),
                                    "expect": int(mark.get("expect", "exit 0").split()[-1]),
                                    "target": c.group("module") or c.group("script")})
                i += 1
            mark = {}
        elif line:
            mark = {}
        i += 1
    return out


def all_commands() -> list[dict]:
    rest = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))
    pages = PAGES + [p for p in rest if p not in PAGES]
    return [c for p in pages for c in extract(ROOT / p)]


def _tmp_defaults(spec: str) -> list[str]:
    """`--config.key=/tmp/...` for every string default under /tmp/ of the config `spec`."""
    def walk(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from walk(v, f"{prefix}{k}.")
            elif isinstance(v, str) and v.startswith("/tmp/"):
                yield f"--config.{prefix}{k}={v}"
    return list(walk(load_config(*spec.split("configs/", 1)[1].split(":")).to_dict(), ""))


def rewrite(cmd: dict, tmp: pathlib.Path, shared: pathlib.Path) -> list[str]:
    """The argv (after `python`) the test runs for a documented command (module docstring)."""
    argv = shlex.split(cmd["text"])[1:]  # without python
    target = cmd["target"]
    if target in LAUNCHERS:
        sub = 1 if target == "launch.tpu" else 0  # after `run` / `delete`
        argv.insert(2 + sub, "--dry-run")
        return argv  # the job is printed, not run: left as documented
    if "--config" in argv:
        i = argv.index("--config") + 1
        spec = argv[i]
        test_spec, extra = PRESETS.get(spec, (spec, []))
        given = {a.split("=")[0] for a in argv}
        argv[i] = test_spec
        argv += [a for a in _tmp_defaults(spec) + extra if a.split("=")[0] not in given]
        if target == "cfm.train":
            argv = [a for a in argv if not a.startswith("--config.total_steps=")]
            argv.append(f"--config.total_steps={TINY_STEPS}")
    if target == "cfm.export" and "--step" in argv:
        argv[argv.index("--step") + 1] = str(TINY_STEPS)
    argv += EXTRA_ARGS.get(target, [])
    return [a.replace("/tmp/", f"{tmp}/").replace("../shared/data", str(shared)) for a in argv]


WORKERS = 2  # commands at a time


def _folders(argv: list[str], tmp: pathlib.Path) -> set[str]:
    """The session-folder paths in `argv` (also `--key=PATH` and comma-separated values)."""
    out = set()
    for a in argv:
        for value in re.split(r"[=,]", a):
            if value == str(tmp) or value.startswith(f"{tmp}/"):
                out.add(os.path.normpath(value))
    return out


def after(argvs: list[list[str]], tmp: pathlib.Path) -> list[set[int]]:
    """For each command, the earlier ones it must wait for: those naming a path equal to, inside
    or above one of its paths (read or written: which is which is not known, so any overlap
    orders them as the docs do). Commands without session paths wait for nobody."""
    folders = [_folders(a, tmp) for a in argvs]

    def overlap(x: str, y: str) -> bool:
        return x == y or x.startswith(y + "/") or y.startswith(x + "/")

    return [{j for j in range(i) if any(overlap(x, y) for x in folders[i] for y in folders[j])}
            for i in range(len(argvs))]


def run_in_order(argvs: list[list[str]], deps: list[set[int]], run, workers: int = WORKERS
                 ) -> list:
    """`run(i)` for every i, `workers` at a time, each only once all of `deps[i]` have finished
    (whatever their exit status); of the ready ones, the one most commands wait on goes first
    (then document order). Returns the results in document order."""
    waiting = [set() for _ in argvs]  # i -> the commands that wait on i, directly or not
    for i in reversed(range(len(argvs))):
        for j in deps[i]:
            waiting[j] |= {i} | waiting[i]
    results, running, done = [None] * len(argvs), {}, set()
    todo = list(range(len(argvs)))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        while todo or running:
            ready = [i for i in todo if deps[i] <= done]
            for i in sorted(ready, key=lambda i: (-len(waiting[i]), i))[:workers - len(running)]:
                todo.remove(i)
                running[pool.submit(run, i)] = i
            finished, _ = concurrent.futures.wait(running, return_when="FIRST_COMPLETED")
            for f in finished:
                i = running.pop(f)
                results[i] = f.result()
                done.add(i)
    return results


def _run(argv: list[str], target: str) -> tuple[int, str]:
    """(exit status, output tail) of `python ARGV`, as a user runs it: a fresh process (the
    commands install signal handlers, leave with os._exit and start worker threads, none of
    which may touch the test process); JAX's compilation cache of the test session is shared."""
    p = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    return p.returncode, (p.stdout + p.stderr)[-3000:]


def test_every_command_is_run_or_marked():
    """Each command is either marked with a known need, or runnable: a module or script that
    exists. Marked commands must really be the kind that needs it (a `.venv-tpu` one, ...)."""
    cmds = all_commands()
    assert len(cmds) >= 20, cmds  # the extraction finds the documented commands
    for c in cmds:
        where = f"{c['page']}:{c['line']}: {c['text']}"
        if c["needs"] is not None:
            assert c["needs"] in NEEDS, where
            continue
        t = c["target"]
        exists = ((ROOT / t).is_file() if t.endswith(".py") else
                  (ROOT / t.replace(".", "/")).with_suffix(".py").is_file()
                  or (ROOT / t.replace(".", "/") / "__main__.py").is_file())
        assert exists, f"{where}: no such module or script"
        assert not re.match(r"^\S+/python", c["text"]), f"{where}: a venv's python, not marked"
        assert "<" not in c["text"] and "DIR" not in c["text"].split(), \
            f"{where}: a synopsis belongs in a ```text block"


def test_rewrite_table():
    """The rewrite keeps the documented module and flags and only shrinks sizes and paths."""
    tmp, shared = pathlib.Path("/x"), pathlib.Path("/s")
    cmd = {"text": "python -m cfm.train --config configs/dino_vit.py:demo --workdir "
                   "/tmp/cfm_demo/run", "target": "cfm.train"}
    assert rewrite(cmd, tmp, shared) == [
        "-m", "cfm.train", "--config", "configs/dino_vit.py:test", "--workdir",
        "/x/cfm_demo/run", "--config.data.path=/x/cfm_demo/tiles",
        "--config.evals.knn.path=/x/cfm_demo/probe", "--config.evals.linear.path=/x/cfm_demo/probe",
        "--config.data.source=folder", "--config.total_steps=2"]
    cmd = {"text": "python -m launch.tpu run --name n --zone z --topology v5p:2x2x4 -- python "
                   "-m cfm.train --config configs/dino_vit.py:vit_l16 --workdir gs://B/r",
           "target": "launch.tpu"}
    assert rewrite(cmd, tmp, shared)[:4] == ["-m", "launch.tpu", "run", "--dry-run"]


def test_commands_wait_for_the_earlier_ones_they_share_a_folder_with():
    """`after` orders two commands naming one folder (or one inside the other), in any flag
    form; `run_in_order` starts a command only once those have finished."""
    tmp = pathlib.Path("/x")
    argvs = [["--out", "/x/a"], ["--workdir", "/x/b", "--config.data.path=/x/a/tiles"],
             ["--dry-run", "/tmp/x/a"], ["--in=/x/c,/x/b"], ["--out", "/x"], ["--out", "/x/ab"]]
    deps = after(argvs, tmp)
    assert deps == [set(), {0}, set(), {1}, {0, 1, 3}, {4}]
    finished, started = [], {}

    def run(i):
        started[i] = list(finished)
        time.sleep(0.03)
        finished.append(i)
        return i

    assert run_in_order(argvs, deps, run) == list(range(len(argvs)))
    for i, before in started.items():
        assert deps[i] <= set(before), (i, before)
    assert len(started) == len(argvs)


def test_documented_commands_run(tmp_path_factory, shared_data):
    """Runs every unmarked command with the rewrite table, each after the earlier commands it
    shares a folder with (the order of the docs); all failures are reported together."""
    tmp = tmp_path_factory.mktemp("docs")
    cmds = [c for c in all_commands() if c["needs"] is None]
    argvs = [rewrite(c, tmp, shared_data) for c in cmds]

    def run(i: int) -> tuple[int, str, float]:
        t0 = time.monotonic()
        return (*_run(argvs[i], cmds[i]["target"]), time.monotonic() - t0)

    failures, times = [], []
    for c, argv, (code, out, seconds) in zip(cmds, argvs,
                                            run_in_order(argvs, after(argvs, tmp), run)):
        times.append(f"{seconds:6.1f} s  {c['page']}:{c['line']}")
        if code != c["expect"]:
            failures.append(f"{c['page']}:{c['line']}: exit {code}, expected {c['expect']}\n"
                            f"  documented: {c['text']}\n  ran: python {shlex.join(argv)}\n"
                            f"{out}")
    print("\n".join(times))  # shown with -s: where the time goes
    assert not failures, "\n\n".join(failures + times)
