"""cfm.federated with secure aggregation (Flower's SecAgg+, cfm.federated.secagg): the same
optimum as plain FedAvg within quantisation tolerance, the secure mean against numpy's weighted
mean of the sites' plain updates, only masked vectors leaving a site, DP clipping before
masking, and one-line errors for settings SecAgg+ cannot run with.

Every run is the real ServerApp loop and ClientApp on cfm.federated.grid's in-process Grid (each
message serialised to its protobuf bytes and back), three CSV sites of a logistic model."""

import numpy as np
import pandas as pd
import pytest
from flwr.common import bytes_to_ndarray
from flwr.common.serde import message_from_proto
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611

from cfm import config_loader
from cfm.federated import __main__ as fed_main
from cfm.federated import client, grid, secagg, server
from cfm.federated import model as fmodel
from cfm.federated.model import flatten, from_record
from cfm.federated.sites import FederatedError

SPEC = "configs/federated.py:test"
SITES = ("north", "south", "east")
N = (20, 30, 40)
ON = "--config.secure_aggregation.enabled=True"


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    """Three CSV sites (20, 30, 40 patients) of a logistic model, shifted features."""
    d = tmp_path_factory.mktemp("sites")
    rng = np.random.default_rng(1)
    for i, (s, n) in enumerate(zip(SITES, N)):
        x = rng.normal(size=(n, 4)) + 0.5 * i
        y = (rng.random(n) < 1 / (1 + np.exp(-(x @ [1.0, -0.5, 0.8, 0.3] - 0.5)))).astype(int)
        df = pd.DataFrame(x, columns=[f"g{j}" for j in range(4)])
        df.insert(0, "patient_id", [f"PATIENT-{s}-{k:04d}" for k in range(n)])
        df["label"] = y
        df.to_csv(d / f"{s}.csv", index=False)
    return str(d)


def _overrides(path, *extra):
    return [f"--config.data.path={path}", f"--config.data.sites={','.join(SITES)}", *extra]


def _run(path, workdir, *extra):
    ov = _overrides(path, *extra)
    g = grid.LocalGrid({100 + i: (client.app, {"cfm-config": SPEC, "cfm-overrides": " ".join(ov),
                                               "site": s}) for i, s in enumerate(SITES)})
    res = server.run_server(g, config_loader.load_config(SPEC, ov), str(workdir),
                            log=lambda m: None)
    return res, g


def _vector(params):
    p = flatten(params)
    return np.concatenate([p[k].ravel() for k in sorted(p)])


@pytest.fixture
def updates(monkeypatch):
    """Every site's plain local update as the ClientApp computes it: (site, w, w_k) per call."""
    calls, real = [], fmodel.local_update

    def spy(config, params, site, mu, seed):
        new, loss = real(config, params, site, mu, seed)
        calls.append((site.name, params, new))
        return new, loss

    monkeypatch.setattr(fmodel, "local_update", spy)
    return calls


def _parse(raw):
    proto = ProtoMessage()
    proto.ParseFromString(raw)
    return message_from_proto(proto)


def _sent_params(g, node=100):
    """The global parameters sent to `node` each round (the collect stage's train message)."""
    return [flatten(from_record(m.content["arrays"])) for d, n, _, m in g.log
            if d == "to_site" and n == node and "arrays" in m.content]


def test_secagg_ends_where_plain_fedavg_ends(path, tmp_path):
    plain, _ = _run(path, tmp_path / "plain", "--config.server.rounds=60")
    secure, g = _run(path, tmp_path / "secure", "--config.server.rounds=60", ON)
    # quantisation: step 2C/Q = 3.8e-6 of a weighted update, / the total weight 0.09, stochastic
    # rounding: ~4e-5 per round and coordinate, damped by gradient descent; 1e-3 is ~10 std
    np.testing.assert_allclose(_vector(secure["params"]), _vector(plain["params"]), atol=1e-3)
    assert not np.array_equal(_vector(secure["params"]), _vector(plain["params"]))
    stages = [_parse(raw).content["secaggplus_configs"]["stage"] for d, _, raw, _ in g.log
              if d == "to_site"]  # the logged Message: as the site's mods left it; raw: as sent
    assert stages[:12] == ["setup"] * 3 + ["share_keys"] * 3 + ["collect_masked_vectors"] * 3 \
        + ["unmask"] * 3 and len(stages) == 60 * 12


