"""The fusion tasks evaluated wider than one test cohort (issue 17, item 4), with and without
a pretrained omics encoder, beside the signatures and the linear baselines.

    python -m benchmarks.fusion_eval --part icb --encoder /tmp/enc_tcga [--seeds 0,1,2]
    python -m benchmarks.fusion_eval --part tcga --encoder /tmp/enc_tcga

- `icb`: leave-one-cohort-out over every visible ICB cohort with at least `--min-responders`
  responders (each in turn the test cohort, `configs/finetune/icb_response.py:loco` trained on
  all the others). Per cohort: AUC with its 95% bootstrap CI for cfm_fusion on the raw genes,
  cfm_fusion and cfm_probe on the encoder (frozen CLS), pooled logistic regression and the
  CD274 / IFN-gamma 6-gene / cytolytic-activity signatures, all on the same split; then the
  patient-weighted mean over the test cohorts. cfm's models are the mean over `--seeds`
  (their spread is printed: changing only the seed moves one run by ~0.04).
- `tcga`: overall survival, 5-fold CV within BLCA, LUAD, KIRC and the three pooled into one
  cohort (`configs/finetune/tcga_survival.py:pooled`, folds stratified by type and event),
  Harrell's c-index of the same models beside penalised Cox on PCA-32 + clinical and the
  signatures.
- `--ablation`: each task also with clinical variables only and omics only (raw and encoder).

Every run is cfm.finetune's own pipeline in this process (`cfm.finetune.run`, no
explanations), into a temporary folder that is removed at the end. The last line is the
ratio of cfm's best weighted-mean metric to the best baseline's (above 1: cfm wins).
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.federated import SHARED_DATA  # noqa: E402
from cfm import cli_help, config_loader, finetune  # noqa: E402

ICB = "configs/finetune/icb_response.py"
TCGA = "configs/finetune/tcga_survival.py"
CFM = ("cfm_fusion", "cfm_probe")


def eligible_cohorts(data: str, min_responders: int) -> list[tuple[str, int, int]]:
    """(cohort, evaluable patients, responders) of every ICB cohort in `data`/icb with at
    least `min_responders` responders, largest first."""
    import pandas as pd
    out = []
    for f in sorted(glob.glob(os.path.join(data, "icb", "*_clinical.csv.gz"))):
        r = pd.read_csv(f).get("response")
        if r is None:
            continue
        n_r, n = int((r == "R").sum()), int(r.isin(["R", "NR"]).sum())
        if n_r >= min_responders:
            out.append((os.path.basename(f)[:-len("_clinical.csv.gz")], n, n_r))
    if not out:
        raise SystemExit(f"no ICB cohort in {data}/icb has {min_responders} responders")
    return sorted(out, key=lambda c: -c[1])


def one_run(spec: str, overrides: list[str], tmp: str) -> dict:
    """{unit: {model: ((value, low, high), test patients)}} of one cfm.finetune run; the
    metric is the unit's AUC (binary) or c-index (survival)."""
    cfg = config_loader.load_config(spec, overrides + ["--config.explain.enabled=False"])
    work = tempfile.mkdtemp(dir=tmp)
    os.rmdir(work)
    res = finetune.run(cfg, work)
    out = {}
    for unit, u in res["units"].items():
        out[unit] = {}
        for name, m in u["models"].items():
            v = m.get("auc") or m.get("c_index")
            if isinstance(v, dict):
                out[unit][name] = ((v["value"], v.get("low", np.nan), v.get("high", np.nan)),
                                   int(m.get("n", 0)))
    shutil.rmtree(work, ignore_errors=True)
    return out


def variants(encoder: str, ablation: bool, only: str = "") -> list[tuple[str, list[str]]]:
    """(label, overrides) of the model variants to run (`only`: comma-separated labels)."""
    enc = [f"--config.omics.encoder={encoder}"] if encoder else []
    out = [("raw", [])] + ([("encoder", enc)] if enc else [])
    if ablation:
        out += [("clinical only", ["--config.modalities=clinical"]),
                ("omics only, raw", ["--config.modalities=omics"])]
        if enc:
            out.append(("omics only, encoder", ["--config.modalities=omics"] + enc))
    keep = [v.strip() for v in only.split(",") if v.strip()]
    unknown = set(keep) - {label for label, _ in out}
    if unknown:
        raise SystemExit(f"--variants: unknown {sorted(unknown)}; these runs have "
                         f"{[label for label, _ in out]}")
    return [v for v in out if not keep or v[0] in keep]


