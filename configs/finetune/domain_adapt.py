"""Domain adaptation: continue DINOv2 pretraining from an exported (or trained) backbone on a new
cohort's tiles, then fine-tune on that cohort. A `cfm.train` config (not cfm.finetune).

    python -m data_prep.tile_wsi --slides NEW_COHORT/ --out /tmp/new_tiles --mpp 0.5
    python -m cfm.train --config configs/finetune/domain_adapt.py:uni --workdir /tmp/adapted \
        --config.init_from=/models/cfm-vit-l16 --config.data.path=/tmp/new_tiles
    python -m cfm.export --workdir /tmp/adapted --out /tmp/adapted_export --format orbax
    python -m cfm.finetune --config configs/finetune/tile_probe.py:synthetic \
        --workdir /tmp/adapted_probe --config.model=/tmp/adapted_export ...

`init_from` loads the export's backbone into student and teacher (or a workdir's student,
teacher and heads; cfm/init_from.py) and starts a new run at step 0 with a fresh optimiser.
Preset `<p>` is `configs/dino_vit.py:<p>` (test, demo, vit_s16/b16/l16, vit_g14, uni, phikon2)
changed for a short continuation, in the spirit of domain-adaptive pretraining (Gururangan et
al. 2020, "Don't stop pretraining"): tiles from `data.path` (tile_wsi shards), 10% of the
preset's epochs (at least 1), a quarter of its peak learning rate with one warm-up epoch, the
teacher temperature at its final value from the start, no frozen prototype epoch (the heads
of a workdir source are already trained; an export's are re-initialised and learn from step 0).
The test preset runs on synthetic images: `--config.init_from` is all it needs.
"""

import importlib.util
import os

import ml_collections


def get_config(arg: str = "uni") -> ml_collections.ConfigDict:
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "dino_vit.py")
    spec = importlib.util.spec_from_file_location("cfm_dino_vit_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(arg)
    if arg != "test":
        c.data.source = "shards"
    c.epochs = max(1, c.epochs // 10)
    c.optim.base_lr = c.optim.base_lr / 4
    c.optim.warmup_epochs = min(1, c.epochs)
    c.ssl.warmup_teacher_temp_epochs = 0
    c.optim.freeze_last_layer_epochs = 0
    return c
