"""The models and the train step import without TensorFlow: they run on accelerator images that lack it."""

import subprocess
import sys

MODULES = (
  "lvm_jax",
  "lvm_jax.models.registry",
  "lvm_jax.train.steps",
  "lvm_jax.train.state",
  "lvm_jax.train.optimizer",
  "lvm_jax.train.throughput",
  "lvm_jax.data.device_batches",
  "lvm_jax.data.host_memory",
  "lvm_jax.parallel.partitioning",
)

# One fresh interpreter imports the modules in turn and names the first after which TensorFlow is loaded.
_FIRST_WITH_TF = """
import importlib, sys
for name in sys.argv[1:]:
  importlib.import_module(name)
  if "tensorflow" in sys.modules:
    print(name)
    break
else:
  print("none")
"""


def _first_importing_tensorflow(*modules: str) -> str:
  out = subprocess.run([sys.executable, "-c", _FIRST_WITH_TF, *modules], capture_output=True, text=True, check=True)
  return out.stdout.strip().splitlines()[-1]


def test_models_and_train_step_import_without_tensorflow():
  assert _first_importing_tensorflow(*MODULES) == "none"
  assert _first_importing_tensorflow("lvm_jax.data.pipeline") == "lvm_jax.data.pipeline"  # the check sees TF
