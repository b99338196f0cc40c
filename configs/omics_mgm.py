"""Masked gene modelling (MGM): pretrain an omics transformer on expression, mutations and copy
number (cfm/models/omics.py, objective cfm/ssl/mgm.py), with the trainer, sharding, checkpoints
and export of the image side.

Presets (the `:<arg>` after the file name):

  test      a tiny model on synthetic low-rank omics (64 genes, 8 mutation and 8 CNV tokens);
            the tests use it (about a second per step on 2 CPU cores).
  demo      a 4-layer, 128-wide model on synthetic omics, no files needed:
              python -m cfm.train --config configs/omics_mgm.py:demo --workdir /tmp/cfm_omics_demo
            About 2 minutes on 2 CPU cores: the total loss falls from ~3.3 to ~2.5 in 300 steps
            (CNV accuracy 0.2 -> ~0.5, masked-expression MSE 1.0 -> ~0.8 against the generator's
            noise floor of ~0.3; single-batch values, noisy).
  tcga      the three TCGA multi-omics tables of ../shared/data/tcga, prepared first:
              S=../shared/data/tcga
              python -m data_prep.prepare_omics --input $S/tcga_blca_multiomics.csv.gz \
                  --input $S/tcga_luad_multiomics.csv.gz --input $S/tcga_kirc_multiomics.csv.gz \
                  --patient-column case_id --expression-transform signed_log1p --out /tmp/tcga_omics
              python -m cfm.train --config configs/omics_mgm.py:tcga --workdir /tmp/cfm_tcga \
                  --config.data.path=/tmp/tcga_omics
              python -m benchmarks.omics_eval --workdir /tmp/cfm_tcga --data /tmp/tcga_omics
            omics_tiny (4 x 64) with the gene-value sketch and the CLS read-out, every token of a
            sample (up to 3072) of which 256 enter the blocks, batch 32, 900 steps (~22 min on 2
            CPU cores). Held out (222 patients): masked-expression Pearson 0.58 (kNN 0.54, mean
            0), MSE 0.62 (kNN 0.69), CNV accuracy 0.94 (kNN 0.83, mode 0.56); the CLS embedding
            probes cancer type at balanced accuracy 0.97 and survival at c-index 0.71 (PCA of raw
            features: 0.86, 0.63). README.md has the table.
  pan       the tcga model on every visible expression table: TCGA BLCA, LUAD, KIRC and the six
            ICB cohorts (patients without a response label too; labels are never read), one
            vocabulary over the union of their genes, expression z-scored per source
            (data_prep.omics_stats says why). Prepared first (data.path defaults to it):
              S=../shared/data
              python -m data_prep.prepare_omics --normalise per-input --source-ids \
                  --patient-column case_id --out /tmp/pan_omics \
                  --input $S/tcga/tcga_blca_multiomics.csv.gz --expression-transform signed_log1p \
                  --input $S/tcga/tcga_luad_multiomics.csv.gz --expression-transform signed_log1p \
                  --input $S/tcga/tcga_kirc_multiomics.csv.gz --expression-transform signed_log1p \
                  --input $S/icb/Hugo_expression.csv.gz --expression-transform none \
                  --input $S/icb/Mariathasan_expression.csv.gz --expression-transform none \
                  --input $S/icb/Miao_expression.csv.gz --expression-transform none \
                  --input $S/icb/Padron_expression.csv.gz --expression-transform none \
                  --input $S/icb/Riaz_expression.csv.gz --expression-transform none \
                  --input $S/icb/Van_Allen_expression.csv.gz --expression-transform none
              python -m cfm.train --config configs/omics_mgm.py:pan --workdir /tmp/cfm_pan
            1,536 samples (train 1,238), 2,943 expression genes (TCGA 1,558, ICB 1,803; 418
            shared), 1,019 mutation and 1,575 CNV genes: every gene of every cohort has an id.
            300 steps (--config.epochs=3, 24 min on 2 shared CPU cores): held-out masked-
            expression Pearson 0.53 (kNN 0.56); as the encoder of ICB leave-one-cohort-out
            fusion, coverage 59.7% (tcga: 26.5%), patient-weighted AUC 0.588 (raw genes
            0.551, IFN-gamma 6-gene 0.600). docs/omics.md has the tables.
  base      omics_base (12 x 512, heads 8), 2048 tokens per sample: the benchmark size of issue 6
            (benchmarks/omics_step.py); set data.path to a prepared folder.

Override any key on the command line, e.g. `--config.mgm.mask_ratio=0.3`.
"""

import ml_collections

