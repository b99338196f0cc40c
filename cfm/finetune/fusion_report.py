"""Reporting of the fusion tasks: per evaluation unit, the metrics of the fusion model and the
baselines on the pooled out-of-fold predictions with bootstrap CIs (cfm.evaluate.report), ROC /
calibration / Kaplan-Meier plots (`summarize_unit`), and the integrated-gradient biomarker
tables and per-patient text reports (cfm.explain; `explain_unit`).
"""

from __future__ import annotations

import os

import ml_collections
import numpy as np

from cfm.evaluate import metrics, report
from cfm.explain import attributions, text_report
from cfm.finetune.losses import SURVIVAL_HEADS
from cfm.finetune.tabular_data import TabularData


def _ordered(d: dict, rows: np.ndarray) -> np.ndarray:
    return np.array([d[int(r)] for r in rows])


def member_spread(data: TabularData, rows: np.ndarray, members: dict, head: str) -> dict | None:
    """The metric (AUC / c-index) of each ensemble member alone on the pooled out-of-fold
    patients: members differ only in their seed (init, dropout, inner validation split), so
    this is the seed-to-seed spread of one fusion model; None for one member or multiclass."""
    m = np.array([members[int(r)] for r in rows])
    if head == "multiclass" or m.ndim != 2 or m.shape[1] < 2:
        return None
    if head in SURVIVAL_HEADS:
        vals = [metrics.c_index(data.time[rows], data.event[rows], m[:, j])
                for j in range(m.shape[1])]
    else:
        vals = [metrics.roc_auc(data.label[rows], m[:, j]) for j in range(m.shape[1])]
    return {"metric": "c_index" if head in SURVIVAL_HEADS else "auc",
            "values": [round(float(v), 4) for v in vals], "mean": float(np.mean(vals)),
            "sd": float(np.std(vals, ddof=1)), "min": float(np.min(vals)),
            "max": float(np.max(vals))}


def compare_models(models: dict, key: str, metric, arrays: tuple, scores: dict,
                   n_boot: int, seed: int) -> dict | None:
    """Which model wins the unit and by how much: the best model by `key` ("auc" or "c_index"
    point value), cfm's best (`cfm_*`) and the best baseline (the rest), and cfm's best minus
    the best baseline with a paired bootstrap 95% CI (the same resampled patients score both,
    so the interval is of the difference itself). `metric(*arrays, score)` computes `key`;
    None when either side is missing."""
    val = {m: r[key]["value"] for m, r in models.items()
           if r.get(key) and r[key].get("value") is not None}
    cfm = {m: v for m, v in val.items() if m.startswith("cfm_")}
    base = {m: v for m, v in val.items() if not m.startswith("cfm_")}
    if not cfm or not base:
        return None
    c, b = max(cfm, key=cfm.get), max(base, key=base.get)
    v, lo, hi = metrics.bootstrap_ci(lambda *a: metric(*a[:-2], a[-2]) - metric(*a[:-2], a[-1]),
                                     (*arrays, scores[c], scores[b]), n_boot=n_boot, seed=seed)
    return {"metric": key, "winner": max(val, key=val.get), "cfm_best": c,
            "cfm_value": cfm[c], "best_baseline": b, "baseline_value": base[b],
            "difference": {"value": v, "low": lo, "high": hi}}


def comparison_line(cmp: dict) -> str:
    """The report.md sentence of `compare_models`."""
    d, name = cmp["difference"], "AUC" if cmp["metric"] == "auc" else "c-index"
    verdict = "beats" if d["value"] > 0 else "does not beat"
    return (f"Winner: {cmp['winner']}. cfm's best, {cmp['cfm_best']} ({name} "
            f"{cmp['cfm_value']:.3f}), {verdict} the best baseline, {cmp['best_baseline']} "
            f"({cmp['baseline_value']:.3f}): difference {d['value']:+.3f} (95% CI "
            f"{d['low']:+.3f} to {d['high']:+.3f}, paired bootstrap over patients).")


