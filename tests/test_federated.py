"""cfm.federated: convergence to the centralised optimum, what leaves a site, DP noise and
accounting, server resume, client rejoin, and the one-line errors.

All but `test_real_processes` run the real ServerApp loop and ClientApp on cfm.federated.grid's
in-process Grid (every message serialised to its protobuf bytes and back); one test starts real
SuperLink / SuperNode processes (`python -m cfm.federated local`)."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression

from cfm import config_loader
from cfm.federated import client, grid, server
from cfm.federated import __main__ as fed_main
from cfm.federated.model import flatten, from_record
from cfm.federated.sites import FederatedError

SPEC = "configs/federated.py:test"
SITES = ("north", "south", "east")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Three CSV sites of a logistic model with shifted features (non-iid), patient ids."""
    d = tmp_path_factory.mktemp("sites")
    rng = np.random.default_rng(0)
    w = np.array([1.0, -0.5, 0.8, 0.3])
    xs, ys = [], []
    for i, s in enumerate(SITES):
        n = 20 + 10 * i
        x = rng.normal(size=(n, 4)) + 0.5 * i
        y = (rng.random(n) < 1 / (1 + np.exp(-(x @ w - 0.5)))).astype(int)
        df = pd.DataFrame(x, columns=[f"g{j}" for j in range(4)])
        df.insert(0, "patient_id", [f"PATIENT-{s}-{k:04d}" for k in range(n)])
        df["label"] = y
        df.to_csv(d / f"{s}.csv", index=False)
        xs.append(x.astype(np.float32))
        ys.append(y)
    return str(d), xs, ys


def _overrides(path, *extra):
    return [f"--config.data.path={path}", f"--config.data.sites={','.join(SITES)}", *extra]


def _run(path, workdir, *extra, drop=None, overrides_per_site=None):
    ov = _overrides(path, *extra)
    sites = {}
    for i, s in enumerate(SITES):
        o = ov + (overrides_per_site or {}).get(s, [])
        sites[100 + i] = (client.app, {"cfm-config": SPEC, "cfm-overrides": " ".join(o),
                                       "site": s})
    g = grid.LocalGrid(sites)
    g.drop = dict(drop or {})
    res = server.run_server(g, config_loader.load_config(SPEC, ov), str(workdir),
                            log=lambda m: None)
    return res, g


def _kernel(res):
    p = flatten(res["params"])
    return np.concatenate([p["head.kernel"].ravel(), p["head.bias"].ravel()])


@pytest.fixture(scope="module")
def fedavg(data, tmp_path_factory):
    """100 FedAvg rounds (the test preset) and its workdir."""
    w = tmp_path_factory.mktemp("fedavg") / "w"
    return _run(data[0], w)[0], w


def test_fedavg_reaches_centralised_optimum(data, fedavg):
    _, xs, ys = data
    res, w = fedavg
    x, y = np.concatenate(xs), np.concatenate(ys)
    ref = LogisticRegression(C=1 / (0.05 * len(x)), tol=1e-10, max_iter=10000).fit(x, y)
    np.testing.assert_allclose(_kernel(res), np.r_[ref.coef_.ravel(), ref.intercept_],
                               atol=2e-3)
    hist = [json.loads(ln) for ln in open(w / "history.jsonl")]
    assert [h["round"] for h in hist] == list(range(1, 101))
    assert all(h["bytes_sent"] > 0 and h["bytes_received"] > 0 for h in hist)


def test_fedadam_and_fedprox_approach_optimum(data, fedavg, tmp_path):
    path, ref = data[0], fedavg[0]
    adam, _ = _run(path, tmp_path / "adam", "--config.server.strategy=fedadam",
                   "--config.server.lr=0.05", "--config.server.rounds=150")
    prox, _ = _run(path, tmp_path / "prox", "--config.server.strategy=fedprox",
                   "--config.server.mu=0.1", "--config.train.local_steps=3",
                   "--config.train.lr=0.3")
    np.testing.assert_allclose(_kernel(adam), _kernel(ref), atol=0.05)
    np.testing.assert_allclose(_kernel(prox), _kernel(ref), atol=0.05)


def test_only_model_updates_leave_a_site(data, tmp_path):
    path, xs, _ = data
    res, g = _run(path, tmp_path / "w", "--config.server.rounds=2")
    out = [(node, raw, m) for d, node, raw, m in g.log if d == "from_site"]
    assert len(out) == 6
    names = set(flatten(res["params"]))
    for _, raw, m in out:
        assert set(m.content.keys()) == {"arrays", "metrics"}
        assert set(m.content["arrays"].keys()) == names
        assert set(m.content["metrics"].keys()) == {"num-examples", "train_loss"}
        for s in SITES:
            assert s.encode() not in raw
        assert b"PATIENT" not in raw
        for x in xs:  # no patient's feature row, nor any single raw value, as float32
            for row in x:
                assert row.tobytes() not in raw
                assert row[0].tobytes() not in raw


