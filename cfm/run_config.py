"""Config keys every `cfm.train` run has, whatever it trains: mesh, sharding, logging,
checkpointing, resume and init_from. Each `configs/<file>.py` adds them with `add_run_keys`."""

import ml_collections

from cfm.parallel import sharding


def add_run_keys(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Add the run-control keys, with their defaults, to config `c` (returned)."""
    c.mesh = ml_collections.ConfigDict()  # axis sizes; -1 takes the remaining devices
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.slices = 1  # TPU slices (multi-slice over DCN) or hosts the data axis spans

    # Logical axis -> mesh axes (cfm.parallel.sharding): batches (act_batch) over data x fsdp,
    # FSDP on every weight's embed axis, tensor parallelism on heads, MLP units and prototypes.
    c.sharding = ml_collections.ConfigDict()
    c.sharding.rules = sharding.DEFAULT_RULES
    # ZeRO-3 for what the rules leave whole: every parameter without this mesh axis gets it on
    # its longest evenly divisible dimension ('' : off, such parameters stay replicated).
    c.sharding.zero3_axis = "fsdp"
    # Parameters with fewer elements stay replicated. 2**10 (with zero3_axis=fsdp) keeps
    # ViT-g/14's per-chip state within 4% of total / 256 under fsdp=256; 2**16 left it 27% over
    # (benchmarks/scaling.py).
    c.sharding.min_shard_size = 2 ** 10

    # Evaluators run every N steps and at the end (cfm.evals: knn, linear, health, mgm), each
    # built with cfm.evals.entry(type, ...); none by default.
    c.evals = ml_collections.ConfigDict()

    c.log_every = 10
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3  # the last K checkpoints are kept ...
    c.keep_every = 0  # ... and every step divisible by this (0: none), e.g. for evaluations
    c.resume_step = -1  # -1: resume from the latest complete checkpoint; N: from step N
    # (the steps after N are moved to workdir/checkpoints_set_aside/, so the run saves them anew)
    # When the newest checkpoints do not read (damaged files): "stop" exits 2 naming the
    # damaged steps and the newest good one; "set_aside" moves each damaged step folder to
    # workdir/checkpoints_set_aside/<step>-damaged-<time>/ (never deleted) and continues from
    # the newest good step (step 0 if none reads). cfm/checkpoint.py restore.
    c.damaged_checkpoints = "stop"
    # A new run (step 0, fresh optimiser) from pretrained weights: a cfm.train workdir (student
    # and teacher of its latest checkpoint, or of init_from_step) or a cfm.export folder (its
    # backbone). Ignored when --workdir holds checkpoints (the run resumes). cfm/init_from.py.
    c.init_from = ""
    c.init_from_step = -1  # -1: the latest checkpoint
    return c
