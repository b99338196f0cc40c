"""Federated vs site-local continued masked-gene pretraining on TCGA (configs/federated.py:
tcga_mgm): BLCA, LUAD and KIRC are the sites, each holding out 20% of its patients.

    python -m benchmarks.federated_pretrain --init-from EXPORT [--rounds 10]
        [--reference-workdir RUN]

From the omics export EXPORT (its MGM head is not exported, so every run starts with the same
fresh head): federated = FedAvg over the three sites for `--rounds` rounds of the preset's
local steps; site-local = each site alone for as many rounds and steps (a one-site federation:
the same optimiser, its state reset every round). Reported: the mean masked-gene loss on each
site's held-out patients (the same masked tokens for every model) before any round, after the
federation and after site-local training; with `--reference-workdir` (the cfm.train run EXPORT
came from) also its checkpoint's backbone with its own trained head. The federations run on
cfm.federated.grid's in-process Grid (the real ServerApp loop and ClientApp). The last line is
the ratio of the mean federated to the mean site-local held-out loss (< 1: federation helps).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.federated import SHARED_DATA, federate  # noqa: E402
from cfm import cli_help, config_loader, init_from  # noqa: E402
from cfm.federated import pretrain  # noqa: E402

SPEC = "configs/federated.py:tcga_mgm"


def _history(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "history.jsonl"), encoding="utf-8") as fh:
        return [json.loads(ln) for ln in fh]


def main() -> None:
    p = cli_help.parser("benchmarks.federated_pretrain", __doc__,
                        "python -m benchmarks.federated_pretrain --init-from /tmp/tcga_export")
    p.add_argument("--init-from", required=True, help="an omics export (python -m cfm.export)")
    p.add_argument("--rounds", type=int, default=10, help="server rounds of each run")
    p.add_argument("--data", default=os.path.join(SHARED_DATA, "tcga"),
                   help="the folder of the tcga_<site>_multiomics.csv.gz tables")
    p.add_argument("--reference-workdir", default="",
                   help="the cfm.train run of --init-from, for its own head (default: none)")
    args = p.parse_args()
    base = [f"--config.model.init_from={args.init_from}", f"--config.data.path={args.data}",
            f"--config.server.rounds={args.rounds}", "--config.server.checkpoint_every=1000"]
    config = config_loader.load_config(SPEC, base)
    names = config.data.sites.split(",")
    tmp = tempfile.mkdtemp(prefix="cfm_fedpre_bench_")
    try:
        fed = federate(SPEC, base, names, os.path.join(tmp, "fed"))
        hist = _history(os.path.join(tmp, "fed"))
        before = {s: hist[0]["heldout_loss"][str(100 + i)] for i, s in enumerate(names)}
        after = {s: hist[-1]["heldout_loss"][str(100 + i)] for i, s in enumerate(names)}
        local, wall = {}, 0.0
        for s in names:
            res = federate(SPEC, base + [f"--config.data.sites={s}"], [s],
                           os.path.join(tmp, f"local_{s}"))
            local[s] = _history(os.path.join(tmp, f"local_{s}"))[-1]["heldout_loss"]["100"]
            wall += res["wall_s"]
        ref = {}
        if args.reference_workdir:
            params = init_from.read_checkpoint_params(args.reference_workdir)[1]
            ref = {s: pretrain.heldout_loss(config, params, pretrain.site_data(config, s))["loss"]
                   for s in names}
        t = config.train
        print(f"Continued MGM pretraining from {args.init_from}: {args.rounds} rounds x "
              f"{t.local_steps} local AdamW steps of {t.batch_size} patients (lr {t.lr}), "
              f"FedAvg; held-out masked-gene loss (mask ratio "
              f"{pretrain.source(config).mgm_config.mgm.mask_ratio})\n")
        print("| site (held-out patients) | round 0 | federated | site-local |"
              + (" export's own run (trained head) |" if ref else ""))
        print("|---|---|---|---|" + ("---|" if ref else ""))
        for s in names:
            n = pretrain.site_data(config, s).n_heldout
            print(f"| {s.upper()} ({n}) | {before[s]:.3f} | {after[s]:.3f} | {local[s]:.3f} |"
                  + (f" {ref[s]:.3f} |" if ref else ""))
        print(f"\nfederated: {fed['wall_s']:.0f} s, {fed['bytes_per_round'] / 1e6:.1f} MB a "
              f"round; site-local: {wall:.0f} s in all")
        f, lo = np.mean(list(after.values())), np.mean(list(local.values()))
        print(f"federated / site-local held-out masked loss (mean of sites): {f / lo:.3f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
