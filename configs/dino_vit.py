"""DINOv2-style self-supervised pretraining of a ViT on tiles.

Presets (the `:<arg>` after the file name):

  demo      tiny ViT on the tiles of scikit-image's real IHC image plus 1,024 synthetic
            H&E-like tiles; the README's first command.
              pip install -e ".[demo]"
              python -m data_prep.demo_tiles --out /tmp/cfm_demo/tiles \
                  --probe-out /tmp/cfm_demo/probe
              python -m cfm.train --config configs/dino_vit.py:demo --workdir /tmp/cfm_demo/run
            About 3-4 minutes on 2 CPU cores (~55 img/s). Should reach: DINO term 7.4 at step 10
            -> ~6.1 at step 300, at least 0.5 below ln(1024) = 6.93; kNN accuracy on the
            held-out probe tiles 0.59 at step 0 -> ~0.84 (linear probe 0.84 -> ~0.93). The
            workdir ends with checkpoints, TensorBoard events, metrics.jsonl and loss_curve.png.
  test      an even smaller model on synthetic images, used by the tests (seconds per step).
  vit_s16 / vit_b16 / vit_l16 / vit_g14
            DINOv2's published recipe (Oquab et al. 2023, arXiv:2304.07193; the defaults of
            facebookresearch/dinov2 `ssl_default_config.yaml`, ViT-g settings from `vitg14.yaml`)
            on a folder of tiles:
              python -m cfm.train --config configs/dino_vit.py:vit_l16 --workdir gs://BUCKET/run \
                  --config.data.source=folder --config.data.path=/data/tiles
            Reaches DINOv2's reported quality only at full scale (pods; see issue 4).
  uni       UNI (Chen et al. 2024, Nat. Med. 30:850): ViT-L/16 with DINOv2's default configuration,
            batch 3072, 125k iterations (100 epochs of 1250 steps here).
  phikon2   Phikon-v2 (Filiot et al. 2024, arXiv:2409.09173): ViT-L/16, no registers, 2x224 +
            8x96 crops, batch 4096, 250k iterations (200 epochs of 1250 steps here).
            For both, every value the papers do not state keeps DINOv2's default; the vertical
            flips and 90-degree rotations (tiles have no canonical orientation) and no
            solarisation are cfm's choices. HED stain jitter stays off: in skimage's HED units
            Tellez's sigma 0.05 already turns white into (163, 157, 209); set
            --config.augment.hed_jitter after checking it on your stains.

Override any key on the command line, e.g. `--config.batch_size=64 --config.model.dtype=bfloat16`.
"""

import ml_collections

from cfm import evals, run_config

