"""Federated vs centralised vs site-local training on the real cohorts of ../shared/data.

    python benchmarks/federated.py [--rounds 30] [--data ../shared/data] [--cohorts ...]

- ICB response (configs/federated.py:icb, FusionModel, binary head): leave-one-cohort-out;
  for each held-out cohort T the other cohorts are the sites. federated = FedAvg over the
  sites; centralised = the same model trained on the pooled sites' patients for as many
  full-batch steps (rounds x local steps); site-local = each site alone (the mean of the
  sites' AUCs on T is reported, and the best). AUC on T.
- TCGA survival (configs/federated.py:tcga, Cox head): BLCA, LUAD, KIRC are the sites, each
  keeping 30% of its patients out (`data.holdout`); Harrell's c-index on each site's held-out
  patients, for federated, centralised (pooled training parts) and the site's own model.

The federations run on cfm.federated.grid's in-process Grid (the real ServerApp loop and
ClientApp, every message serialised), so bytes per round are the wire's; wall time excludes
process start-up (docs/federated.md has a real-process run). The last line is the ratio of the
mean federated to the mean centralised metric.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cfm import cli_help, config_loader  # noqa: E402
from cfm.evaluate.metrics import c_index, roc_auc  # noqa: E402
from cfm.federated import client, grid, model, server, sites  # noqa: E402
from cfm.finetune.fusion_train import pad_bucket, pad_rows  # noqa: E402

SPEC = "configs/federated.py"
# ../shared/data beside the project: the default --data of the benchmarks on real cohorts
SHARED_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..",
                           "shared", "data")


def pooled(parts: list) -> sites.SiteData:
    """One SiteData of several sites' (locally standardised) patients."""
    feats = {k: np.concatenate([p.feats[k][p.rows[:p.n]] for p in parts])
             for k in parts[0].feats if k in ("omics", "omics_mask", "clinical",
                                                "clinical_mask")}
    tg = {k: np.concatenate([p.targets[k][p.rows[:p.n]] for p in parts])
          for k in parts[0].targets}
    n = sum(p.n for p in parts)
    idx, w = pad_rows(np.arange(n), pad_bucket(n))
    return dataclasses.replace(parts[0], name="pooled", n=n, feats=feats, rows=idx, weight=w,
                               targets=tg)


def trained(config, site: sites.SiteData, steps: int) -> dict:
    """`steps` full-batch steps from the round-0 parameters on one (pooled) site."""
    cfg = copy.deepcopy(config)
    with cfg.unlocked():
        cfg.train.local_steps = steps
    n_clin = site.feats["clinical"].shape[1] if "clinical" in site.feats else 0
    p0 = model.init_params(cfg, site.feats["omics"].shape[1], n_clin)
    return model.local_update(cfg, p0, site, 0.0, int(cfg.seed))[0]


def federate(spec: str, overrides: list[str], names: list[str], workdir: str) -> dict:
    cfg = config_loader.load_config(spec, overrides)
    g = grid.LocalGrid({100 + i: (client.app, {"cfm-config": spec,
                                               "cfm-overrides": " ".join(overrides),
                                               "site": s})
                        for i, s in enumerate(sites.split_list(cfg.data.sites))})
    shutil.rmtree(workdir, ignore_errors=True)
    t0 = time.time()
    res = server.run_server(g, cfg, workdir, log=lambda m: None)
    res["wall_s"] = time.time() - t0
    ins = [len(raw) for d, _, raw, _ in g.log if d == "to_site"]
    outs = [len(raw) for d, _, raw, _ in g.log if d == "from_site"]
    res["bytes_per_round"] = (sum(ins) + sum(outs)) / res["rounds"]
    return res


