"""Federated fine-tuning across sites on Flower (cfm.federated): each site holds one cohort.

    python -m cfm.federated local --config configs/federated.py:<preset> --workdir DIR
    python -m cfm.federated server --config configs/federated.py:<preset> --workdir DIR
    python -m cfm.federated client --config configs/federated.py:<preset> --site NAME

Presets:
- `icb`: ICB response (binary), each visible PredictioR cohort a site; Mariathasan held out
  (`data.test_cohort`, evaluated by benchmarks/federated.py, never a site). FusionModel,
  FedAvg, 40 rounds of 5 local AdamW steps.
- `tcga`: overall survival (Cox head), TCGA BLCA, LUAD and KIRC as three sites.
- `test`: logistic regression on CSV sites `<data.path>/<site>.csv` (a, b, c), raw features,
  one local SGD step a round (= gradient descent on the pooled data): the tests' convex
  problem, whose optimum scikit-learn gives.
- `tcga_mgm`: continued masked-gene pretraining (cfm.federated.pretrain) of an omics export,
  no labels: TCGA BLCA, LUAD and KIRC tables as three sites, each mapped onto the export's
  vocabulary, 20% of each site's patients held out; 10 rounds of 5 local AdamW steps of 32
  patients; the final backbone is written as an export to WORKDIR/export:
    python -m cfm.export --workdir /tmp/cfm_tcga --out /tmp/tcga_export --format safetensors
    python -m cfm.federated local --config configs/federated.py:tcga_mgm \
        --config.model.init_from=/tmp/tcga_export --workdir /tmp/fed_mgm
  (/tmp/cfm_tcga: configs/omics_mgm.py:tcga's run.) From its 900-step export (MGM head
  fresh) the held-out masked loss falls 3.32 -> 2.23 (mean of the sites) in 10 rounds, ~15
  min on 2 busy CPU cores; docs/federated.md has the per-site table and site-local training.
- `mgm_test`: the tests' tiny continued pretraining on CSV tables `<data.path>/<site>.csv`.
- `tiles_test`: a federated tile probe (cfm.federated.tiles): each site a `python -m cfm.embed
  --out` folder `<data.path>/<site>/` whose index.csv has the tile `label` (classes
  `data.classes`) and `slide_id`; a linear head, one local SGD step a round on raw features
  (= gradient descent on the pooled tiles, the tests' convex problem), a quarter of each site's
  slides held out; the held-out accuracy and balanced accuracy of every site every round:
    python -m cfm.federated local --config configs/federated.py:tiles_test \
        --config.data.path=SITES --workdir /tmp/fed_tiles
  (tests/test_federated_tiles.py: within 0.01 of scikit-learn's pooled fit in 80 rounds.)
- `dino_test`: continued DINOv2 pretraining (cfm.federated.dino) of a ViT export, no labels:
  each site a tile folder `<data.path>/<site>/` as cfm.train reads it (`data.tile_source`:
  shards of data_prep.tile_wsi, or image files as data_prep.demo_tiles writes), a quarter of
  its tiles held out with fixed crops; 2 rounds of 2 DINOv2 steps of 4 images; student, teacher
  and centers averaged; the final teacher backbone written as an export to WORKDIR/export:
    python -m data_prep.demo_tiles --out /tmp/fed_dino/a --synthetic 16 --tile 64 --stride 448
    python -m data_prep.demo_tiles --out /tmp/fed_dino/b --synthetic 16 --tile 64 --stride 448
    python -m cfm.federated local --config configs/federated.py:dino_test \
        --config.data.path=/tmp/fed_dino --config.data.tile_source=folder \
        --config.model.init_from=tests/fixtures/v0_1/dino_export --workdir /tmp/fed_dino/run
  (tests/test_federated_dino.py; docs/federated.md has its figures.)

Figures (benchmarks/federated.py; docs/federated.md has the tables): federated AUC / c-index
against centralised and site-local training on the same leave-one-cohort-out splits.
Any preset with `--config.secure_aggregation.enabled=True`: the same run through Flower's SecAgg+
(ends within quantisation of the plain run; benchmarks/federated_secagg.py measures the cost).
"""

import ml_collections

from cfm.finetune import fusion_config


