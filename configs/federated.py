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

Figures (benchmarks/federated.py; docs/federated.md has the tables): federated AUC / c-index
against centralised and site-local training on the same leave-one-cohort-out splits.
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
        c.server.rounds = 100
        c.server.wait_s = 60.0
        c.server.round_timeout_s = 60.0
        c.server.log_every = 50
        c.server.checkpoint_every = 10
    else:
        raise ValueError(f"unknown preset {arg!r}: use icb, tcga or test")
    return c
