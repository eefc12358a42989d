#!/usr/bin/env bash
# Training throughput and MFU on one accelerator, in bfloat16: ViT-B/16 and ResNet-50 (benchmarks/models.py).
# Needs jax with the accelerator's plugin, flax, optax and Pillow, and this checkout (put on PYTHONPATH here):
# no TensorFlow, no install step. Where torch and transformers import too, the PyTorch reference (eager, bf16
# autocast) runs beside it on the same device. A few minutes on an H100. Writes into OUT_DIR:
#   environment.txt                        jax, flax, optax (and torch) versions, the devices, XLA_FLAGS
#   attention_test.txt                     cuDNN flash attention vs XLA attention, outputs and gradients (pytest)
#   vit_b16.md/.json, resnet50.md/.json    the tables (img/s, GFLOP/s, MFU, compile time, torch and the ratio)
#   vit_b16_xla_attention.md/.json         ViT-B/16 with XLA's unfused attention instead of cuDNN's
#   profile/<model>/...                    jax.profiler traces of 3 train steps (PROFILE=0 skips them)
#   log.txt                                everything printed, with the peak each MFU is taken against
# MFU = published per-image MACs x 2 FLOPs x 3 (forward + backward) x img/s / the device's published dense
# bf16 peak (lvm_jax.train.throughput), so it counts model FLOPs, not rematerialised ones.
#
#   benchmarks/gpu.sh OUT_DIR
#   VIT_BATCH=2 RESNET_BATCH=2 MEASURE_SECONDS=1 benchmarks/gpu.sh /tmp/try    # a quick try on a CPU
set -euo pipefail
out=${1:?usage: benchmarks/gpu.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# JAX takes 75% of the GPU's memory at start by default; leave room for the PyTorch reference in the same process.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-.5}
python=${PYTHON:-python3}

"$python" - <<'PY' | tee "$out/environment.txt"
import os, jax, flax, optax
print(f"jax {jax.__version__}, flax {flax.__version__}, optax {optax.__version__}")
print(f"devices: {jax.devices()} ({jax.devices()[0].device_kind})")
print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}")
try:
  import torch, transformers
  print(f"torch {torch.__version__}, transformers {transformers.__version__}, cuda {torch.cuda.is_available()}")
except ImportError as e:
  print(f"no PyTorch reference: {e}")
PY
torch_flags=(--no-torch)
if "$python" -c "import torch, transformers" 2>/dev/null; then
  torch_flags=(--no-compile)  # eager only: torch.compile of a train step takes minutes a model
fi

if "$python" -c "import pytest" 2>/dev/null; then
  "$python" -m pytest -q -p no:cacheprovider tests/models/test_attention.py 2>&1 | tee "$out/attention_test.txt" \
    || true
fi

profile=()
if [[ "${PROFILE:-1}" != 0 ]]; then profile=(--profile "$out/profile"); fi
failed=0
bench() {  # name batch table-name [flags...]; a failure is logged and the next one still runs
  local name=$1 batch=$2 table=$3
  shift 3
  "$python" benchmarks/models.py --models "$name" --batch "$batch" --dtype bfloat16 \
    --seconds "${MEASURE_SECONDS:-10}" --out "$out/$table.md" --out "$out/$table.json" "$@" 2>&1 \
    | tee -a "$out/log.txt" || { echo "FAILED: $table" | tee -a "$out/log.txt"; failed=1; }
}
: > "$out/log.txt"
bench vit_b16 "${VIT_BATCH:-256}" vit_b16 "${torch_flags[@]}" "${profile[@]}"
bench resnet50 "${RESNET_BATCH:-256}" resnet50 "${torch_flags[@]}" "${profile[@]}"
bench vit_b16 "${VIT_BATCH:-256}" vit_b16_xla_attention --no-torch --attention-impl xla
echo "tables in $out"
exit $failed