def evaluate(units: list[tuple[str, str, list[str]]], args, tmp: str) -> tuple[dict, dict]:
    """For each (name, config spec, overrides) unit: {(variant, model): [(value, lo, hi) over
    seeds]} (baselines once, from the raw run), and its test patients."""
    table: dict = {}
    sizes: dict = {}
    for unit, spec, unit_ov in units:
        row: dict = {}
        for label, ov in variants(args.encoder, args.ablation, args.variants):
            for seed in args.seeds:
                t0 = time.time()
                res = one_run(spec, unit_ov + ov + args.override + [
                    f"--config.seed={seed}", f"--config.data.path={args.data}"], tmp)
                name = next(iter(res)) if len(res) == 1 else "pooled"
                models = res[name]
                for model, (v, n) in models.items():
                    sizes[unit] = n
                    if model in CFM:
                        row.setdefault((label, model), []).append(v)
                    elif label == "raw" and seed == args.seeds[0]:
                        row[("baseline", model)] = [v]
                print(f"  {unit:12s} {label:20s} seed {seed}: " + ", ".join(
                    f"{m} {v[0][0]:.3f}" for m, v in models.items()
                    if m in CFM or label == "raw") + f" ({time.time() - t0:.0f} s)",
                    flush=True)
        table[unit] = row
    return table, sizes


def report(table: dict, sizes: dict, metric: str) -> float:
    """Print the per-unit table and the weighted mean; return cfm's best / the best
    baseline's weighted mean."""
    cols = sorted({k for r in table.values() for k in r},
                  key=lambda k: (k[0] == "baseline", k[0], k[1]))
    units = list(table)
    # the pooled TCGA unit holds the same patients as the per-type ones: not in the mean
    w = np.array([0.0 if u == "POOLED" and len(units) > 1 else sizes[u] for u in units])
    print("\n| unit (n) | " + " | ".join(f"{a}: {b}" if a != "baseline" else b
                                         for a, b in cols) + " |")
    print("|---|" + "---|" * len(cols))
    means = {}
    for c in cols:
        means[c] = np.array([np.mean([v[0] for v in table[u].get(c, [(np.nan,)])])
                             for u in units])
    for u in units:
        cells = []
        for c in cols:
            vals = table[u].get(c)
            if not vals:
                cells.append("-")
            elif len(vals) == 1:
                v, lo, hi = vals[0]
                cells.append(f"{v:.3f} ({lo:.2f}-{hi:.2f})")
            else:
                xs = [v[0] for v in vals]
                cells.append(f"{np.mean(xs):.3f} ±{np.std(xs):.3f}")
        print(f"| {u} ({sizes[u]}) | " + " | ".join(cells) + " |")
    wm = {c: float(np.nansum(means[c] * w) / w[np.isfinite(means[c])].sum()) for c in cols}
    if w.min() == 0:
        print("(the patient-weighted mean leaves out POOLED: its patients are the per-type "
              "units')")
    print(f"| patient-weighted mean {metric} | " + " | ".join(f"{wm[c]:.3f}" for c in cols)
          + " |")
    best_cfm = max((v for c, v in wm.items() if c[0] != "baseline"), default=np.nan)
    best_base = max((v for c, v in wm.items() if c[0] == "baseline"), default=np.nan)
    return best_cfm / best_base


def main() -> None:
    p = cli_help.parser("benchmarks.fusion_eval", __doc__,
                        "python -m benchmarks.fusion_eval --part icb --encoder /tmp/enc_tcga")
    p.add_argument("--data", default=SHARED_DATA, help="the shared data folder (icb/, tcga/)")
    p.add_argument("--part", default="icb", choices=("icb", "tcga"), help="which task")
    p.add_argument("--encoder", default="", help="a pretrained omics encoder (cfm.export "
                   "folder or cfm.train workdir); default: none, only the raw-gene models run")
    p.add_argument("--seeds", default="0", help="comma-separated seeds of cfm's models")
    p.add_argument("--min-responders", type=int, default=10,
                   help="ICB: a cohort is a test cohort with at least this many responders")
    p.add_argument("--ablation", action="store_true",
                   help="also clinical only and omics only (default: omics + clinical only)")
    p.add_argument("--variants", default="", help="comma-separated variant labels to run (raw, "
                   "encoder, clinical only, omics only, raw, omics only, encoder); default: all; "
                   "the baselines come with `raw`")
    p.add_argument("--tcga-presets", default="blca,luad,kirc,pooled",
                   help="tcga: comma-separated presets of configs/finetune/tcga_survival.py "
                        "(blca, luad, kirc, pooled; default: all four)")
    p.add_argument("--override", action="append", default=[], metavar="--config.KEY=VALUE",
                   help="a config override for every run, e.g. --override="
                        "--config.train.ensemble=1 (default: none)")
    args = p.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.data = os.path.abspath(args.data)
    tmp = tempfile.mkdtemp(prefix="cfm_fusion_eval_")
    try:
        if args.part == "icb":
            cohorts = eligible_cohorts(args.data, args.min_responders)
            print("ICB leave-one-cohort-out, test cohorts: "
                  + ", ".join(f"{c} ({n} patients, {r} responders)" for c, n, r in cohorts))
            units = [(c, f"{ICB}:loco", [f"--config.data.test_cohort={c}"])
                     for c, _, _ in cohorts]
            ratio = report(*evaluate(units, args, tmp), "AUC")
        else:
            units = [(t.upper(), f"{TCGA}:{t}", []) for t in args.tcga_presets.split(",")]
            ratio = report(*evaluate(units, args, tmp), "c-index")
        print(f"cfm best / best baseline (patient-weighted mean): {ratio:.3f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