def test_sites_send_only_masked_vectors(path, tmp_path, updates):
    res, g = _run(path, tmp_path / "w", "--config.server.rounds=2", ON)
    out = [(n, raw, m) for d, n, raw, m in g.log if d == "from_site"]
    assert len(out) == 2 * 4 * 3 and len(updates) == 2 * 3
    plain = [(_vector(new) - _vector(old)).astype(np.float32) for _, old, new in updates]
    for n, raw, m in out:
        assert all(len(r) == 0 for r in m.content.array_records.values())  # no plain arrays
        for r in m.content.metric_records.values():  # a site's weight travels masked only
            assert dict(r) == {"num_examples": 0}
        assert set(m.content.config_records) <= {"secaggplus_configs", "fitres.metrics",
                                                 "fitres.status"}
        assert not dict(m.content.config_records.get("fitres.metrics", {}))
        assert b"PATIENT" not in raw and not any(s.encode() in raw for s in SITES)
        for _, old, new in updates:
            assert _vector(new).tobytes() not in raw
        for u in plain:
            assert u.tobytes() not in raw and u[:2].tobytes() not in raw
    # the masked vectors are far from the quantised plain ones (Flower: weight factor first,
    # then (clip(n_k / max_weight * update) + C) * Q / 2C, here the update then the loss)
    masked = [[bytes_to_ndarray(b) for b in m.content["secaggplus_configs"]["masked_params"]]
              for _, _, m in out if "masked_params" in m.content["secaggplus_configs"]]
    assert len(masked) == len(updates)
    c, q = 8.0, 2 ** 22
    for vec, (site, _, _), u in zip(masked, updates, plain):
        w = N[SITES.index(site)] / 1000.0
        expect = (np.clip(w * u, -c, c) + c) * q / (2 * c)
        got = np.concatenate([v.ravel() for v in vec[1:-1]])
        assert got.shape == expect.shape and np.all(np.abs(got - expect) > 4)
        assert abs(int(vec[0][0]) - round(w * q)) > 4
    # the server's secure mean is numpy's patient-weighted mean of the plain updates
    sent = _sent_params(g)
    step = np.concatenate([sent[1][k].ravel() - sent[0][k].ravel() for k in sorted(sent[0])])
    ref = np.average(plain[:3], axis=0, weights=[N[SITES.index(s)] for s, _, _ in updates[:3]])
    np.testing.assert_allclose(step, ref, atol=2e-4)
    assert not np.allclose(step, np.mean(plain[:3], axis=0), atol=2e-4)  # weighted, not equal


def test_dp_clips_before_masking(path, tmp_path, updates):
    clip = 0.05
    res, g = _run(path, tmp_path / "w", "--config.server.rounds=1", ON,
                  "--config.dp.enabled=True", f"--config.dp.clip={clip}",
                  "--config.dp.noise_multiplier=1e-6")
    plain = [_vector(new) - _vector(old) for _, old, new in updates]
    assert min(np.linalg.norm(u) for u in plain) > 2 * clip  # clipping changes every update
    ref = np.mean([u * min(1.0, clip / np.linalg.norm(u)) for u in plain], axis=0)  # equal
    step = _vector(res["params"]) - _vector(from_record(next(
        m.content["arrays"] for d, _, _, m in g.log if d == "to_site" and "arrays" in m.content)))
    np.testing.assert_allclose(step, ref, atol=1e-5)


@pytest.mark.parametrize("setting, message", [
    ("reconstruction_threshold=4", r"reconstruction_threshold=4.0: 4 shares needed but only 3"),
    ("num_shares=5", r"num_shares=5.0: 5 shares per site but only 3 sites"),
    ("num_shares=2", r"num_shares.* must be greater than 2"),
    ("reconstruction_threshold=2.5", r"reconstruction_threshold=2.5: use a fraction"),
    ("quantization_range=2147483648", r"quantization_range=2147483648: .* < 2\*\*32"),
    ("clipping_range=0", r"clipping_range=0.0 .* must be > 0"),
])
def test_bad_settings_are_refused(path, setting, message):
    cfg = config_loader.load_config(SPEC, _overrides(path, ON,
                                                     f"--config.secure_aggregation.{setting}"))
    with pytest.raises(FederatedError, match=message) as e:
        secagg.check_config(cfg, len(SITES))
    assert "\n" not in str(e.value)


def test_bad_setting_cli_one_line(path, tmp_path, capsys):
    code = fed_main.main(["cfm.federated", "server", "--config", SPEC, *_overrides(path, ON),
                          "--config.secure_aggregation.reconstruction_threshold=4",
                          "--workdir", str(tmp_path / "w")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "reconstruction_threshold" in err[0]
    with pytest.raises(FederatedError, match="4 shares needed"):  # the ServerApp refuses too
        _run(path, tmp_path / "w2", ON, "--config.secure_aggregation.reconstruction_threshold=4")