def get_config(arg: str = "icb") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.head = "binary"                   # binary (response) | cox (survival)
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.source = "icb"               # icb | tcga | csv
    c.data.path = "../shared/data"
    c.data.sites = "Hugo,Riaz,Van_Allen,Miao,Padron"
    c.data.test_cohort = "Mariathasan"  # held out by the benchmark; never a site
    c.data.features = ""                # file of feature names; "" = common to data.sites
    c.data.clinical = "age,sex_male,stage,log_tmb"
    c.data.omics_kinds = "rnaseq"
    c.data.label = "response"
    c.data.standardize = True           # z-score on each site's own patients
    c.data.holdout = 0.0                # fraction of each site's patients kept out of training

    # FusionModel's keys as cfm.finetune's response / survival tasks have them, plus the kind
    c.model = fusion_config.add_fusion_keys(ml_collections.ConfigDict(), "").model
    c.model.kind = "fusion"             # fusion (cfm.models.fusion) | linear

    c.train = ml_collections.ConfigDict()   # each site's local steps, every round
    c.train.optimizer = "adamw"         # adamw | sgd (state reset every round)
    c.train.lr = 1e-3
    c.train.weight_decay = 0.05
    c.train.l2 = 0.0                    # explicit L2 on kernels (the convex test's penalty)
    c.train.local_steps = 5             # full-batch steps per round

    c.server = ml_collections.ConfigDict()
    c.server.strategy = "fedavg"        # fedavg | fedprox | fedadam
    c.server.rounds = 40
    c.server.mu = 0.01                  # FedProx proximal weight
    c.server.lr = 0.01                  # FedAdam server lr (eta of Reddi et al. 2021)
    c.server.b1 = 0.9
    c.server.b2 = 0.99
    c.server.tau = 1e-3                 # FedAdam adaptivity (Reddi et al. 2021: 1e-3)
    c.server.min_sites = 0              # 0 = every site of data.sites
    c.server.wait_s = 300.0             # how long to wait for the sites to connect
    c.server.round_timeout_s = 600.0    # a site slower than this misses the round
    c.server.max_retries = 5            # a round sent again this often (sites down) fails
    c.server.log_every = 10
    c.server.checkpoint_every = 1       # orbax save of the server state every N rounds
    c.server.address = "127.0.0.1:9190"  # the SuperLink the clients connect to

    c.dp = ml_collections.ConfigDict()  # client-level DP (DP-FedAvg)
    c.dp.enabled = False
    c.dp.clip = 0.5                     # L2 bound of a site's update per round
    c.dp.noise_multiplier = 1.0         # noise std = multiplier * clip / sites
    c.dp.delta = 1e-3

    # Secure aggregation: Flower's SecAgg+ (cfm.federated.secagg, Bell et al. 2020, CCS)
    c.secure_aggregation = ml_collections.ConfigDict()
    c.secure_aggregation.enabled = False   # False: off; True: the server sees masked sums only
    c.secure_aggregation.num_shares = 1.0  # 1.0: a site's secrets go to every site (<=1 a share)
    c.secure_aggregation.reconstruction_threshold = 0.67  # 0.67 of shares rebuild one (keep >.5)
    c.secure_aggregation.clipping_range = 8.0  # 8.0: a weighted update coordinate's bound +-
    c.secure_aggregation.quantization_range = 4194304  # 2**22: integer levels over that range
    c.secure_aggregation.max_weight = 1000.0  # 1000: patients of the largest site, at most

    if arg == "icb":
        pass
    elif arg == "tcga":
        c.head = "cox"
        c.data.source = "tcga"
        c.data.sites = "blca,luad,kirc"
        c.data.test_cohort = ""
        c.data.clinical = "age,sex_female,stage"
    elif arg == "test":
        c.data.source = "csv"
        _convex(c)
        c.server.rounds = 100
        c.server.log_every = 50
        c.server.checkpoint_every = 10
    elif arg in ("tcga_mgm", "mgm_test"):
        _mgm(c, arg)
    elif arg == "tiles_test":
        _tiles(c)
    elif arg == "dino_test":
        _dino(c)
    else:
        raise ValueError(f"unknown preset {arg!r}: use icb, tcga, test, tcga_mgm, mgm_test, "
                         "tiles_test or dino_test")
    return c


