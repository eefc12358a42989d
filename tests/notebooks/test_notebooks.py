"""Every notebook under notebooks/ runs top to bottom in a fresh Jupyter kernel, offline and small
(LVM_JAX_NOTEBOOK_LOCAL pointing at the stand-ins of local_assets.py); its last cell asserts what it achieved.
The committed notebooks carry no outputs, open with their Colab badge and install cell, and the README lists them."""

import json
import pathlib
import re

import nbformat
import pytest
from nbclient import NotebookClient

from tests.notebooks import local_assets

REPO = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
LOCAL_VARIABLE = "LVM_JAX_NOTEBOOK_LOCAL"
COLAB = "https://colab.research.google.com/github/OWNER/lvm_jax/blob/main/notebooks/"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  return local_assets.write(tmp_path_factory.mktemp("notebook_assets"))


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("notebook_tfds")


def test_there_is_a_notebook_for_each_task_so_far():
  assert [p.name for p in NOTEBOOKS] == [
    "01_classify_with_a_pretrained_vit.ipynb",
    "02_finetune_a_cnn_on_your_images.ipynb",
    "03_train_a_vit_from_scratch.ipynb",
    "04_scaling_over_devices.ipynb",
    "05_object_detection.ipynb",
  ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, assets, tfds_dir, tmp_path, monkeypatch):
  monkeypatch.setenv(LOCAL_VARIABLE, str(assets))
  monkeypatch.setenv("TFDS_DATA_DIR", str(tfds_dir))  # the built-in digits, prepared once for all notebooks
  monkeypatch.delenv("XLA_FLAGS", raising=False)  # a kernel as a user starts it: one CPU device unless it asks
  notebook = nbformat.read(path, as_version=4)
  client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
  client.execute()  # raises CellExecutionError, with the cell and its traceback, on the first failing cell
  last = [cell for cell in notebook.cells if cell.cell_type == "code"][-1]
  printed = "".join(output.get("text", "") for output in last.outputs)
  assert printed.startswith("ok:"), printed
  figures = [o for cell in notebook.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
  assert len(figures) >= 2, "every notebook draws its results"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_has_no_outputs(path):
  notebook = json.loads(path.read_text())
  for i, cell in enumerate(notebook["cells"]):
    if cell["cell_type"] == "code":
      assert cell["outputs"] == [] and cell["execution_count"] is None, f"{path.name}: cell {i} has outputs"
  assert "widgets" not in notebook["metadata"]
  nbformat.validate(nbformat.reads(path.read_text(), as_version=4))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_opens_with_its_colab_badge_and_the_install_cell(path):
  cells = nbformat.read(path, as_version=4).cells
  assert cells[0].cell_type == "markdown" and f"({COLAB}{path.name})" in cells[0].source
  code = [c.source for c in cells if c.cell_type == "code"]
  install = [i for i, source in enumerate(code) if 'find_spec("lvm_jax")' in source]
  # First, or second after a cell that sets XLA_FLAGS (which must come before jax is imported).
  assert install in ([0], [1]) and "runtime_constraints.txt" in code[install[0]], install
  assert install == [0] or "XLA_FLAGS" in code[0]


def test_readme_lists_every_notebook_with_its_badge():
  readme = (REPO / "README.md").read_text()
  for path in NOTEBOOKS:
    assert re.search(rf"\]\({re.escape(COLAB + path.name)}\)", readme), path.name
    assert f"(notebooks/{path.name})" in readme, path.name
  assert LOCAL_VARIABLE in readme


def test_every_notebook_has_the_same_install_cell():
  # tests/test_packaging.py runs it in a Colab-like environment; that covers every notebook only if they agree.
  cells = {
    path.name: [c.source for c in nbformat.read(path, as_version=4).cells if 'find_spec("lvm_jax")' in c.source]
    for path in NOTEBOOKS
  }
  assert len({tuple(sources) for sources in cells.values()}) == 1, cells