def summarize_unit(data: TabularData, unit: dict, out: dict, config: ml_collections.ConfigDict,
                   workdir: str) -> tuple[dict, list[str]]:
    """Metrics of every model on the unit's pooled out-of-fold scores (bootstrap CIs), its ROC /
    calibration or Kaplan-Meier plots in `workdir`; (results, report.md lines)."""
    head = config.head
    rows = np.sort(np.concatenate([te for _, te in unit["splits"]]))
    res = {"kind": unit["kind"], "n_splits": len(unit["splits"]), "models": {}}
    md = []
    nb, seed = config.cv.n_boot, config.cv.seed
    if head == "binary":
        y = data.label[rows]
        curves = {}
        for m, sc in out["scores"].items():
            s = _ordered(sc, rows)
            p = _ordered(out["preds"][m], rows) if out["preds"][m] else None
            res["models"][m] = report.summarize_binary(y, s, p, n_boot=nb, seed=seed)
            curves[m] = (y, s)
        report.plot_roc(curves, os.path.join(workdir, f"roc_{unit['name']}.png"),
                        f"{unit['name']} ({unit['kind']})")
        report.plot_calibration(y, _ordered(out["scores"]["cfm_fusion"], rows),
                                os.path.join(workdir, f"calibration_{unit['name']}.png"),
                                f"cfm_fusion, {unit['name']}")
        table = [(m, r["n"], r["n_pos"], report.fmt_ci(r["auc"]),
                  report.fmt_ci(r.get("balanced_accuracy")))
                 for m, r in res["models"].items()]
        cmp = compare_models(res["models"], "auc", metrics.roc_auc, (y,),
                             {m: _ordered(sc, rows) for m, sc in out["scores"].items()}, nb,
                             seed)
        md += [report.markdown_table(["model", "n", "responders", "AUC (95% CI)",
                                      "balanced accuracy (95% CI)"], table), "",
               f"![ROC](roc_{unit['name']}.png) ![calibration](calibration_{unit['name']}.png)"]
    elif head == "multiclass":
        y = data.label[rows].astype(int)
        for m in out["scores"]:
            p = _ordered(out["preds"][m], rows)
            res["models"][m] = report.summarize_binary(  # AUC of P(class 0 or 1) = CR/PR
                (y <= 1).astype(float), _ordered(out["scores"][m], rows)[:, :2].sum(1),
                n_boot=nb, seed=seed)
            res["models"][m]["balanced_accuracy"] = report._ci(metrics.balanced_accuracy,
                                                               (y, p), nb, seed)
            res["models"][m]["accuracy"] = float(np.mean(p == y))
        table = [(m, r["n"], report.fmt_ci(r.get("balanced_accuracy")),
                  f"{r['accuracy']:.3f}", report.fmt_ci(r["auc"]))
                 for m, r in res["models"].items()]
        md += [report.markdown_table(["model", "n", "balanced accuracy (95% CI)", "accuracy",
                                      "AUC of P(CR or PR) (95% CI)"], table)]
        cmp = None
    else:
        t, e = data.time[rows], data.event[rows]
        for m, sc in out["scores"].items():
            res["models"][m] = report.summarize_survival(t, e, _ordered(sc, rows), n_boot=nb,
                                                         seed=seed)
        risk = _ordered(out["scores"]["cfm_fusion"], rows)
        p = report.plot_km(t, e, risk > np.median(risk),
                           os.path.join(workdir, f"km_{unit['name']}.png"),
                           f"cfm_fusion, {unit['name']}: median split of predicted risk")
        res["models"]["cfm_fusion"]["logrank_p_median_split"] = p
        cmp = compare_models(res["models"], "c_index", metrics.c_index, (t, e),
                             {m: _ordered(sc, rows) for m, sc in out["scores"].items()}, nb,
                             seed)
        table = [(m, r["n"], r["n_events"], report.fmt_ci(r["c_index"]))
                 for m, r in res["models"].items()]
        md += [report.markdown_table(["model", "n", "events", "c-index (95% CI)"], table), "",
               f"Log-rank p (cfm_fusion, median split of out-of-fold risk): {p:.3g}", "",
               f"![KM](km_{unit['name']}.png)"]
    if cmp is not None:
        res["comparison"] = cmp
        md += ["", comparison_line(cmp)]
    spread = member_spread(data, rows, out["members"], head)
    if spread is not None:
        res["models"]["cfm_fusion"]["member_spread"] = spread
        md += ["", f"cfm_fusion single members ({len(spread['values'])} seeds): {spread['metric']} "
               f"mean {spread['mean']:.3f}, sd {spread['sd']:.3f}, range {spread['min']:.3f}-"
               f"{spread['max']:.3f} (the ensemble above averages them)."]
    return res, md


