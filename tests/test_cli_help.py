"""`--help` and `-h` of every `python -m` entry point (issue 15, item 1): exit 0, the whole module
docstring, every option with its default (or "required"), and an example command.

The entry points are found by scanning cfm/, data_prep/, launch/ and benchmarks/ for
`if __name__ == "__main__"` (and `__main__.py` files), so a new command line cannot be left out.
The runs share a small thread pool, once per session (about 35 processes, most of the time
spent importing jax).
"""

from __future__ import annotations

import ast
import concurrent.futures
import functools
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("cfm", "data_prep", "launch", "benchmarks")
HELP_FLAGS = ("--help", "-h")
MAIN_GUARD = re.compile(r"""^if __name__ == ["']__main__["']:""", re.M)


def entry_points() -> dict[str, pathlib.Path]:
    """{module run by `python -m`: its file} for every file with a main guard or `__main__.py`."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.name != "__main__.py" and not MAIN_GUARD.search(path.read_text("utf-8")):
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            module = ".".join(parts[:-1] if path.name == "__main__.py" else parts)
            found[module] = path
    return found


ENTRY_POINTS = entry_points()
CASES = [(m, f) for m in ENTRY_POINTS for f in HELP_FLAGS]


def _run(module: str, flag: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", module, flag], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=180)


@functools.lru_cache(maxsize=None)
def _results() -> dict[tuple[str, str], subprocess.CompletedProcess]:
    """Every `--help`, then `-h` where the help is not argparse's: argparse's -h and --help are
    one action, which its help lists as "-h, --help" (checked in test_help), so a second process
    would print the same text (and costs CI ~40 s)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        runs = {(m, "--help"): pool.submit(_run, m, "--help") for m in ENTRY_POINTS}
        done = {case: run.result() for case, run in runs.items()}
        runs = {(m, "-h"): pool.submit(_run, m, "-h") for (m, _), proc in done.items()
                if not proc.stdout.startswith("usage:")}
        done.update({case: run.result() for case, run in runs.items()})
        for m in ENTRY_POINTS:
            done.setdefault((m, "-h"), done[(m, "--help")])
        return done


def _docstring(path: pathlib.Path) -> str:
    return ast.get_docstring(ast.parse(path.read_text("utf-8"))) or ""


def option_entries(text: str) -> list[tuple[str, str, bool]]:
    """(invocation, help text, takes a value) of every option the help lists, in argparse's
    layout (`  --name NAME    help...`, continued on deeper-indented lines) or
    cfm.config_loader's (`  --name[ METAVAR]: help (default: ...)`; every flag but --help takes
    a value, an absl boolean shows as `--[no]name`). argparse's invocations hold no ": "."""
    entries: list[list[str]] = []
    for line in text.splitlines():
        if re.match(r"^ {2}-", line):
            entries.append([line.strip()])
        elif entries and entries[-1][-1] and re.match(r"^ {3,}\S", line):
            entries[-1].append(line.strip())
        elif entries:
            entries[-1].append("")  # the entry ended: later lines are not its continuation
    out = []
    for lines in entries:
        body = "  ".join([lines[0], " ".join(x for x in lines[1:] if x)]).strip()
        cuts = [(body.find(sep), sep) for sep in ("  ", ": ") if sep in body]
        sep = min(cuts)[1] if cuts else "  "
        invocation, _, help_ = body.partition(sep)
        if sep == ": ":  # config_loader's layout
            value = "--help" not in invocation and "[no]" not in invocation
        else:
            value = any(" " in form.strip() for form in invocation.split(", "))
        out.append((invocation.strip(), " ".join(help_.split()), value))
    return out


def test_entry_points_found():
    """The scan finds the command lines the issue names, so an empty scan cannot pass."""
    expected = {"cfm.train", "cfm.finetune", "cfm.export", "cfm.embed", "cfm.aot",
                "data_prep.tile_wsi", "data_prep.prepare_omics", "launch.local", "launch.slurm",
                "launch.tpu", "benchmarks.train_step"}
    assert expected <= set(ENTRY_POINTS), expected - set(ENTRY_POINTS)


@pytest.mark.parametrize("module,flag", CASES)
def test_help(module: str, flag: str):
    """Exit 0; the docstring whole (its last line too); an `example:` whose command runs this
    module; every option that takes a value shows its default or says it is required."""
    proc = _results()[(module, flag)]
    text = proc.stdout
    assert proc.returncode == 0, f"{module} {flag}: exit {proc.returncode}: {proc.stderr[-2000:]}"
    doc = _docstring(ENTRY_POINTS[module])
    last = doc.strip().splitlines()[-1].strip() if doc.strip() else ""
    assert last in text, f"{module} {flag}: the docstring is cut short (no {last!r})"
    assert re.search(rf"(?im)^example:\n\s+python -m {re.escape(module)}( |$)", text), \
        f"{module} {flag}: no 'example:' with a `python -m {module}` command\n{text[-1500:]}"
    if text.startswith("usage:"):
        assert text.startswith(f"usage: python -m {module} "), text.splitlines()[0]
    entries = option_entries(text.split("example:")[0])
    assert any(inv.endswith("--help") for inv, _, _ in entries), f"{module}: no options listed"
    if text.startswith("usage:"):  # argparse: -h was not run on its own (see _results)
        assert any(inv == "-h, --help" for inv, _, _ in entries), f"{module}: no -h"
    for invocation, help_, value in entries:
        if not value or "KEY=VALUE" in invocation:
            continue
        assert re.search(r"default|required", help_, re.I), \
            f"{module} {flag}: {invocation!r} shows no default: {help_!r}"


def test_option_entries_parser():
    """The layout parser the checks rely on reads both layouts, and sees a bare option."""
    argparse_text = ("options:\n  -h, --help  show this help message and exit\n"
                     "  --batch BATCH  tiles per pass (default:\n                 128)\n"
                     "  --bare BARE\n  --flag  a switch\n\nexample:\n")
    assert option_entries(argparse_text) == [
        ("-h, --help", "show this help message and exit", False),
        ("--batch BATCH", "tiles per pass (default: 128)", True), ("--bare BARE", "", True),
        ("--flag", "a switch", False)]
    absl_text = ("flags:\n  --workdir: where runs go (required)\n  --[no]quiet: less output\n"
                 "  --config FILE.py:ARG: the config (required)\n"
                 "  -h, --help: print this help and exit\n")
    assert option_entries(absl_text) == [("--workdir", "where runs go (required)", True),
                                         ("--[no]quiet", "less output", False),
                                         ("--config FILE.py:ARG", "the config (required)", True),
                                         ("-h, --help", "print this help and exit", False)]