def icb(args, tmp: str) -> list[float]:
    base = [f"--config.data.path={args.data}", f"--config.server.rounds={args.rounds}"]
    all_sites = args.cohorts.split(",")
    cfg = config_loader.load_config(f"{SPEC}:icb", base + [
        f"--config.data.sites={','.join(all_sites)}"])
    names = sites.feature_names(cfg)
    feat_file = os.path.join(tmp, "icb_features.txt")
    with open(feat_file, "w", encoding="utf-8") as fh:
        fh.write("\n".join(names) + "\n")
    print(f"ICB response, leave-one-cohort-out, {len(names)} genes, {args.rounds} rounds x "
          f"{cfg.train.local_steps} local steps, FedAvg\n")
    print("| held-out cohort | sites | federated AUC | centralised AUC | site-local AUC mean "
          "(best) | bytes/round | wall s |")
    print("|---|---|---|---|---|---|---|")
    fed_all, cen_all = [], []
    for test in all_sites:
        train_sites = [s for s in all_sites if s != test]
        ov = base + [f"--config.data.sites={','.join(train_sites)}",
                     f"--config.data.test_cohort={test}", f"--config.data.features={feat_file}"]
        c = config_loader.load_config(f"{SPEC}:icb", ov)
        t = sites.site_data(c, test, names)
        y = t.targets["y"][t.rows[:t.n]]
        res = federate(f"{SPEC}:icb", ov, names, os.path.join(tmp, f"icb_{test}"))
        fed = roc_auc(y, model.predict(c, res["params"], t))
        parts = [sites.site_data(c, s, names) for s in train_sites]
        steps = args.rounds * c.train.local_steps
        cen = roc_auc(y, model.predict(c, trained(c, pooled(parts), steps), t))
        loc = [roc_auc(y, model.predict(c, trained(c, p, steps), t)) for p in parts]
        fed_all.append(fed)
        cen_all.append(cen)
        print(f"| {test} ({t.n}) | {len(train_sites)} | {fed:.3f} | {cen:.3f} | "
              f"{np.mean(loc):.3f} ({max(loc):.3f}) | {res['bytes_per_round']:.0f} | "
              f"{res['wall_s']:.1f} |", flush=True)
    print(f"\nmean over held-out cohorts: federated {np.mean(fed_all):.3f}, centralised "
          f"{np.mean(cen_all):.3f}\n")
    return [np.mean(fed_all), np.mean(cen_all)]


def tcga(args, tmp: str) -> list[float]:
    ov = [f"--config.data.path={args.data}", f"--config.server.rounds={args.rounds}",
          "--config.data.holdout=0.3"]
    c = config_loader.load_config(f"{SPEC}:tcga", ov)
    names = sites.feature_names(c)
    print(f"TCGA overall survival, sites BLCA / LUAD / KIRC, 30% of each site held out, "
          f"{len(names)} common features, {args.rounds} rounds x {c.train.local_steps} local "
          "steps, FedAvg\n")
    res = federate(f"{SPEC}:tcga", ov, names, os.path.join(tmp, "tcga"))
    splits = {s: sites.site_split(c, s, names) for s in sites.split_list(c.data.sites)}
    steps = args.rounds * c.train.local_steps
    cen_p = trained(c, pooled([tr for tr, _ in splits.values()]), steps)
    print("| site (held-out patients) | federated c-index | centralised c-index | "
          "site-local c-index |")
    print("|---|---|---|---|")
    fed_all, cen_all = [], []
    for s, (tr, te) in splits.items():
        r = te.rows[:te.n]
        ci = lambda p: c_index(te.targets["time"][r], te.targets["event"][r],  # noqa: E731
                               model.predict(c, p, te))
        fed, cen, loc = ci(res["params"]), ci(cen_p), ci(trained(c, tr, steps))
        fed_all.append(fed)
        cen_all.append(cen)
        print(f"| {s.upper()} ({te.n}) | {fed:.3f} | {cen:.3f} | {loc:.3f} |")
    print(f"\nbytes/round {res['bytes_per_round']:.0f}, wall {res['wall_s']:.1f} s for "
          f"{res['rounds']} rounds\n")
    return [np.mean(fed_all), np.mean(cen_all)]


def main() -> None:
    p = cli_help.parser("benchmarks.federated", __doc__,
                        "python -m benchmarks.federated --data ../shared/data --rounds 30")
    p.add_argument("--data", default=SHARED_DATA, help="the shared data folder (icb/, tcga/)")
    p.add_argument("--rounds", type=int, default=30, help="server rounds of each run")
    p.add_argument("--cohorts", default="Hugo,Riaz,Van_Allen,Mariathasan,Miao,Padron",
                   help="ICB cohorts, each a site and in turn the held-out cohort")
    p.add_argument("--skip", default="",
                   help="icb or tcga: leave that part out (default: run both)")
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="cfm_fed_bench_")
    try:
        out = []
        if args.skip != "icb":
            out.append(icb(args, tmp))
        if args.skip != "tcga":
            out.append(tcga(args, tmp))
        f, c = np.mean([o[0] for o in out]), np.mean([o[1] for o in out])
        print(f"federated / centralised (mean AUC and c-index): {f / c:.3f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
