"""`task = "survival"`: overall survival from omics + clinical variables with the fusion model
and a Cox partial-likelihood (`head = "cox"`) or discrete-time NLL (`head = "nll"`, MCAT) head,
evaluated by Harrell's c-index with bootstrap CIs on patient-level folds stratified by the event
indicator, against a penalised Cox baseline (lifelines) on principal components of the same
features + clinical variables and the immune signatures (CD274, IFNG6, CYT; risk = -score, an a
priori direction). Kaplan-Meier curves split the out-of-fold risks at their median.

The pipeline is the one of cfm.finetune.response; several TCGA types (`data.cancer` a comma
list) are run one after the other, each with its own folds, results and report section.
"""

from __future__ import annotations

import copy
import os

import ml_collections

from cfm.finetune import response
from cfm.finetune.common import check, write_json
from cfm.finetune.fusion_data import split_list
from cfm.finetune.losses import SURVIVAL_HEADS


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """`task = "survival"`: the fusion pipeline with a survival head, once per TCGA type."""
    check(config.head in SURVIVAL_HEADS, "head", config.head,
          f"the survival task uses one of {list(SURVIVAL_HEADS)}")
    cancers = split_list(config.data.get("cancer", "")) if config.data.source == "tcga" \
        else [""]
    if len(cancers) <= 1:
        return response.run_pipeline(config, workdir, "Survival prediction")
    results, md = {"task": "survival", "by_cancer": {}}, []
    for c in cancers:
        sub = copy.deepcopy(config)
        with sub.unlocked():
            sub.data.cancer = c
        d = os.path.join(workdir, c)
        os.makedirs(d)
        r = response.run_pipeline(sub, d, f"Survival prediction, TCGA-{c.upper()}")
        results["by_cancer"][c] = r
        md.append(f"- [{c.upper()}]({c}/report.md): {r['summary_line']}")
    results["summary_line"] = " | ".join(f"{c}: {r['summary_line']}"
                                         for c, r in results["by_cancer"].items())
    with open(os.path.join(workdir, "report.md"), "w", encoding="utf-8") as fh:
        fh.write("# Survival prediction\n\n" + "\n".join(md) + "\n")
    write_json(os.path.join(workdir, "results.json"), results)
    return results