def explain_unit(data: TabularData, unit: dict, out: dict, config: ml_collections.ConfigDict,
                 workdir: str) -> tuple[dict, list[str]]:
    """The unit's biomarker table (mean |IG| over its test patients, features aligned by name
    across splits) and per-patient text reports (appended to patient_reports.md);
    (results, report.md lines)."""
    if not out["attr"]:
        return {}, []
    head = config.head
    name = unit["name"]
    # feature sets can differ between splits (max_features): align by name
    all_names: dict[str, str] = {}
    for a in out["attr"]:
        for n_, k in zip(a["names"]["omics"], a["kinds"]):
            all_names.setdefault(n_, k)
        for n_ in a["names"]["clinical"]:
            all_names.setdefault(n_, "clinical")
    names = list(all_names)
    col = {n_: j for j, n_ in enumerate(names)}
    n_rows = sum(len(a["rows"]) for a in out["attr"])
    attr = np.zeros((n_rows, len(names)))
    vals = np.zeros((n_rows, len(names)))
    row_ids, gaps, i0 = [], [], 0
    for a in out["attr"]:
        k = len(a["rows"])
        for mod in ("omics", "clinical"):
            if mod in a["ig"]:
                cols = [col[n_] for n_ in a["names"][mod]]
                attr[i0:i0 + k, cols] = a["ig"][mod]
                vals[i0:i0 + k, cols] = a["values"][mod]
        row_ids += list(a["rows"])
        gaps += list(a["gap"])
        i0 += k
    df = attributions.biomarker_table(attr, vals, names, [all_names[n_] for n_ in names])
    attributions.write_biomarker_table(
        df, os.path.join(workdir, f"biomarkers_{name}.csv"),
        os.path.join(workdir, f"biomarkers_{name}.md"), top_k=config.explain.top_k,
        title=f"{name}: top features by mean |integrated gradient| over "
              f"{n_rows} test patients")
    # per-patient reports
    order = np.argsort(row_ids)
    reports = []
    scores = out["scores"]["cfm_fusion"]
    all_scores = np.array([np.atleast_1d(scores[int(r)])[0] if head != "multiclass" else 0.0
                           for r in row_ids])
    for j in order[:config.explain.n_patients]:
        r = int(row_ids[j])
        top = np.argsort(-np.abs(attr[j]))[:config.explain.n_drivers]
        drivers = [(names[c], float(vals[j, c]), float(attr[j, c])) for c in top]
        if head == "binary":
            truth = "responder" if data.label[r] == 1 else "non-responder"
            ref = f"Responder rate among all evaluated patients: {np.mean(data.label):.2f}."
            reports.append(text_report.patient_report(
                data.patient_ids[r], data.cohort[r], "response", float(scores[r]),
                out["members"][r], drivers, ref, truth))
        elif head in SURVIVAL_HEADS:
            pct = 100.0 * np.mean(all_scores <= scores[r])
            grp = "high" if scores[r] > np.median(all_scores) else "low"
            ref = (f"That is the {pct:.0f}th percentile of the test patients' risks "
                   f"({grp}-risk group at the median split).")
            truth = (f"{'death' if data.event[r] else 'censored'} at "
                     f"{data.time[r]:.1f} months")
            reports.append(text_report.patient_report(
                data.patient_ids[r], data.cohort[r], "survival", float(scores[r]),
                out["members"][r], drivers, ref, truth))
    res = {"biomarkers_csv": f"biomarkers_{name}.csv",
           "top_features": df.head(config.explain.top_k)[["feature", "modality", "mean_abs_ig",
                                                          "direction"]].to_dict("records"),
           "ig_completeness_max_abs_gap": float(np.max(np.abs(gaps))) if gaps else None}
    md = [f"Top {min(5, len(df))} features by mean |IG|: "
          + ", ".join(f"{r.feature} ({r.direction})" for r in df.head(5).itertuples())
          + f" (full table: biomarkers_{name}.md / .csv)."]
    if reports:
        with open(os.path.join(workdir, "patient_reports.md"), "a", encoding="utf-8") as fh:
            fh.write(f"## {name}\n\n" + "\n\n".join(reports) + "\n\n")
    return res, md
