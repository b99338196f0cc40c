"""The cost of secure aggregation (Flower's SecAgg+, cfm.federated.secagg) on ICB response.

    python -m benchmarks.federated_secagg [--rounds 10] [--data ../shared/data]

configs/federated.py:icb (FusionModel, FedAvg, 5 local AdamW steps a round), the five sites
Hugo, Riaz, Van_Allen, Miao, Padron, Mariathasan held out; the same federation run without and
with `secure_aggregation.enabled` on cfm.federated.grid's in-process Grid (the real ServerApp
loop and ClientApp, every message serialised: bytes are the wire's; no process start-up, so
wall time is compute: local steps, masking, Shamir shares, unmasking). Prints bytes a round
(all messages, both directions, SecAgg+'s four stages included), the median wall time of
rounds 2.. (round 1 compiles), the largest difference of the final parameters and the
held-out AUC of each; the last line is the ratio of wall time a round, with / without.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.federated import SHARED_DATA, SPEC, federate  # noqa: E402
from cfm import cli_help, config_loader  # noqa: E402
from cfm.evaluate.metrics import roc_auc  # noqa: E402
from cfm.federated import model, sites  # noqa: E402

SITES = "Hugo,Riaz,Van_Allen,Miao,Padron"
TEST = "Mariathasan"


def run(args, tmp: str, secure: bool) -> dict:
    """One federation; bytes a round, median wall s of rounds 2.., final parameters, AUC."""
    ov = [f"--config.data.path={args.data}", f"--config.server.rounds={args.rounds}",
          f"--config.data.sites={SITES}", f"--config.data.test_cohort={TEST}",
          f"--config.secure_aggregation.enabled={secure}"]
    cfg = config_loader.load_config(f"{SPEC}:icb", ov)
    names = sites.feature_names(cfg)
    workdir = os.path.join(tmp, "secure" if secure else "plain")
    res = federate(f"{SPEC}:icb", ov, names, workdir)
    with open(os.path.join(workdir, "history.jsonl"), encoding="utf-8") as fh:
        walls = [json.loads(ln)["wall_s"] for ln in fh]
    t = sites.site_data(cfg, TEST, names)
    auc = roc_auc(t.targets["y"][t.rows[:t.n]], model.predict(cfg, res["params"], t))
    vec = np.concatenate([v.ravel() for _, v in sorted(model.flatten(res["params"]).items())])
    return {"bytes": res["bytes_per_round"], "wall": float(np.median(walls[1:] or walls)),
            "params": vec, "auc": auc}


def main() -> None:
    p = cli_help.parser("benchmarks.federated_secagg", __doc__,
                        "python -m benchmarks.federated_secagg --data ../shared/data --rounds 10")
    for flag, default, what in (("--data", SHARED_DATA, "the shared data folder (icb/)"),
                                ("--rounds", 10, "server rounds of each run")):
        p.add_argument(flag, type=type(default), default=default, help=what)
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="cfm_secagg_bench_")
    try:
        plain, secure = run(args, tmp, False), run(args, tmp, True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"ICB response, sites {SITES}, {TEST} held out, {args.rounds} rounds, FedAvg\n")
    print("| | bytes/round | wall s/round (median, rounds 2..) | held-out AUC |")
    print("|---|---|---|---|")
    for name, r in (("plain FedAvg", plain), ("SecAgg+", secure)):
        print(f"| {name} | {r['bytes']:,.0f} | {r['wall']:.3f} | {r['auc']:.3f} |")
    diff = np.abs(secure["params"] - plain["params"]).max()
    print(f"\nlargest final parameter difference: {diff:.2e} ({plain['params'].size} parameters)")
    print(f"bytes ratio: {secure['bytes'] / plain['bytes']:.3f}")
    print(f"SecAgg+ / plain wall time a round: {secure['wall'] / plain['wall']:.2f}")


if __name__ == "__main__":
    main()
