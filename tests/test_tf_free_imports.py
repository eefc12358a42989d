"""The models and the train step import without TensorFlow: they run on accelerator images that lack it."""

import subprocess
import sys

MODULES = ("lvm_jax", "lvm_jax.models.registry", "lvm_jax.train.steps", "lvm_jax.train.state",
           "lvm_jax.train.optimizer", "lvm_jax.train.throughput", "lvm_jax.data.device_batches",
           "lvm_jax.data.host_memory", "lvm_jax.parallel.partitioning")


def _imports_tensorflow(module: str) -> bool:
  code = f"import sys, {module}; print('tensorflow' in sys.modules)"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  return out.stdout.strip().splitlines()[-1] == "True"


def test_models_and_train_step_import_without_tensorflow():
  assert [m for m in MODULES if _imports_tensorflow(m)] == []
  assert _imports_tensorflow("lvm_jax.data.pipeline")  # the check itself can see TensorFlow
