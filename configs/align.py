"""Slide–omics alignment (cfm/ssl/align.py): a gated-attention slide encoder over tile-embedding
bags, aligned with an omics transformer by SigLIP's sigmoid loss in per-device chunks, plus an
expression read-out from the slide embedding (docs/align.md).

Presets (the `:<arg>` after the file name); every one reads a pairs folder (data.path):

  test   tiny sizes for tests/test_align.py (a 32-patient synthetic pairs folder).
  demo   synthetic pairs whose tissue composition drives a known expression program:
           python -m data_prep.paired_synthetic --out /tmp/cfm_pairs
           python -m cfm.train --config configs/align.py:demo --workdir /tmp/cfm_align \
               --config.data.path=/tmp/cfm_pairs
           python -m benchmarks.align_eval --workdir /tmp/cfm_align
         300 steps of batch 64 (~2 min of CPU, 3 min wall with the report on a loaded 2-core
         machine). Should reach, on the 100 held-out patients: slide -> omics recall@5 >= 0.25
         (5x chance 0.05; measured 0.30) and per-gene Pearson of ridge on the slide embedding
         >= gated-attention MIL from scratch (measured 0.743 vs 0.710); docs/align.md.
  tcga   TCGA slides' tile embeddings joined to prepared omics (data_prep.paired); set
         data.path and align.omics_init (an MGM workdir or export of configs/omics_mgm.py:tcga).

Override any key on the command line, e.g. `--config.align.freeze_omics=True`.
"""

import ml_collections

from cfm import evals, run_config


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.objective = "align"
    c.seed = 0
    c.batch_size = 64  # pairs per step, global: the sigmoid loss sees B^2 pairs
    c.steps_per_epoch = 100
    c.epochs = 3
    c.total_steps = -1

    c.model = ml_collections.ConfigDict()  # the slide encoder (released)
    c.model.variant = "slide_gated"
    c.model.in_dim = -1  # -1: the tile embedding width of the pairs folder
    c.model.width = 128
    c.model.hidden = 128
    c.model.attention_dim = 64
    c.model.dropout = 0.1
    c.model.positions = True  # 2-D tile positions as sine-cosine features
    c.model.dtype = "float32"
    c.model.remat = False
    c.model.attention = "auto"

    c.omics_model = ml_collections.ConfigDict()  # cfm.models.omics.OmicsTransformer
    c.omics_model.variant = "omics_tiny"
    c.omics_model.vocab_size = -1  # from the pairs folder
    c.omics_model.n_bins = -1
    c.omics_model.value_encoding = "continuous"
    c.omics_model.layerscale_init = 0.0
    c.omics_model.drop_path_rate = 0.0
    c.omics_model.dtype = "float32"
    c.omics_model.remat = False
    c.omics_model.attention = "auto"
    c.omics_model.gene_values = True
    c.omics_model.attend_tokens = 0

    c.align = ml_collections.ConfigDict()
    c.align.proj_dim = 64
    # SigLIP's initial temperature and bias (Zhai et al. 2023: t = 10, b = -10 for batches of
    # 32k, where b = -10 starts the many negatives near their optimum); smaller batches
    # have fewer negatives per positive, so presets may start b higher.
    c.align.temperature_init = 10.0
    c.align.bias_init = -10.0
    c.align.recon_weight = 1.0  # TANGLE's expression reconstruction; 0 turns it off
    c.align.chunked = True  # sigmoid loss in per-device chunks round the batch axes
    c.align.omics_init = ""  # an MGM workdir or cfm.export folder; "" = from scratch
    c.align.freeze_omics = False

    c.data = ml_collections.ConfigDict()
    c.data.source = "pairs"  # the only source: a pairs folder
    c.data.path = ""  # a pairs folder (data_prep.paired / data_prep.paired_synthetic)
    c.data.split = "train"
    c.data.max_tiles = 128  # random subset of a larger bag each step
    c.data.max_tokens = 64
    c.data.prefetch = 2

    c.optim = ml_collections.ConfigDict()
    c.optim.base_lr = 1e-3
    c.optim.lr_scaling = "none"
    c.optim.warmup_epochs = 0.3
    c.optim.min_lr = 1e-5
    c.optim.weight_decay = 1e-4
    c.optim.weight_decay_end = 1e-4
    c.optim.clip_grad = 1.0
    c.optim.freeze_last_layer_epochs = 0
    c.optim.layerwise_decay = 1.0
    c.optim.patch_embed_lr_mult = 1.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c = run_config.add_run_keys(c)
    # Held-out cross-modal retrieval (cfm/evals/align.py); presets set how often.
    c.evals = ml_collections.ConfigDict({"retrieval": evals.entry("align", every=0)})
    return c


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
    c = base_config()
    if arg == "test":
        c.batch_size = 8
        c.steps_per_epoch = 4
        c.epochs = 2
        c.model.width = c.model.hidden = 16
        c.model.attention_dim = 8
        c.omics_model.variant = "omics_test"
        c.align.proj_dim = 8
        c.data.max_tiles = 16
        c.data.max_tokens = 16
        c.log_every = 2
        c.checkpoint_every = 4
    elif arg == "demo":
        c.model.positions = False  # the synthetic program follows composition, not layout
        c.log_every = 25
        c.checkpoint_every = 100
        c.evals.retrieval.every = 100
    elif arg == "tcga":
        c.data.max_tiles = 2048
        c.data.max_tokens = 3072
        c.omics_model.attend_tokens = 256
        c.batch_size = 32
        c.epochs = 10
        c.log_every = 50
        c.checkpoint_every = 200
        c.evals.retrieval.every = 200
    else:
        raise ValueError(f"unknown preset {arg!r}: use test, demo or tcga")
    return c
