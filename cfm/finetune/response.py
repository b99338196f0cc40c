"""Patient-level prediction from omics + clinical variables with the fusion model of
cfm.models.fusion, evaluated against baselines on the same patient-level folds.

`run(config, workdir)` for `config.task = "response"` (binary response or multi-class RECIST);
cfm.finetune.survival calls the same pipeline (`run_pipeline`) with a survival head. Stages:

1. load the cohorts (cfm.finetune.tabular_data), drop patients without a label
   (cfm.finetune.fusion_data, which also checks the config);
2. evaluation units (fusion_data.evaluation_units): one per held-out cohort
   (`data.test_cohort`, leave-one-cohort-out), one per cohort (`cv.within_cohort`), or the
   pooled patients; each unit's splits are patient-level stratified k-fold (cfm.evaluate.cv;
   k shrinks to the smallest class where needed and the report says so) or the single
   train/test cohort split;
3. per split (`run_unit`): standardise features on the training patients, group genes into
   expression modules (k-means on training patients; or a GMT gene-set file)
   (fusion_data.prepare_features), train `train.ensemble` fusion models (AdamW, full batch,
   early stopping on an inner stratified validation split of the training patients;
   cfm.finetune.fusion_train, with the heads' losses of cfm.finetune.losses), predict the test
   patients (ensemble mean; spread = uncertainty); fit the baselines on the same training
   patients (cfm.finetune.fusion_baselines);
4. metrics with bootstrap CIs (cfm.evaluate.report), ROC / calibration / KM plots, integrated
   gradient biomarker tables and per-patient text reports (cfm.explain;
   cfm.finetune.fusion_report); results.json and report.md in the workdir.
"""

from __future__ import annotations

import os
import time
from typing import Callable

import ml_collections
import numpy as np

from cfm.evaluate import report
from cfm.finetune import losses, omics_encoder, tabular_data
from cfm.finetune.common import check, write_json
from cfm.finetune.encoder_tune import EncoderFusion, tune_spec
from cfm.finetune.fusion_baselines import baseline_scores, best_threshold
from cfm.finetune.fusion_data import (evaluation_units, labelled_patients, load_data,
                                      prepare_features, split_list, stratum_labels, validate)
from cfm.finetune.fusion_probe import probe_scores
from cfm.finetune.fusion_report import explain_unit, summarize_unit
from cfm.finetune.fusion_train import Trainer, attribute, pad_bucket
from cfm.finetune.losses import HEADS, SURVIVAL_HEADS
from cfm.models.fusion import FusionModel

__all__ = ["HEADS", "SURVIVAL_HEADS", "run", "run_pipeline", "run_unit"]


def run_unit(data: tabular_data.TabularData, unit: dict,
             config: ml_collections.ConfigDict, log: Callable[[str], None],
             n_test_pad: int = 0, enc: dict | None = None) -> dict:
    """Train and predict every split of `unit`; IG rows are padded to `n_test_pad` (the largest
    test set of all units, so one IG compile serves them all). `enc`: a pretrained omics
    encoder's outputs (omics_encoder.encode), whose features replace the raw omics of the
    fusion model and feed the `cfm_probe` linear model. Returns the out-of-fold scores
    and predicted classes of every model ({model: {row: value}}), the ensemble members' scores,
    the IG rows and per-split training logs."""
    head = config.head
    strata = stratum_labels(data, head)
    ours = ["cfm_fusion"] + (["cfm_probe"] if enc is not None and config.probe.enabled
                             and head != "multiclass" else [])
    model_names = ours + split_list(config.baselines.names)
    if head == "multiclass":
        model_names = [m for m in model_names if m not in data.signatures]
    if head in SURVIVAL_HEADS:
        model_names = [m for m in model_names if m != "logreg"]
    else:
        model_names = [m for m in model_names if m != "cox"]
    scores = {m: {} for m in model_names}
    preds = {m: {} for m in model_names}
    members, attr_rows, fold_logs = {}, [], []
    spec = tune_spec(config, enc["encoder"].depth) if enc is not None else None
    n_test_pad = max([n_test_pad] + [len(te) for _, te in unit["splits"]])
    n_pad = pad_bucket(max(max(len(tr), len(te)) for tr, te in unit["splits"]))
    for f, (train, test) in enumerate(unit["splits"]):
        t0 = time.time()
        seed = config.seed * 1000 + f
        feats = prepare_features(data, train, config, seed, enc)
        edges = (losses.survival_bins(data.time[train], data.event[train],
                                      config.survival.n_bins) if head == "nll" else None)
        tgt = losses.targets(data, head, edges)
        model = FusionModel(n_out=losses.n_outputs(head, data, config), dim=config.model.dim,
                            heads=config.model.heads, depth=config.model.depth,
                            dropout=config.model.dropout,
                            feature_dropout=config.model.feature_dropout,
                            modality_dropout=config.model.modality_dropout,
                            n_groups=feats.get("n_groups", 0))
        if spec is not None:  # the encoder trains inside the fusion model
            model = EncoderFusion(backbone=enc["encoder"].module, fusion=model)
        trainer = Trainer(model, head, config, tgt, feats, n_pad=n_pad, tune=spec,
                          backbone=enc["encoder"].params if spec is not None else None)
        params_list, member_scores, train_logs = [], [], []
        for m in range(config.train.ensemble):
            params, tlog = trainer.fit(train, strata, seed * 10 + m)
            params_list.append(params)
            train_logs.append(tlog)
            member_scores.append(trainer.scores(params, test))
        ms = np.stack(member_scores)  # [M, n_test] or [M, n_test, K]
        for i, r in enumerate(test):
            scores["cfm_fusion"][int(r)] = ms[:, i].mean(0)
            members[int(r)] = ms[:, i]
        if head == "binary":
            train_scores = np.mean([trainer.scores(p, train) for p in params_list], axis=0)
            thr = best_threshold(data.label[train].astype(int), train_scores)
            for i, r in enumerate(test):
                preds["cfm_fusion"][int(r)] = int(ms[:, i].mean() >= thr)
        elif head == "multiclass":
            for i, r in enumerate(test):
                preds["cfm_fusion"][int(r)] = int(np.argmax(ms[:, i].mean(0)))
        fold_extra: dict = {}
        if "cfm_probe" in scores:
            s, p, lam = probe_scores(data, feats, train, test, strata, config)
            for i, r in enumerate(test):
                scores["cfm_probe"][int(r)] = s[i]
                if p is not None:
                    preds["cfm_probe"][int(r)] = int(p[i])
            fold_extra["probe_l2"] = lam
        for name in model_names[len(ours):]:
            s, p = baseline_scores(name, data, feats, train, test, config)
            for i, r in enumerate(test):
                scores[name][int(r)] = s[i]
                if p is not None:
                    preds[name][int(r)] = int(p[i])
        if config.explain.enabled:
            attr_rows.append(attribute(trainer, params_list, feats, test, n_test_pad, config))
        fold_logs.append({"fold": f, "n_train": len(train), "n_test": len(test),
                          "members": train_logs, "wall_s": round(time.time() - t0, 1),
                          **fold_extra})
        log(f"  {unit['name']} split {f + 1}/{len(unit['splits'])}: {len(train)} train, "
            f"{len(test)} test, best epochs {[t['best_epoch'] for t in train_logs]}, "
            f"{time.time() - t0:.1f} s")
    return {"scores": scores, "preds": preds, "members": members, "attr": attr_rows,
            "folds": fold_logs}


