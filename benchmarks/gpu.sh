#!/usr/bin/env bash
# Training throughput and MFU on one accelerator, in bfloat16: ViT-B/16 and ResNet-50 (benchmarks/models.py,
# lvm_jax only). Needs jax with the accelerator's plugin, flax, optax and Pillow, and this checkout (put on
# PYTHONPATH here): no TensorFlow, no PyTorch, no install step. A few minutes on an H100. Writes into OUT_DIR:
#   environment.txt                  jax, flax, optax versions, the devices, XLA_FLAGS
#   vit_b16.md/.json, resnet50.md/.json   the tables (img/s, GFLOP/s, MFU, compile time)
#   log.txt                          everything printed, with the peak each MFU is taken against
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
python=${PYTHON:-python3}

"$python" - <<'PY' | tee "$out/environment.txt"
import os, jax, flax, optax
print(f"jax {jax.__version__}, flax {flax.__version__}, optax {optax.__version__}")
print(f"devices: {jax.devices()}")
print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}")
PY

: > "$out/log.txt"
for spec in "vit_b16 ${VIT_BATCH:-256}" "resnet50 ${RESNET_BATCH:-256}"; do
  set -- $spec
  "$python" benchmarks/models.py --models "$1" --batch "$2" --dtype bfloat16 --no-torch \
    --seconds "${MEASURE_SECONDS:-10}" --out "$out/$1.md" --out "$out/$1.json" 2>&1 | tee -a "$out/log.txt"
done
echo "tables in $out"
