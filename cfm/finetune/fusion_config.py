"""Config keys shared by the fusion-model tasks (`response`, `survival`): the omics features,
the model, training, cross-validation, baselines and explanations, with their defaults.
configs/finetune/icb_response.py and configs/finetune/tcga_survival.py add them here so the
two cannot drift apart."""

import ml_collections


def add_fusion_keys(c: ml_collections.ConfigDict, baselines: str) -> ml_collections.ConfigDict:
    """Add the fusion keys to `c` (returned); `baselines` is the comma list of baselines."""
    c.omics = ml_collections.ConfigDict()
    # A pretrained omics encoder (cfm.train MGM workdir or cfm.export folder; "" = raw features;
    # cfm.finetune.omics_encoder): genes mapped by symbol, its CLS (and/or token outputs) replace
    # the raw omics in the fusion model and feed the cfm_probe linear model.
    c.omics.encoder = ""
    c.omics.encoder_step = -1            # checkpoint step of a workdir (-1 = latest)
    c.omics.encoder_feature = "cls"      # cls | mean (of token outputs) | tokens (co-attn) | both
    c.omics.encoder_tune = "frozen"      # frozen | last_k | full (layer-wise lr decay)
    c.omics.encoder_last_k = 1           # encoder_tune = last_k: blocks that train
    c.omics.encoder_lr_decay = 0.75      # BEiT layer-wise lr decay over the encoder
    c.omics.encoder_norm = "auto"        # auto | model (its per-gene stats) | cohort (z-score)
    c.omics.min_coverage = 0.2           # least share of the encoder's expression genes present
    c.omics.grouping = "modules"         # modules (k-means, training patients) | vector | gene_sets
    c.omics.n_modules = 32
    c.omics.gene_sets = ""               # GMT file for grouping = gene_sets
    c.omics.max_features = 0             # keep the most variable N features (0 = all)

    c.model = ml_collections.ConfigDict()
    c.model.dim = 32
    c.model.heads = 4
    c.model.depth = 1
    c.model.dropout = 0.1
    c.model.feature_dropout = 0.2
    c.model.modality_dropout = 0.1

    c.train = ml_collections.ConfigDict()
    c.train.lr = 1e-3
    c.train.weight_decay = 0.05
    c.train.max_epochs = 200
    c.train.min_epochs = 30              # no early stopping before (full-batch steps)
    c.train.patience = 20
    c.train.val_fraction = 0.2
    c.train.ensemble = 3

    c.cv = ml_collections.ConfigDict()
    c.cv.k = 5
    c.cv.seed = 0
    c.cv.within_cohort = False
    c.cv.n_boot = 1000

    c.probe = ml_collections.ConfigDict()  # cfm_probe: linear model on the encoder's CLS
    c.probe.enabled = True               # (only with omics.encoder)
    c.probe.l2_grid = "1,10,100,1000"    # L2 strengths (1/C; Cox penalizer / 100), inner CV
    c.probe.inner_k = 3

    c.baselines = ml_collections.ConfigDict()
    c.baselines.names = baselines
    c.baselines.C = 0.01                 # inverse L2 strength of the logistic regression
    c.baselines.cox_pcs = 32
    c.baselines.cox_penalizer = 0.1

    c.explain = ml_collections.ConfigDict()
    c.explain.enabled = True
    c.explain.ig_steps = 32
    c.explain.top_k = 20
    c.explain.n_patients = 5
    c.explain.n_drivers = 5
    return c


def shrink_for_tests(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The `test` presets' sizes: 3 folds, 64 features, a depth-0 8-wide model, 5 epochs."""
    c.cv.k = 3
    c.cv.n_boot = 50
    c.omics.max_features = 64
    c.omics.n_modules = 4
    c.model.dim = 8
    c.model.heads = 2
    c.model.depth = 0
    c.train.max_epochs = 5
    c.train.min_epochs = 2
    c.train.patience = 3
    c.train.ensemble = 1
    c.explain.ig_steps = 8
    c.explain.n_patients = 2
    return c