from cfm import evals, run_config


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.objective = "mgm"
    c.seed = 0
    c.batch_size = 64  # samples per step, global
    c.steps_per_epoch = 100  # schedules are in epochs of this many steps
    c.epochs = 20
    c.total_steps = -1  # -1: epochs * steps_per_epoch

    c.model = ml_collections.ConfigDict()
    c.model.variant = "omics_small"
    c.model.vocab_size = -1  # -1: from the data (manifest.json or the synthetic generator)
    c.model.n_bins = -1  # -1: from the data
    c.model.value_encoding = "continuous"  # "continuous" (scGPT's value MLP) or "binned"
    c.model.layerscale_init = 0.0
    c.model.drop_path_rate = 0.0
    c.model.dtype = "float32"
    c.model.remat = False
    c.model.attention = "auto"
    # Adds value x a learned per-gene vector to each token and the mean of those over the
    # visible tokens to the CLS input (cfm/models/omics.py), so the CLS starts as a linear
    # sketch of the sample.
    c.model.gene_values = False
    # > 0: only that many tokens (a random subset each step) enter the blocks; the rest reach
    # the head through the sketch and the CLS read-out (cfm/models/omics.py).
    c.model.attend_tokens = 0

    c.mgm = ml_collections.ConfigDict()
    # BERT masks 15%; scGPT and BulkRNABert mask larger fractions of expression tokens (scGPT
    # samples 25-75%); 0.3 is a middle value, cheap to change.
    c.mgm.mask_ratio = 0.3
    c.mgm.expression_loss = "regression"  # "regression" (MSE on the value) or "classification"
    c.mgm.expression_weight = 1.0
    c.mgm.mutation_weight = 1.0
    c.mgm.cnv_weight = 1.0
    # scGPT's MVC: expression also read from the CLS through a per-gene query (MGMHead).
    c.mgm.sample_readout = False

    c.data = ml_collections.ConfigDict()
    c.data.source = "synthetic"  # "synthetic" or "prepared" (data_prep.prepare_omics folder)
    c.data.path = ""
    c.data.split = "train"
    c.data.max_tokens = 1024  # random gene subset per sample per step, padded to this length
    c.data.synthetic_size = 2048
    c.data.synthetic_genes = 256
    c.data.synthetic_bins = 51
    c.data.synthetic_mutations = 32
    c.data.synthetic_cnv = 32
    c.data.prefetch = 2

    c.optim = ml_collections.ConfigDict()  # AdamW with a cosine schedule (cfm.optim)
    c.optim.base_lr = 1e-4
    c.optim.lr_scaling = "none"
    c.optim.warmup_epochs = 1
    c.optim.min_lr = 1e-6
    c.optim.weight_decay = 0.01
    c.optim.weight_decay_end = 0.01
    c.optim.clip_grad = 1.0
    c.optim.freeze_last_layer_epochs = 0
    c.optim.layerwise_decay = 1.0
    c.optim.patch_embed_lr_mult = 1.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c = run_config.add_run_keys(c)
    # Evaluators (cfm.evals): held-out masked-value Pearson against kNN imputation (the measure
    # of benchmarks/omics_eval.py) and collapse monitors; presets set how often.
    c.evals = ml_collections.ConfigDict({"mgm": evals.entry("mgm", every=0),
                                         "health": evals.entry("health", every=0)})
    return c


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
    c = base_config()
    if arg == "test":
        c.model.variant = "omics_test"
        c.batch_size = 8
        c.steps_per_epoch = 10
        c.epochs = 4
        c.data.max_tokens = 48
        c.data.synthetic_size = 64
        c.data.synthetic_genes = 64
        c.data.synthetic_mutations = 8
        c.data.synthetic_cnv = 8
        c.optim.base_lr = 3e-3
        c.log_every = 5
        c.checkpoint_every = 10
    elif arg == "demo":
        c.model.variant = "omics_tiny"
        c.batch_size = 32
        c.steps_per_epoch = 100
        c.epochs = 3
        c.data.max_tokens = 128
        c.optim.base_lr = 1e-3
        c.log_every = 20
        c.checkpoint_every = 100
        c.evals.mgm.every = c.evals.health.every = 100
    elif arg in ("tcga", "pan"):  # pan: the same model on TCGA + every ICB cohort
        c.model.variant = "omics_tiny"
        c.data.path = "/tmp/pan_omics" if arg == "pan" else ""
        c.data.source = "prepared"
        c.data.max_tokens = 3072  # every token of a TCGA sample (at most 2936)
        c.model.attend_tokens = 256
        c.model.gene_values = True
        c.mgm.sample_readout = True
        c.batch_size = 32
        c.epochs = 9
        c.optim.base_lr = 3e-3
        c.log_every = 50
        c.checkpoint_every = 200
        c.evals.mgm.every = c.evals.health.every = 300
    elif arg == "base":
        c.model.variant = "omics_base"
        c.data.source = "prepared"
        c.data.max_tokens = 2048
        c.batch_size = 256
        c.steps_per_epoch = 1000
        c.epochs = 100
        c.log_every = 100
        c.checkpoint_every = 1000
        c.evals.mgm.every = c.evals.health.every = 5000
    else:
        raise ValueError(f"unknown preset {arg!r}: use test, demo, tcga, pan or base")
    return c