def test_dp_noise_scale_and_epsilon(data, tmp_path):
    path, _, _ = data
    sigma, clip, rounds = 1.5, 0.2, 60
    res, g = _run(path, tmp_path / "w", "--config.dp.enabled=True", "--config.train.lr=1e-4",
                  f"--config.dp.noise_multiplier={sigma}", f"--config.dp.clip={clip}",
                  f"--config.server.rounds={rounds}")
    cfg = config_loader.load_config(SPEC, ["--config.dp.noise_multiplier=1.5",
                                           "--config.dp.clip=0.2"])
    assert server.noise_std(cfg, 3) == pytest.approx(sigma * clip / 3)
    # lr ~0: the sites' updates are ~0, so each round's change is the server's noise alone
    sent = [flatten(from_record(m.content["arrays"])) for d, _, _, m in g.log
            if d == "to_site" and m.metadata.dst_node_id == 100]
    sent.append(flatten(res["params"]))
    steps = np.concatenate([np.concatenate([b[k].ravel() - a[k].ravel() for k in sorted(a)])
                            for a, b in zip(sent[:-1], sent[1:])])
    assert len(steps) == rounds * 5
    assert np.std(steps) == pytest.approx(sigma * clip / 3, rel=0.2)
    assert abs(np.mean(steps)) < 3 * sigma * clip / 3 / np.sqrt(len(steps))
    from dp_accounting import dp_event, rdp
    acc = rdp.RdpAccountant()
    acc.compose(dp_event.GaussianDpEvent(sigma), rounds)
    assert res["epsilon"] == pytest.approx(acc.get_epsilon(1e-3), rel=1e-6)


def test_dp_clips_each_site_update(data, tmp_path):
    path, _, _ = data
    _, g = _run(path, tmp_path / "w", "--config.dp.enabled=True", "--config.dp.clip=0.05",
                "--config.server.rounds=1")
    sent = {n: flatten(from_record(m.content["arrays"])) for d, n, _, m in g.log
            if d == "to_site"}
    for d, n, _, m in g.log:
        if d == "from_site":
            got = flatten(from_record(m.content["arrays"]))
            norm = np.sqrt(sum(np.sum((got[k] - sent[n][k]) ** 2) for k in got))
            assert norm == pytest.approx(0.05, rel=1e-4)  # unclipped updates are larger


def test_server_resumes_after_kill(data, tmp_path):
    path, _, _ = data
    whole, _ = _run(path, tmp_path / "whole", "--config.server.rounds=30",
                    "--config.server.checkpoint_every=4")

    class Killed(BaseException):
        pass

    class KillAt(grid.LocalGrid):
        def send_and_receive(self, messages, *, timeout=None):
            msgs = list(messages)
            if msgs[0].metadata.group_id == "15":
                raise Killed()
            return super().send_and_receive(msgs, timeout=timeout)

    ov = _overrides(path, "--config.server.rounds=30", "--config.server.checkpoint_every=4")
    sites = {100 + i: (client.app, {"cfm-config": SPEC, "cfm-overrides": " ".join(ov),
                                    "site": s}) for i, s in enumerate(SITES)}
    with pytest.raises(Killed):
        server.run_server(KillAt(sites), config_loader.load_config(SPEC, ov),
                          str(tmp_path / "w"), log=lambda m: None)
    assert len(open(tmp_path / "w" / "history.jsonl").readlines()) == 14
    logs = []
    res = server.run_server(grid.LocalGrid(sites), config_loader.load_config(SPEC, ov),
                            str(tmp_path / "w"), log=logs.append)
    assert "resumed after round 12" in logs[0]
    np.testing.assert_array_equal(_kernel(res), _kernel(whole))
    assert [json.loads(ln)["round"] for ln in open(tmp_path / "w" / "history.jsonl")] == \
        list(range(1, 31))


def test_killed_client_rejoins(data, tmp_path):
    path, _, _ = data
    whole, _ = _run(path, tmp_path / "whole", "--config.server.rounds=20")
    res, g = _run(path, tmp_path / "w", "--config.server.rounds=20", drop={101: 2})
    np.testing.assert_array_equal(_kernel(res), _kernel(whole))  # its rounds were sent again
    assert sum(1 for d, *_ in g.log if d == "to_site") == 3 * 22


def test_model_config_mismatch_names_the_keys(data, tmp_path):
    path, _, _ = data
    with pytest.raises(FederatedError, match=r"site 'south'.*differs.*model\.kind"):
        _run(path, tmp_path / "w", overrides_per_site={"south": ["--config.model.kind=fusion"]})


def test_site_without_data(data, tmp_path, capsys):
    path, _, _ = data
    with pytest.raises(FederatedError, match="site 'west' has no data"):
        client.load_site(SPEC, " ".join(_overrides(path)), "west")
    assert fed_main.main(["cfm.federated", "client", "--config", SPEC, *_overrides(path),
                          "--site", "west"]) == 2
    assert "west" in capsys.readouterr().err


def test_unreachable_server(data, capsys):
    path, _, _ = data
    from launch.local import free_port
    code = fed_main.main(["cfm.federated", "client", "--config", SPEC, *_overrides(path),
                          f"--config.server.address=127.0.0.1:{free_port()}",
                          "--site", "north", "--wait", "0.5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "unreachable" in err[0]


def test_real_processes(data, tmp_path):
    """SuperLink + ServerApp + two SuperNodes as real processes: one round (each ClientApp
    message starts a process that imports JAX: ~10 s a round on 2 cores)."""
    path, _, _ = data
    from launch.local import free_port
    w = tmp_path / "w"
    proc = subprocess.run(
        [sys.executable, "-m", "cfm.federated", "local", "--config", SPEC, *_overrides(path),
         "--config.data.sites=north,south", "--config.server.rounds=1",
         f"--config.server.address=127.0.0.1:{free_port()}",
         "--workdir", str(w)], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert json.load(open(w / "result.json"))["rounds"] == 1
    assert json.loads(open(w / "history.jsonl").readline())["sites"] == 2
