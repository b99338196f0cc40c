"""Overall survival from TCGA multi-omics + clinical variables (../shared/data/tcga, PORPOISE's
per-case tables; cfm.finetune.survival): 5-fold patient-level CV stratified by the event
indicator, per cancer type, Harrell's c-index with bootstrap CIs, against a penalised Cox model
(lifelines CoxPHFitter, penalizer 0.1, on the first 32 principal components of the same omics
features, fitted on the training folds, + the clinical variables) and the signatures CD274,
IFN-gamma (only CXCL10, CXCL9, IFNG of Ayers' six genes are in these tables) and CYT (only PRF1;
GZMA is absent), each used as risk = -score.

    python -m cfm.finetune --config configs/finetune/tcga_survival.py:<preset> --workdir DIR

Presets: `blca`, `luad`, `kirc` (one type), `all` (the three, one after the other, one
sub-folder each), `pooled` (the three as one cohort, `data.cancer = "blca+luad+kirc"`: the omics
features all three have, a 0/1 indicator per type, folds stratified by type and event), `nll`
(BLCA with MCAT's discrete-time NLL head instead of Cox), `test` (tiny, for the tests).
Features: `_rnaseq` (signed log1p, z-scored on the training patients, clipped at +-5),
`_cnv` / 2, `_mut` 0/1; clinical: age, sex and (BLCA only) stage.

Figures reached (Harrell's c-index, 95% bootstrap CI; 2 CPU cores shared with other jobs at
load ~7):

    python -m cfm.finetune --config configs/finetune/tcga_survival.py:blca --workdir /tmp/blca
      17 min (3 ensemble members x 5 folds; --config.train.ensemble=1 is ~3x faster).
      BLCA (373, 169 deaths): cfm_fusion 0.63 (0.58-0.67), log-rank p 1e-5 at the median
      split; Cox on PCA-32 + clinical 0.68 (0.64-0.72); CD274 0.51, IFNG6 0.53, CYT 0.54.

cfm's fusion model does not beat the penalised Cox baseline on BLCA. LUAD and KIRC (`luad`,
`kirc`, `all`) run with the same code but were not timed or measured.
With a pretrained omics encoder (`--config.omics.encoder=PATH`, docs/finetuning.md: frozen CLS,
a `cfm_probe` linear model beside the fusion network) the figures are in docs/finetuning.md.
"""

import ml_collections

from cfm.finetune import fusion_config


def get_config(arg: str = "blca") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "survival"
    c.head = "cox"                       # cox (Breslow partial likelihood) | nll (discrete time)
    c.overwrite = False
    c.seed = 0
    c.modalities = "omics,clinical"

    c.data = ml_collections.ConfigDict()
    c.data.source = "tcga"
    c.data.path = "../shared/data"
    # blca | luad | kirc; a comma list: one after the other; a + list: pooled
    c.data.cancer = "blca"
    c.data.omics_kinds = "rnaseq,cnv,mut"
    c.data.clinical = "age,sex_female,stage"
    c.data.labels = ""
    c.data.test_cohort = ""

    c.survival = ml_collections.ConfigDict()
    c.survival.n_bins = 4                # discrete-time bins: quartiles of event times (MCAT)
    c.survival.alpha = 0.0               # MCAT's extra weight on the uncensored term

    fusion_config.add_fusion_keys(c, baselines="cox,CD274,IFNG6,CYT")

    if arg in ("blca", "luad", "kirc"):
        c.data.cancer = arg
    elif arg == "all":
        c.data.cancer = "blca,luad,kirc"
    elif arg == "pooled":
        c.data.cancer = "blca+luad+kirc"
    elif arg == "nll":
        c.head = "nll"
    elif arg == "test":
        c.data.omics_kinds = "rnaseq"
        fusion_config.shrink_for_tests(c)
        c.baselines.cox_pcs = 4
    else:
        raise ValueError(f"unknown preset {arg!r}: use blca, luad, kirc, all, pooled, nll or "
                         "test")
    return c
