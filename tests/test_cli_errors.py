"""One error path for every CLI (issue 15, item 2): each bad input below, fed to the real command
line in a fresh process, exits with status 2, prints exactly one non-empty line on stderr that
names what to fix, and creates nothing (no workdir, no empty checkpoints/, an existing file
left as it was). A bug, unlike bad input, prints its traceback and where to report it.

The subprocesses run two at a time (a thread pool in a module fixture); each case is its own
parametrised test of the shared results."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from cfm import errors, init_from
from cfm.data.sources import SyntheticSource
from data_prep import prepare_omics
from tests.conftest import ROOT, load_config
from tests.test_pipeline import _write_shards

DINO = f"{ROOT}/configs/dino_vit.py:test"
MGM = f"{ROOT}/configs/omics_mgm.py:test"
ICB = f"{ROOT}/configs/finetune/icb_response.py:test"
CHECKPOINT_RUN = f"{ROOT}/tests/fixtures/v0_1/dino"  # a cfm.train workdir holding step 2
NOT_WRITABLE = "/sys/kernel" if os.geteuid() == 0 else "{tmp}/readonly"  # root writes 0o555


def _train(name: str, args: list[str], message: str, config: str = DINO,
           workdir: str = "{w}") -> tuple:
    return (name, "cfm.train", ["--config", config, *args, "--workdir", workdir], message)


def _data(name: str, source: str, path: str, message: str, config: str = DINO) -> tuple:
    return _train(name, [f"--config.data.source={source}", f"--config.data.path={path}"],
                  message, config)


def _finetune(name: str, args: list[str], message: str, config: str = ICB,
              workdir: str = "{w}") -> tuple:
    return (name, "cfm.finetune", ["--config", config, *args, "--workdir", workdir], message)


# (id, module, arguments, what stderr must name); {tmp} is the scratch folder, {w} the case's
# workdir (a path that must not exist afterwards)
CASES = [
    # ---- config file, preset, key, value ------------------------------------------------------
    _train("missing_config", [], "configs/nope.py does not exist", "configs/nope.py:test"),
    _train("config_does_not_parse", [], "does not parse", "{tmp}/broken.py:test"),
    _train("unknown_preset", [], "unknown preset 'nopreset'",
           f"{ROOT}/configs/dino_vit.py:nopreset"),
    _train("misspelt_key", ["--config.modle.variant=vit_s16"], 'Did you mean "model"'),
    _train("value_of_wrong_type", ["--config.batch_size=big"], "--config.batch_size=big"),
    _train("bad_value", ["--config.model.variant=vit_zz"], "config.model.variant='vit_zz'"),
    ("no_workdir", "cfm.train", ["--config", DINO], "--workdir is required"),
    # ---- workdir ------------------------------------------------------------------------------
    _train("workdir_is_a_file", [], "is a file, not a folder", workdir="{tmp}/a_file"),
    _train("workdir_below_a_file", [], "a_file is a file", workdir="{tmp}/a_file/run"),
    _train("workdir_in_proc", [], "cannot be created in /proc", workdir="/proc/cfm_test/run"),
    _train("workdir_not_writable", [], "is not writable", workdir=NOT_WRITABLE),
    # ---- data ---------------------------------------------------------------------------------
    _data("folder_missing", "folder", "/nonexistent", "data.path='/nonexistent' is not a folder"),
    _data("folder_empty", "folder", "{tmp}/empty", "holds no .png"),
    _data("folder_of_non_images", "folder", "{tmp}/text", "holds no .png"),
    _data("folder_of_fake_images", "folder", "{tmp}/fake_png", "cannot read image"),
    _data("shards_in_folder_without", "shards", "{tmp}/text", "holds no .array_record"),
    _data("shards_not_array_record", "shards", "{tmp}/fake_shards", "do not read as shards"),
    _data("shards_of_omics_folder", "shards", "{tmp}/omics", "prepare_omics folder"),
    _data("prepared_is_tile_shards", "prepared", "{tmp}/tiles", "not a prepared omics folder",
          MGM),
    # ---- evaluators (config.evals) ------------------------------------------------------------
    _train("eval_data_missing", ["--config.evals.knn.every=5",
                                 "--config.evals.knn.path={tmp}/no_probe"],
           "config.evals.knn.path="),
    # ---- init_from ----------------------------------------------------------------------------
    _train("init_from_missing", ["--config.init_from={tmp}/nothing"], "nothing does not exist"),
    _train("init_from_step_missing", [f"--config.init_from={CHECKPOINT_RUN}",
                                      "--config.init_from_step=7"],
           "init_from_step=7: no such checkpoint"),
    # ---- cfm.finetune -------------------------------------------------------------------------
    _finetune("finetune_missing_config", [], "does not exist", "configs/finetune/nope.py:test"),
    _finetune("finetune_unknown_preset", [], "unknown preset 'nopreset'",
              f"{ROOT}/configs/finetune/icb_response.py:nopreset"),
    _finetune("finetune_misspelt_key", ["--config.modle.dim=3"], "bad command line"),
    _finetune("finetune_workdir_is_a_file", [], "is a file", workdir="{tmp}/a_file"),
    _finetune("finetune_workdir_in_proc", [], "cannot be created", workdir="/proc/cfm_test/run"),
    # ---- cfm.export, cfm.aot ------------------------------------------------------------------
    ("export_missing_step", "cfm.export", ["--workdir", CHECKPOINT_RUN, "--step", "99", "--out",
                                           "{w}", "--format", "safetensors"], "step 99"),
    ("export_out_in_proc", "cfm.export", ["--workdir", CHECKPOINT_RUN, "--out",
                                          "/proc/cfm_test/out", "--format", "safetensors"],
     "--out /proc/cfm_test/out cannot be created"),
    ("aot_unknown_topology", "cfm.aot", ["--config", DINO, "--topology", "v9:2x2"],
     "unknown topology"),
]


def _scratch(tmp) -> None:
    """The bad inputs the cases point at."""
    (tmp / "a_file").write_text("keep me\n")
    (tmp / "broken.py").write_text("def get_config(arg=None):\n    return {\n")
    for name in ("empty", "text", "fake_png", "fake_shards"):
        (tmp / name).mkdir()
    (tmp / "text" / "notes.txt").write_text("not an image\n")
    (tmp / "fake_png" / "tile.png").write_text("not an image\n")
    (tmp / "fake_shards" / "tiles-00000.array_record").write_text("not a shard\n")
    synth = SyntheticSource(2, 32, seed=0)
    _write_shards(tmp / "tiles", [synth[0], synth[1]], per_shard=2)
    rng = np.random.default_rng(0)
    table = {"case_id": [f"S{i:02d}" for i in range(12)]}
    table.update({f"G{g}_rnaseq": rng.standard_normal(12) + 5 for g in range(4)})
    pd.DataFrame(table).to_csv(tmp / "omics.csv", index=False)
    assert prepare_omics.main(["--input", str(tmp / "omics.csv"), "--out", str(tmp / "omics"),
                               "--n-bins", "4", "--expression-transform", "none"]) == 0
    if os.geteuid() != 0:
        (tmp / "readonly").mkdir(mode=0o555)


def _tree(folder) -> dict[str, bytes | None]:
    """Every path under `folder` with its bytes (None for folders)."""
    out: dict[str, bytes | None] = {}
    for root, dirs, files in os.walk(folder):
        out.update({os.path.join(root, d): None for d in dirs})
        for f in files:
            with open(os.path.join(root, f), "rb") as handle:
                out[os.path.join(root, f)] = handle.read()
    return out


def _run(module: str, args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one CPU device: nothing here gets to the mesh
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """{case id: (completed process, module, workdir)}: every case run, two at a time; the scratch
    folder is checked to be byte for byte as it was."""
    tmp = tmp_path_factory.mktemp("cli_errors")
    _scratch(tmp)
    before = _tree(tmp)
    jobs = {}
    for name, module, args, _ in CASES:
        work = tmp / "runs" / name  # never created: runs/ itself must stay absent too
        jobs[name] = (module, [a.format(tmp=tmp, w=work) for a in args], work)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(_run, module, args) for name, (module, args, _) in
                   jobs.items()}
        out = {name: (f.result(), jobs[name][0], jobs[name][2]) for name, f in futures.items()}
    out["__tree__"] = (before, _tree(tmp), None)
    return out


@pytest.mark.parametrize("name, message", [(c[0], c[3]) for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_creates_nothing(results, name, message):
    proc, module, work = results[name]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{module}: ") and message in lines[0], lines[0]
    assert not os.path.exists(work) and not os.path.exists(os.path.dirname(work))


def test_nothing_in_the_scratch_folder_changed(results):
    before, after, _ = results["__tree__"]
    assert after == before  # no workdir, no checkpoints/, no probe folder, a_file unchanged


def test_a_bug_prints_the_traceback_and_where_to_report_it(capsys):
    def broken() -> None:
        raise ZeroDivisionError("inside cfm")

    assert errors.run_cli("cfm.test", broken, {ValueError: "bad input"}) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError: inside cfm" in err
    assert err.strip().splitlines()[-1].startswith("cfm.test: this is a bug in cfm")
    assert errors.ISSUE_TRACKER in err


def test_user_errors_are_labelled_by_the_first_matching_type(capsys):
    class Special(ValueError):
        pass

    def bad() -> None:
        raise Special("two\nlines")

    assert errors.run_cli("cfm.test", bad, {Special: "bad thing", ValueError: "bad value"}) == 2
    assert capsys.readouterr().err == "cfm.test: bad thing: two lines\n"
    assert errors.run_cli("cfm.test", lambda: 3) == 3


def test_check_workdir_creates_nothing(tmp_path):
    errors.check_workdir(str(tmp_path / "new" / "run"))  # creatable: fine
    errors.check_workdir(str(tmp_path))  # existing and writable: fine
    errors.check_workdir("gs://bucket/run")  # left to the storage layer
    assert os.listdir(tmp_path) == []
    with pytest.raises(errors.UserError, match="--out .* is a file"):
        (tmp_path / "f").write_text("x")
        errors.check_workdir(str(tmp_path / "f"), "--out")


def test_init_from_is_checked_only_for_a_new_run(tmp_path):
    config = load_config()
    config.init_from = str(tmp_path / "gone")
    with pytest.raises(init_from.InitFromError, match="gone does not exist"):
        init_from.check_path(config, str(tmp_path / "new_run"))
    (tmp_path / "resumed" / "checkpoints" / "5").mkdir(parents=True)
    init_from.check_path(config, str(tmp_path / "resumed"))  # resuming ignores init_from
