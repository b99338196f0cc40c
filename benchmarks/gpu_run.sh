#!/usr/bin/env bash
# Issue 19 item 2 on one NVIDIA GPU, in one device call (about 5-8 minutes on an H100):
#   1. benchmarks/gpu_check.py: loss and gradients, cuDNN flash attention vs XLA (bf16, f32 ref);
#   2. benchmarks/train_step.py: ViT-L/16 DINOv2 step, bf16, cuDNN attention, MFU against the
#      bf16 peak, and the PyTorch reference step (SDPA, bf16 autocast) on the same GPU first.
# The device machine has no package registry; its image has jax, flax, optax, orbax, torch and
# timm but not cfm's ml_collections and grain (+ array_record, portpicker). Fetch their wheels
# here once (they land in build/whl, which .gitignore's build/ keeps out of git):
#   bash benchmarks/gpu_run.sh --fetch-wheels
# then, with the device tool: run(command="bash benchmarks/gpu_run.sh", carry=["build/whl"],
# timeout_s=560). Logs go to $OUT (or /tmp/gpu_run) as gpu_check.log and train_step_l16.log.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS="grain==0.2.18 array_record==0.8.6 ml_collections==1.1.0 portpicker==1.6.0"
if [[ "${1:-}" == "--fetch-wheels" ]]; then
  exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d build/whl $WHEELS
fi
ls build/whl/*.whl >/dev/null || { echo "no build/whl/*.whl: run with --fetch-wheels here" \
  "and carry build/whl"; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site build/whl/*.whl || exit 2
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
LOG="${OUT:-/tmp/gpu_run}"; mkdir -p "$LOG"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import jax, flax, optax, torch; print('jax', jax.__version__, 'flax', \
flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, jax.devices())" || exit 2

timeout 180 python3 benchmarks/gpu_check.py 2>&1 | tee "$LOG/gpu_check.log"
step() {  # batch -> the ViT-L/16 step with its PyTorch peer
  timeout 330 python3 benchmarks/train_step.py --variant vit_l16 --batch "$1" --steps 5 \
    --dtype bfloat16 --attention cudnn --peer torch --allocator system 2>&1 \
    | tee "$LOG/train_step_l16.log"
}
step 64 || { echo "batch 64 failed (memory?): batch 32"; step 32; }
