"""Pretraining objectives: the `Objective` record the trainer uses (`objective.py`), DINOv2
(`dinov2.py`: DINO/iBOT losses, KoLeo/KDE regularisers, teacher centering) and masked gene
modelling (`mgm.py`). `cfm.objectives` maps `config.objective` to one of them.

Objectives read their data through `cfm.data` (one way: `cfm.data` imports nothing from here)
and know nothing of files."""
