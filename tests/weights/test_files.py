"""Checkpoint files as users have them: PyTorch .bin layouts (flat state dicts, training checkpoints that wrap
one, and what is refused), and the files save_pretrained writes (atomic, with the usual permissions)."""

import argparse
import functools
import hashlib
import http.server
import os
import pathlib
import shutil
import stat
import threading

import numpy as np
import pytest
import safetensors.numpy
import torch

import lvm_jax
from lvm_jax.weights import files

FIXTURE = pathlib.Path(__file__).parent.parent / "fixtures" / "timm" / "vit_token"


def reference():
  with np.load(FIXTURE / "reference.npz") as data:
    return data["input"], data["logits"]


@pytest.fixture
def bin_folder(tmp_path):
  """A timm folder whose weights are a pytorch_model.bin (written by each test); the state dict to put in it."""
  folder = tmp_path / "ckpt"
  folder.mkdir()
  shutil.copy(FIXTURE / "config.json", folder / "config.json")
  state = {k: torch.from_numpy(v) for k, v in safetensors.numpy.load_file(FIXTURE / "model.safetensors").items()}
  return folder, state


@pytest.mark.parametrize(
  "wrap",
  [
    lambda sd: sd,  # torch.save(model.state_dict())
    lambda sd: {"state_dict": sd, "epoch": 3, "arch": "vit", "metric": 0.5},  # timm's train.py checkpoint
    lambda sd: {"model": sd, "optimizer": {"state": {}, "param_groups": []}, "epoch": 7},
  ],
  ids=["flat", "state_dict", "model"],
)
def test_torch_bin_flat_or_wrapped_loads_with_the_same_logits(bin_folder, wrap):
  folder, state = bin_folder
  torch.save(wrap(state), folder / files.TORCH_BIN)
  model, variables = lvm_jax.from_pretrained(folder)
  x, logits = reference()
  np.testing.assert_allclose(model.apply(variables, x), logits, atol=1e-4, rtol=0)


def test_torch_bin_with_non_tensor_entries_names_them(bin_folder):
  folder, state = bin_folder
  torch.save({**state, "epoch": 3, "step": 100}, folder / files.TORCH_BIN)
  with pytest.raises(
    ValueError,
    match=r"pytorch_model.bin holds entries that are not tensors: 'epoch' \(int\), "
    r"'step' \(int\)\. Expected a flat dict of tensor name -> tensor",
  ):
    lvm_jax.from_pretrained(folder)


def test_torch_bin_with_the_state_dict_under_another_key_says_which(bin_folder):
  folder, state = bin_folder
  torch.save({"ema": state, "epoch": 3}, folder / files.TORCH_BIN)
  with pytest.raises(
    ValueError,
    match=r"not tensors: 'ema' \(dict\), 'epoch' \(int\).*under 'state_dict' or "
    r"'model'\. The tensors may be the dict under 'ema'",
  ):
    lvm_jax.from_pretrained(folder)


def test_torch_bin_wrapped_state_dict_with_non_tensors_names_the_wrapper(bin_folder):
  folder, state = bin_folder
  torch.save({"state_dict": {**state, "num_updates": 5}}, folder / files.TORCH_BIN)
  with pytest.raises(
    ValueError,
    match=r"pytorch_model.bin\['state_dict'\] holds entries that are not tensors: "
    r"'num_updates' \(int\)",
  ):
    lvm_jax.from_pretrained(folder)


def test_torch_bin_that_is_not_a_dict(bin_folder):
  folder, state = bin_folder
  torch.save(list(state.values()), folder / files.TORCH_BIN)
  with pytest.raises(ValueError, match=r"pytorch_model.bin holds a list; expected a flat dict of tensor name"):
    lvm_jax.from_pretrained(folder)


def test_torch_bin_with_pickled_objects_is_refused(bin_folder):
  folder, state = bin_folder
  torch.save({"state_dict": state, "args": argparse.Namespace(lr=0.1)}, folder / files.TORCH_BIN)
  with pytest.raises(
    ValueError,
    match=r"(?s)could not be read as a weights-only.*save the state dict alone.*"
    r"argparse.Namespace",
  ):
    lvm_jax.from_pretrained(folder)


# ------------------------------------------------------------------------------------------ save_pretrained


@pytest.fixture
def umask():
  """Sets the process umask for one test (returns the setter), restoring it after."""
  old = os.umask(0o022)
  os.umask(old)
  yield os.umask
  os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_save_pretrained_files_get_the_usual_permissions(tmp_path, umask, mask):
  ckpt = lvm_jax.load_checkpoint(FIXTURE)
  umask(mask)
  folder = lvm_jax.save_pretrained(ckpt.model, ckpt.variables, tmp_path / "out", preprocessing=ckpt.preprocessing)
  written = sorted(p.name for p in folder.iterdir())
  assert written == ["config.json", "model.safetensors", "preprocessor_config.json"]  # no temporaries left
  for name in written:
    assert stat.S_IMODE((folder / name).stat().st_mode) == 0o666 & ~mask, name


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
  ckpt = lvm_jax.load_checkpoint(FIXTURE)
  folder = lvm_jax.save_pretrained(ckpt.model, ckpt.variables, tmp_path / "out")
  before = {p.name: p.read_bytes() for p in folder.iterdir()}

  def dies_half_way(tensors, filename, metadata=None):
    pathlib.Path(filename).write_bytes(b"half a checkpoint")
    raise KeyboardInterrupt

  monkeypatch.setattr(safetensors.numpy, "save_file", dies_half_way)
  with pytest.raises(KeyboardInterrupt):
    lvm_jax.save_pretrained(ckpt.model, ckpt.variables, folder)
  assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
  model, variables = lvm_jax.from_pretrained(folder)
  x, logits = reference()
  np.testing.assert_allclose(model.apply(variables, x), logits, atol=1e-4, rtol=0)


@pytest.fixture
def http_server(tmp_path):
  """A real HTTP server on localhost serving tmp_path/served/: (base URL, folder)."""
  served = tmp_path / "served"
  served.mkdir()
  handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
  handler.log_message = lambda *args: None
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield f"http://127.0.0.1:{server.server_address[1]}", served
  server.shutdown()
  thread.join()


def test_fetch_downloads_once_per_url_and_checks_the_hash_in_the_name(http_server, tmp_path, monkeypatch):
  base, served = http_server
  monkeypatch.setenv("LVM_JAX_CACHE", str(tmp_path / "cache"))
  data = b"weights" * 1000
  prefix = hashlib.sha256(data).hexdigest()[:8]
  for folder, content in (("a", data), ("b", data + b"!")):  # two files of one name under different URLs
    (served / folder).mkdir()
    (served / folder / f"model-{prefix}.pth").write_bytes(content)
  first = files.fetch(f"{base}/a/model-{prefix}.pth")
  assert first.read_bytes() == data and first.name == f"model-{prefix}.pth"
  (served / "a" / f"model-{prefix}.pth").unlink()  # cached: not asked for again
  assert files.fetch(f"{base}/a/model-{prefix}.pth") == first
  # the same name from elsewhere is another file, and its bytes do not match the name's sha256 prefix
  with pytest.raises(OSError, match=f"sha256 is .*, not the {prefix}... its name promises; the file was not kept"):
    files.fetch(f"{base}/b/model-{prefix}.pth")
  assert [p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()] == [first.name]  # no partial file left
  with pytest.raises(OSError, match=r"Downloading .*/missing\.pth failed: HTTP Error 404"):
    files.fetch(f"{base}/missing.pth")
  assert files.fetch(str(tmp_path / "local.pth")) == tmp_path / "local.pth"  # a path is used where it is
