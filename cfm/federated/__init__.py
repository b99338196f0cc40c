"""Federated fine-tuning across hospitals on Flower: sites keep their patients, only model
updates travel.

- `cfm.federated.sites`: a site's private data (one ICB cohort, one TCGA type, a CSV).
- `cfm.federated.model`: the model, its jitted local step (FedProx term), ArrayRecord I/O.
- `cfm.federated.pretrain`: `model.kind = "mgm"`, continued masked-gene pretraining of an
  omics export on the sites' omics tables (no labels); the final backbone becomes an export.
- `cfm.federated.tiles`: `data.source = "tiles"`, a tile probe (cfm.finetune's linear head) on
  sites of tile embeddings (cfm.embed folders with tile labels), held-out slides per site.
- `cfm.federated.client`: the site's Flower ClientApp (DP clipping through Flower's mod).
- `cfm.federated.server`: the round loop (FedAvg / FedProx / FedAdam through optax, DP noise
  and Flower's RDP accountant, orbax checkpoints and resume).
- `cfm.federated.secagg`: secure aggregation (`secure_aggregation.enabled`) through Flower's
  SecAgg+: its client mod on the sites, its workflow's four stages in the round loop.
- `cfm.federated.apps`: the ServerApp Flower's runtime loads (the ClientApp: `client.app`).
- `cfm.federated.grid`: an in-process Grid (tests, benchmark).
- `cfm.federated.deploy` and `python -m cfm.federated server|client|local`: real SuperLink /
  SuperNode processes.
"""
