"""cfm: pod-scale JAX pretraining of multimodal cancer foundation models."""
from setuptools import find_packages, setup

setup(
    name="cfm",
    version="0.1.0",
    description="Pretrain and fine-tune multimodal cancer foundation models in JAX.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["cfm", "cfm.*", "data_prep", "data_prep.*", "launch",
                                    "launch.*"]),
    install_requires=[
        "jax>=0.6.0",
        "flax>=0.10.4",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11.0",
        "tensorstore>=0.1.70",
        "grain>=0.2.10",
        "numpy>=1.26",
        "ml-collections>=1.0.0",
        "absl-py>=2.1",
        "pillow>=10.0",  # PNG/JPEG decode and crop resizing in the data pipeline
        "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow
        "matplotlib>=3.8",  # the loss-curve PNG left in every workdir
        "safetensors>=0.8.0",  # exported weights: no pickle, readable by timm/PyTorch users
        "pandas>=2.0",  # omics tables and clinical data (data_prep.prepare_omics, cfm.finetune)
        "scikit-learn>=1.4",  # baselines, probes and metrics of cfm.finetune (and KNNImputer)
        "lifelines>=0.28",  # Cox baselines, Kaplan-Meier and log-rank in cfm.finetune reports
        "scikit-activeml>=1.0",  # cfm.active's selection strategies (uncertainty, coreset, CLUE)
    ],
    extras_require={
        # openslide-bin ships the OpenSlide C library as a wheel: no system package needed.
        "slides": ["openslide-python>=1.4", "openslide-bin>=4.0", "tifffile>=2024.1",
                   "scipy>=1.11"],
        # Parquet and AnnData (.h5ad) inputs of data_prep.prepare_omics.
        "omics": ["pyarrow>=14", "anndata>=0.10"],
        # Flower (cfm.federated): ServerApp / ClientApp, SuperLink / SuperNode, DP clipping
        # mod and RDP accountant ([dp] = Google's dp-accounting); minor version pinned, the API
        # moves quickly.
        "federated": ["flwr[dp]>=1.42,<1.43"],
        # pytest-xdist: README command (b) runs the test files on two worker processes.
        "test": ["pytest>=8.0", "pytest-xdist>=3.5", "scikit-image>=0.24",
                 "openslide-python>=1.4", "openslide-bin>=4.0", "tifffile>=2024.1", "scipy>=1.11",
                 "pyarrow>=14", "anndata>=0.10", "flwr[dp]>=1.42,<1.43"],
        # scikit-image ships the real IHC image the README demo trains on; tensorboard serves
        # the curves of the README's `tensorboard --logdir` command.
        "demo": ["scikit-image>=0.24", "tensorboard>=2.16"],
        "tpu": ["jax[tpu]"],
        # gs:// workdirs: orbax/tensorstore write checkpoints themselves; the metrics (etils
        # epath, tensorboardX) need these.
        "gcs": ["gcsfs", "google-cloud-storage"],
        # Only to check timm exports against cfm (tests/test_export.py); versions that import
        # together (torch 2.14.1 is the x86_64 wheel pip finds locally on our CI image).
        "torch": ["torch==2.14.1", "torchvision==0.29.1", "timm==1.0.31"],
    },
)