def run_pipeline(config: ml_collections.ConfigDict, workdir: str, title: str) -> dict:
    """The whole pipeline (module docstring) for any head: results.json, report.md, plots and
    biomarker tables in `workdir`; returns the results."""
    validate(config)
    t0 = time.time()
    lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        lines.append(msg)

    data = labelled_patients(load_data(config), config.head)
    cohorts = sorted(str(c) for c in set(data.cohort))
    units, notes = evaluation_units(data, config)
    log(f"cfm.finetune {config.task}: {len(data)} labelled patients from {cohorts}, "
        f"{len(units)} evaluation unit(s)")
    enc = omics_encoder.encode(data, config, log) if config.omics.encoder else None
    if enc is not None and config.omics.encoder_tune != "frozen":
        enc["tuning"] = omics_encoder.tuning_arrays(
            enc["samples"], int(getattr(enc["encoder"].module, "attend_tokens", 0)))
    results = {"task": config.task, "head": config.head, "n_patients": len(data),
               "cohorts": cohorts, "notes": notes,
               "signature_genes": data.signature_genes, "units": {}}
    if enc is not None:
        results["encoder"] = dict(enc["report"], path=config.omics.encoder,
                                  step=enc["encoder"].step, tune=config.omics.encoder_tune,
                                  feature=config.omics.encoder_feature)
        notes.append(f"omics encoder {config.omics.encoder}: coverage "
                     f"{enc['report']['coverage']:.1%} of its expression genes, "
                     f"{enc['report']['normalisation']} normalisation, "
                     f"{config.omics.encoder_tune}, feature {config.omics.encoder_feature}")
    md = [f"# {title}", "", f"{len(data)} labelled patients; cohorts "
          f"{', '.join(cohorts)}; modalities {config.modalities}; "
          f"head {config.head}; ensemble of {config.train.ensemble} per split; "
          f"{config.cv.n_boot} bootstrap resamples of patients for the 95% CIs.", ""]
    md += [f"- note: {n}" for n in notes]
    md.append("")
    n_test_pad = pad_bucket(max(len(te) for u in units for _, te in u["splits"]))
    for unit in units:
        out = run_unit(data, unit, config, log, n_test_pad, enc)
        res, umd = summarize_unit(data, unit, out, config, workdir)
        ex, emd = explain_unit(data, unit, out, config, workdir)
        res["explain"] = ex
        res["folds"] = out["folds"]
        results["units"][unit["name"]] = res
        md += [f"## {unit['name']} ({unit['kind']})", ""] + umd + [""] + emd + [""]
    results["wall_s"] = round(time.time() - t0, 1)
    metric = "c_index" if config.head in SURVIVAL_HEADS else (
        "auc" if config.head == "binary" else "balanced_accuracy")
    results["summary_line"] = "; ".join(
        f"{u}: cfm_fusion {metric} {report.fmt_ci(r['models']['cfm_fusion'].get(metric))}"
        + (f" (cfm's best {r['comparison']['cfm_best']} - best baseline "
           f"{r['comparison']['best_baseline']}: {r['comparison']['difference']['value']:+.3f})"
           if r.get("comparison") else "")
        for u, r in results["units"].items())
    md += ["## Signature genes used", ""]
    md += [f"- {k}: {', '.join(v)}" for k, v in data.signature_genes.items()]
    md += ["", f"Wall time {results['wall_s']} s.", "", "## Log", "", "```", *lines, "```"]
    with open(os.path.join(workdir, "report.md"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(md) + "\n")
    write_json(os.path.join(workdir, "results.json"), results)
    return results


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """`task = "response"`: binary response (or multi-class RECIST) from omics + clinical."""
    check(config.head in ("binary", "multiclass"), "head", config.head,
          "the response task uses binary or multiclass (survival heads: task survival)")
    return run_pipeline(config, workdir, "Response prediction")