def _mgm(c: ml_collections.ConfigDict, arg: str) -> None:
    """Continued masked-gene pretraining (cfm.federated.pretrain): the model is the export's."""
    c.model.kind = "mgm"
    c.model.init_from = ""              # an omics export (python -m cfm.export); required
    c.data.source = "table"             # <data.path>/<data.table with {site}>, prepared per site
    c.data.path = "../shared/data/tcga"
    c.data.table = "tcga_{site}_multiomics.csv.gz"
    c.data.patient_column = "case_id"   # split by patient ("" = each row its own patient)
    c.data.expression_transform = ""    # the sites' tables' transform; "" = the export's (a
    #                                     per-source export, e.g. omics_mgm.py:pan, needs it)
    c.data.sites = "blca,luad,kirc"
    c.data.test_cohort = ""
    c.data.clinical = ""
    c.data.holdout = 0.2                # held-out patients of each site (the logged loss)
    c.train.batch_size = 32             # patients per local step
    c.train.lr = 1e-3
    c.train.weight_decay = 0.01
    c.server.rounds = 10
    c.server.log_every = 1
    c.server.export_format = "safetensors"  # of WORKDIR/export: safetensors | orbax
    if arg == "mgm_test":
        c.data.path = ""
        c.data.table = "{site}.csv"
        c.data.patient_column = "patient_id"
        c.data.sites = "a,b,c"
        c.data.holdout = 0.3
        c.train.batch_size = 8
        c.train.local_steps = 4
        c.train.lr = 3e-3
        c.server.rounds = 4
        c.server.checkpoint_every = 10
        c.server.wait_s = 60.0
        c.server.round_timeout_s = 120.0


def _dino(c: ml_collections.ConfigDict) -> None:
    """Continued DINOv2 pretraining (cfm.federated.dino): the model is the export's."""
    c.model.kind = "dino"
    c.model.init_from = ""              # a ViT export (python -m cfm.export) or workdir
    c.data.source = "tiles_ssl"         # <data.path>/<site>/: tiles as cfm.train reads them
    c.data.tile_source = "shards"       # shards (data_prep.tile_wsi) | folder (image files)
    c.data.path = ""
    c.data.sites = "a,b"
    c.data.test_cohort = ""
    c.data.clinical = ""
    c.data.holdout = 0.25               # held-out tiles of each site (whole batches; the loss)
    c.train.batch_size = 4              # images (2 global + local crops each) per local step
    c.train.local_steps = 2
    c.train.lr = 1e-3                   # peak lr (no batch-size scaling)
    c.train.weight_decay = 0.04         # DINOv2's initial weight decay
    c.train.warmup_rounds = 0           # rounds of linear lr warm-up
    c.server.rounds = 2
    c.server.log_every = 1
    c.server.checkpoint_every = 10
    c.server.wait_s = 60.0
    c.server.round_timeout_s = 120.0
    c.server.export_format = "safetensors"  # of WORKDIR/export: safetensors | orbax


def _tiles(c: ml_collections.ConfigDict) -> None:
    """A tile probe on the sites' tile embeddings (cfm.federated.tiles)."""
    c.data.source = "tiles"             # <data.path>/<site>/: a cfm.embed --out folder
    _convex(c)
    c.data.label_key = "label"          # index.csv column of the tile class
    c.data.classes = "background,immune,stroma,tumour"  # data_prep.synthetic_tme; others out
    c.data.embedding_dim = 0            # 0: read from a site folder on the server's machine
    c.data.holdout = 0.25               # fraction of each site's slides held out
    c.data.standardize = False          # True: z-score on each site's own training tiles
    c.model.kind = "linear"             # cfm.finetune.probe.LinearHead
    c.server.rounds = 80
    c.server.log_every = 20
    c.server.checkpoint_every = 20


def _convex(c: ml_collections.ConfigDict) -> None:
    """The tests' convex problem: sites a, b, c of raw features, a linear model, one local SGD
    step of lr 1 a round (= gradient descent on the pooled data), L2 0.05 on the kernel."""
    c.data.path = ""
    c.data.sites = "a,b,c"
    c.data.test_cohort = ""
    c.data.clinical = ""
    c.data.standardize = False
    c.model.kind = "linear"
    c.train.optimizer = "sgd"
    c.train.lr = 1.0
    c.train.l2 = 0.05
    c.train.local_steps = 1
    c.server.wait_s = 60.0
    c.server.round_timeout_s = 60.0
