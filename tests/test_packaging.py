"""lvm_jax installed into a Colab-like environment by the notebooks' install cell: a real install into a fresh
virtual environment.

Colab's GPU/CPU runtimes hold the full `tensorflow` and their own jax; its TPU runtimes hold jax and no TensorFlow.
Installing lvm_jax must leave both as they are (no tensorflow-cpu beside tensorflow, no jax upgrade), and without
TensorFlow the models still run while the input pipeline says in one line how to get it. The packages come from the
package registry, so it must be reachable, and the test takes a while (tensorflow's wheel alone is 0.57 GB).
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).parents[1]
RUNTIME = {"tensorflow": "2.21.0", "jax": "0.10.2", "jaxlib": "0.10.2"}  # what the runtime had before lvm_jax

_VERSIONS = """
import importlib.metadata, json
print(json.dumps({d.metadata["Name"].lower().replace("_", "-"): d.version for d in importlib.metadata.distributions()}))
"""

# With TensorFlow: the models and a tf.data map through lvm_jax's own pp ops (TensorFlow taken from lvm_jax.tf_host).
_WITH_TF = """
import json
import jax, numpy as np
import lvm_jax, lvm_jax.data.pipeline
from lvm_jax.data import pp
from lvm_jax.tf_host import tf

ds = tf.data.Dataset.from_tensor_slices({"image": np.full((2, 8, 8, 3), 255, np.uint8), "label": [0, 2]})
for op in pp.parse("resize(16)|value_range(-1, 1)|onehot(3)"):
  ds = ds.map(op)
batch = next(ds.batch(2).as_numpy_iterator())
model = lvm_jax.create_model("vit_ti16", num_classes=3, image_size=16)
logits = model.apply(model.init(jax.random.key(0), batch["image"], train=False), batch["image"], train=False)
print(json.dumps({"lvm_jax": lvm_jax.__file__, "tf": tf.__version__, "image": batch["image"].tolist()[0][0][0],
                  "label": batch["label"].tolist(), "logits": list(logits.shape)}))
"""

# Without TensorFlow: the models run, and the input pipeline's import fails with tf_host's message.
_WITHOUT_TF = """
import json, sys
import jax, numpy as np
import lvm_jax
model = lvm_jax.create_model("vit_ti16", num_classes=3, image_size=16)
x = np.zeros((1, 16, 16, 3), np.float32)
logits = model.apply(model.init(jax.random.key(0), x, train=False), x, train=False)
try:
  import lvm_jax.tf_host
  error = None
except ImportError as e:
  error = [type(e).__name__, str(e)]
print(json.dumps({"logits": list(logits.shape), "error": error, "tf_loaded": "tensorflow" in sys.modules}))
"""


def notebook_install_cell() -> str:
  """The install cell every notebook opens with (tests/notebooks checks that they are the same)."""
  notebook = json.loads((REPO / "notebooks" / "01_classify_with_a_pretrained_vit.ipynb").read_text())
  (cell,) = [
    c for c in notebook["cells"] if c["cell_type"] == "code" and 'find_spec("lvm_jax")' in "".join(c["source"])
  ]
  return "".join(cell["source"])


def _run(args, cwd):
  # A process as a fresh runtime starts it: not this venv's, and one CPU device (no conftest XLA_FLAGS).
  env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "XLA_FLAGS")}
  result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True)
  assert result.returncode == 0, f"{' '.join(map(str, args))} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
  return result.stdout


def _json(python, code, cwd):
  return json.loads(_run([python, "-c", code], cwd).strip().splitlines()[-1])


@pytest.fixture(scope="module")
def colab_gpu_runtime(tmp_path_factory):
  """A venv holding Colab's tensorflow and jax, then lvm_jax installed into it; what it had before and after."""
  root = tmp_path_factory.mktemp("colab")
  _run([sys.executable, "-m", "venv", root / "venv"], root)
  python = root / "venv" / "bin" / "python"
  _run([python, "-m", "pip", "install", *(f"{name}=={version}" for name, version in RUNTIME.items())], root)
  before = _json(python, _VERSIONS, root)
  # The notebooks' install cell, run where Colab would have cloned the repository (./lvm_jax): it installs the
  # clone with its extras. Only what the package is built from is copied, so nothing is built inside REPO.
  clone = root / "lvm_jax"
  shutil.copytree(REPO / "lvm_jax", clone / "lvm_jax", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(REPO / name, clone / name)
  installed = _run([python, "-c", notebook_install_cell()], root).strip().splitlines()[-1]
  # Later processes start elsewhere: in root, the clone's folder would shadow the install as a namespace package.
  work = root / "work"
  work.mkdir()
  after = _json(python, _VERSIONS, work)
  # Run here, while TensorFlow is installed: test_models_run_without_tensorflow uninstalls it.
  with_tf = _json(python, _WITH_TF, work)
  yield {
    "root": root,
    "work": work,
    "python": python,
    "before": before,
    "after": after,
    "with_tf": with_tf,
    "installed": installed,
  }
  shutil.rmtree(root, ignore_errors=True)  # 2.6 GB, and pytest keeps its last three temporary directories


def test_install_keeps_the_runtime_tensorflow_and_jax(colab_gpu_runtime):
  before, after = colab_gpu_runtime["before"], colab_gpu_runtime["after"]
  assert {name: before.get(name) for name in RUNTIME} == RUNTIME
  assert {name: after.get(name) for name in RUNTIME} == RUNTIME  # nothing upgraded or replaced
  assert "tensorflow-cpu" not in after  # one TensorFlow, the runtime's
  assert "lvm-jax" in after and "lvm-jax" not in before

  out = colab_gpu_runtime["with_tf"]
  assert colab_gpu_runtime["installed"] == "jax 0.10.2, CPU runtime: 1 x cpu"  # the cell's report
  assert "matplotlib" in after  # the notebooks extra
  assert pathlib.Path(out["lvm_jax"]).is_relative_to(colab_gpu_runtime["root"] / "lvm_jax")  # the clone, not REPO
  assert out["tf"] == RUNTIME["tensorflow"]
  assert out["image"] == [1.0, 1.0, 1.0] and out["label"] == [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
  assert out["logits"] == [2, 3]


def test_models_run_without_tensorflow(colab_gpu_runtime):
  """A TPU runtime has no TensorFlow: the same environment with it uninstalled (the fixture's checks ran before)."""
  python, root = colab_gpu_runtime["python"], colab_gpu_runtime["work"]
  _run([python, "-m", "pip", "uninstall", "--yes", "tensorflow"], root)
  assert "tensorflow" not in _json(python, _VERSIONS, root)

  out = _json(python, _WITHOUT_TF, root)
  assert out["logits"] == [1, 3]
  assert not out["tf_loaded"]
  from lvm_jax.tf_host import MISSING_TENSORFLOW

  assert out["error"] == ["ModuleNotFoundError", MISSING_TENSORFLOW]
  assert "\n" not in MISSING_TENSORFLOW and "pip install" in MISSING_TENSORFLOW