# Mean and std of ImageNet RGB in [0, 1]; DINOv2, UNI and Phikon-v2 all normalise with these.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def base_config() -> ml_collections.ConfigDict:
    """DINOv2's default recipe (ssl_default_config.yaml) for ViT-L/16 at batch 1024."""
    c = ml_collections.ConfigDict()
    c.objective = "dinov2"  # what cfm.train optimises: dinov2 (this file) or mgm (omics)
    c.seed = 0
    c.batch_size = 1024  # global, over all hosts and devices
    c.steps_per_epoch = 1250  # DINOv2's OFFICIAL_EPOCH_LENGTH: schedules are in epochs of this
    c.epochs = 100
    c.total_steps = -1  # -1: epochs * steps_per_epoch; set to stop early (schedules keep epochs)

    c.model = ml_collections.ConfigDict()
    c.model.variant = "vit_l16"
    c.model.img_size = 224  # size the position embeddings are stored at
    c.model.num_registers = 0
    c.model.layerscale_init = 1e-5  # DINOv2 `student.layerscale`; 0 disables LayerScale
    c.model.drop_path_rate = 0.3  # DINOv2 default for ViT-L, uniform over depth
    c.model.ffn = "mlp"  # "mlp" (GELU) or "swiglu"
    c.model.qkv_bias = True
    c.model.dtype = "float32"  # compute dtype; parameters are always float32
    c.model.remat = False  # rematerialise each block in the backward pass
    c.model.scan_layers = False  # jax.lax.scan over blocks (faster compiles for deep models)
    # "auto": jax.nn.dot_product_attention (cuDNN flash attention) on GPU/TPU, a heads-major
    # einsum on CPU; or force "dot_product_attention" / "heads_major".
    c.model.attention = "auto"

    c.head = ml_collections.ConfigDict()  # DINO head (dinov2 `dino.head_*`)
    c.head.n_prototypes = 65536
    c.head.hidden_dim = 2048
    c.head.bottleneck_dim = 256
    c.head.n_layers = 3

    c.ibot = ml_collections.ConfigDict()
    c.ibot.separate_head = False  # True: iBOT gets its own head with the same sizes as `head`
    c.ibot.mask_sample_probability = 0.5  # fraction of global crops that get masked
    c.ibot.mask_ratio_min_max = (0.1, 0.5)
    c.ibot.min_block_patches = 4  # BEiT/DINOv2 block masking
    c.ibot.min_aspect = 0.3
    c.ibot.max_mask_fraction = 0.5  # one block covers at most this fraction of the patch grid

    c.ssl = ml_collections.ConfigDict()
    c.ssl.dino_loss_weight = 1.0
    c.ssl.ibot_loss_weight = 1.0
    c.ssl.regulariser = "koleo"  # "koleo", "kde" or "none"
    c.ssl.koleo_loss_weight = 0.1  # DINOv2 default
    c.ssl.kde_loss_weight = 0.05
    c.ssl.kde_concentration = 5.0
    c.ssl.centering = "softmax"  # "softmax" (EMA centering, DINO) or "sinkhorn_knopp" (SwAV)
    c.ssl.center_momentum = 0.9
    c.ssl.sinkhorn_iterations = 3
    c.ssl.student_temp = 0.1
    c.ssl.teacher_temp = 0.07
    c.ssl.warmup_teacher_temp = 0.04
    c.ssl.warmup_teacher_temp_epochs = 30
    c.ssl.momentum_teacher = 0.992
    c.ssl.final_momentum_teacher = 1.0

    c.crops = ml_collections.ConfigDict()
    c.crops.global_size = 224
    c.crops.local_size = 96
    c.crops.n_local = 8
    c.crops.global_scale = (0.32, 1.0)
    c.crops.local_scale = (0.05, 0.32)
    # Virchow2's extended-context translation (Zimmermann et al. 2024, arXiv:2408.00738): global
    # crops are translated, not rescaled, out of a tile larger than global_size, so tissue keeps
    # its magnification. Needs input tiles larger than global_size.
    c.crops.extended_context = False

    c.augment = ml_collections.ConfigDict()  # DINOv2 DataAugmentationDINO, plus pathology options
    c.augment.hflip = 0.5
    c.augment.vflip = 0.0
    c.augment.rot90 = False
    c.augment.color_jitter = 0.8  # probability; strengths below (brightness, contrast, sat., hue)
    c.augment.jitter_strength = (0.4, 0.4, 0.2, 0.1)
    c.augment.grayscale = 0.2
    c.augment.blur = (1.0, 0.1, 0.5)  # probability for global crop 1, global crop 2, local crops
    c.augment.solarize = 0.2  # probability, second global crop only
    # HED stain jitter (Tellez et al. 2018, 2019): per crop, each haematoxylin/eosin/DAB
    # concentration becomes s * U(1-sigma, 1+sigma) + U(-sigma, sigma); 0 = off.
    c.augment.hed_jitter = 0.0
    c.augment.mean = IMAGENET_MEAN
    c.augment.std = IMAGENET_STD

    c.optim = ml_collections.ConfigDict()
    c.optim.base_lr = 0.004  # at batch 1024, scaled by `lr_scaling`
    c.optim.lr_scaling = "sqrt_wrt_1024"  # or "none"
    c.optim.warmup_epochs = 10
    c.optim.min_lr = 1e-6
    c.optim.weight_decay = 0.04
    c.optim.weight_decay_end = 0.4
    c.optim.clip_grad = 3.0
    c.optim.freeze_last_layer_epochs = 1
    c.optim.layerwise_decay = 0.9
    c.optim.patch_embed_lr_mult = 0.2
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999

    c.data = ml_collections.ConfigDict()
    c.data.source = "synthetic"  # "synthetic", "folder" (image files) or "shards" (tile_wsi)
    c.data.path = ""  # for folder/shards: searched recursively
    c.data.synthetic_size = 4096  # number of distinct synthetic images
    c.data.synthetic_image_size = 256
    c.data.worker_count = 0  # grain worker processes; 0 decodes in the main process
    c.data.prefetch = 2

    c = run_config.add_run_keys(c)
    # Evaluators (cfm.evals): kNN and linear probe on a labelled tile set, switched on per run
    # (--config.evals.knn.every=1000 --config.evals.knn.path=/data/crc/train ...); collapse
    # monitors on a fixed training batch.
    c.evals = ml_collections.ConfigDict({
        "knn": evals.entry("knn", every=0, source="folder", path=""),
        "linear": evals.entry("linear", every=0, source="folder", path=""),
        "health": evals.entry("health", every=1000)})
    return c


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
    c = base_config()
    if arg in ("vit_s16", "vit_b16", "vit_l16"):
        c.model.variant = arg
    elif arg == "vit_g14":  # dinov2 configs/train/vitg14.yaml
        c.model.variant = "vit_g14"
        c.model.drop_path_rate = 0.4
        c.model.ffn = "swiglu"
        c.head.n_prototypes = 131072
        c.ibot.separate_head = True
        c.ssl.centering = "sinkhorn_knopp"
        c.epochs = 500
        c.optim.weight_decay_end = 0.2
        c.optim.base_lr = 2e-4
        c.optim.warmup_epochs = 80
        c.optim.layerwise_decay = 1.0
        c.crops.local_size = 98
    elif arg in ("uni", "phikon2"):
        c.model.variant = "vit_l16"
        c.batch_size = 3072 if arg == "uni" else 4096
        c.epochs = 100 if arg == "uni" else 200
        c.augment.vflip = 0.5
        c.augment.rot90 = True
        c.augment.solarize = 0.0
    elif arg in ("demo", "test"):
        c.model.variant = "vit_demo" if arg == "demo" else "vit_test"
        c.model.drop_path_rate = 0.1
        # CaiT's LayerScale init for shallow models (Touvron et al. 2021): with 1e-5 every CLS
        # token starts identical and a 300-step run never leaves DINO's uniform fixed point.
        c.model.layerscale_init = 0.1
        # Sinkhorn-Knopp targets have no centering transient, which short runs cannot outlast.
        c.ssl.centering = "sinkhorn_knopp"
        c.head.n_prototypes = 1024 if arg == "demo" else 64
        c.head.hidden_dim = 256 if arg == "demo" else 32
        c.head.bottleneck_dim = 64 if arg == "demo" else 16
        c.crops.global_size = 64 if arg == "demo" else 32
        c.crops.local_size = 32 if arg == "demo" else 16
        c.crops.n_local = 4 if arg == "demo" else 2
        c.model.img_size = c.crops.global_size
        c.batch_size = 32 if arg == "demo" else 8
        c.steps_per_epoch = 50 if arg == "demo" else 10
        c.epochs = 6 if arg == "demo" else 3
        c.optim.warmup_epochs = 1
        c.optim.layerwise_decay = 1.0
        c.ssl.warmup_teacher_temp_epochs = 2
        c.augment.vflip = 0.5
        c.augment.rot90 = True
        if arg == "demo":
            # Tuned so that 300 steps leave DINO's uniform fixed point (README, issue 16): a
            # higher lr (2e-2 * sqrt(32/1024) = 3.5e-3), DINO's teacher temperature 0.04
            # throughout, a teacher that keeps following the student (0.98 -> 0.995), and
            # milder views (larger crops, no solarisation) whose assignments a 0.5 M-parameter
            # ViT can predict across views. With DINOv2's values the DINO term stays at ln K.
            c.optim.base_lr = 2e-2
            c.ssl.teacher_temp = 0.04
            c.ssl.momentum_teacher = 0.98
            c.ssl.final_momentum_teacher = 0.995
            c.crops.global_scale = (0.5, 1.0)
            c.crops.local_scale = (0.2, 0.5)
            c.augment.solarize = 0.0
            c.optim.weight_decay_end = 0.04  # DINOv2's 0.4 erodes the kNN gain late in the run
        else:
            c.optim.base_lr = 5e-3
            c.ssl.momentum_teacher = 0.99
        c.log_every = 10 if arg == "demo" else 5
        c.checkpoint_every = 100 if arg == "demo" else 10
        if arg == "demo":
            c.data.source = "folder"
            c.data.path = "/tmp/cfm_demo/tiles"
            # the labelled H&E-like tiles of `data_prep.demo_tiles --probe-out`: ~13 of each
            # class to fit on (few labels, where pretraining matters most), ~115 held out
            for name in ("knn", "linear"):
                c.evals[name].every = 50
                c.evals[name].path = "/tmp/cfm_demo/probe"
                c.evals[name].test_fraction = 0.9
            c.evals.health.every = 50
        else:
            c.evals.health.every = 0  # the tests switch evaluators on where they test them
            c.data.synthetic_size = 64
            c.data.synthetic_image_size = 48
    else:
        raise ValueError(
                f"configs/dino_vit.py: unknown preset {arg!r}; choose one of demo, test, vit_s16, "
                "vit_b16, vit_l16, vit_g14, uni, phikon2")
    return c
