"""Slide–omics alignment across processes: 2 CPU processes x 2 devices train exactly as
1 process x 4 devices (the chunked sigmoid loss's ring then crosses the process boundary).

The harness (worker processes joined by a coordinator on 127.0.0.1, gloo CPU collectives) is
tests/test_multiprocess.py's.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_prep import paired_synthetic
from tests.test_multiprocess import _free_port, _history, _start, _wait_all

# Trains configs/align.py:test for 3 steps into argv[2] after joining the process group in
# argv[1], with the config overrides in argv[3].
_WORKER = """\
import json, sys
from cfm.parallel import distributed
distributed.initialize(**json.loads(sys.argv[1]))
from cfm import train
from tests.conftest import load_config
c = load_config("align.py", "test")
over = {"total_steps": 3, "log_every": 1, "checkpoint_every": 3, "mesh.data": -1,
        "evals.retrieval.every": 0, **json.loads(sys.argv[3])}
for key, value in over.items():
    node = c
    *parents, last = key.split(".")
    for p in parents:
        node = node[p]
    node[last] = value
train.train(c, sys.argv[2])
"""

TERMS = ("loss", "sigmoid", "recon_mse", "grad_norm")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("align_two_runs")
    pairs = tmp_path / "pairs"
    paired_synthetic.generate(str(pairs), patients=24, grid=4, n_genes=12, dim=8)
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    multi, single = tmp_path / "multi", tmp_path / "single"
    coordinator = f"127.0.0.1:{_free_port()}"
    data = {"data.path": str(pairs)}
    procs = [_start(script, {"coordinator": coordinator, "num_processes": 2, "process_id": i},
                    multi, 2, tmp_path / f"worker{i}.log", dict(data, **{"mesh.slices": 2}))
             for i in range(2)]
    procs.append(_start(script, {}, single, 4, tmp_path / "single.log", data))
    _wait_all(procs)
    return multi, single, [log.read_text() for _, log in procs]


def test_two_processes_match_one_process(two_runs):
    multi, single, logs = two_runs
    assert "cfm.distributed: 2 processes joined" in logs[0], logs[0]
    a, b = _history(multi), _history(single)
    assert [h["step"] for h in a] == [h["step"] for h in b] == [1, 2, 3], (a, b)
    for ha, hb in zip(a, b):
        for k in TERMS:
            np.testing.assert_allclose(ha[k], hb[k], rtol=1e-5, err_msg=f"step {ha['step']} {k}")
    assert json.loads((multi / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3
