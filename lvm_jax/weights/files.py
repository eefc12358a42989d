"""Finding and reading checkpoint files safely: safetensors, npz without pickle, torch .bin weights only."""

import json
import os
import pathlib
from typing import Sequence

import numpy as np

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"


def resolve_folder(source: str, files: Sequence[str]) -> pathlib.Path:
  """A local folder as is, or a hub repository id downloaded (or found in the cache when offline)."""
  path = pathlib.Path(os.path.expanduser(str(source)))
  if path.is_dir():
    return path
  if path.exists():
    raise ValueError(f"{source} is a file; expected a checkpoint folder (config.json + weights) or a hub id.")
  if str(source).count("/") != 1 or str(source).startswith((".", "/", "~")):
    raise FileNotFoundError(f"{source} is neither an existing folder nor a hub repository id like 'org/name'.")
  import huggingface_hub  # imported here: only hub ids need it
  patterns = list(files) + ["*.json"]
  try:
    return pathlib.Path(huggingface_hub.snapshot_download(repo_id=str(source), allow_patterns=patterns))
  except Exception as online_error:  # no network or hub unreachable: fall back to the local cache
    try:
      return pathlib.Path(huggingface_hub.snapshot_download(
          repo_id=str(source), allow_patterns=patterns, local_files_only=True))
    except Exception:
      raise FileNotFoundError(
          f"Could not download {source!r} from the Hugging Face hub ({online_error.__class__.__name__}: "
          f"{online_error}) and it is not in the local cache.") from online_error


def read_json(path: pathlib.Path) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"{path} is missing: a checkpoint folder needs its config.json.") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from None


def read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file
  try:
    return load_file(str(path))
  except Exception as e:
    raise ValueError(f"{path} is not a readable safetensors file: {e}") from None


def read_torch_bin(path: pathlib.Path) -> dict[str, np.ndarray]:
  """PyTorch .bin files are pickles: read only with torch's weights_only loader, never a plain unpickle."""
  try:
    import torch
  except ImportError:
    raise ImportError(f"{path} is a PyTorch .bin checkpoint; reading it safely needs torch installed "
                      "(torch.load(weights_only=True)). Convert it to safetensors to read it without torch.") from None
  try:
    state = torch.load(str(path), map_location="cpu", weights_only=True)
  except Exception as e:
    raise ValueError(f"{path} could not be read as a weights-only PyTorch checkpoint: {e}") from None
  return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}


def read_npz(path: pathlib.Path) -> dict[str, np.ndarray]:
  try:
    with np.load(str(path), allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  except ValueError as e:
    raise ValueError(f"{path} holds pickled objects or is not a valid .npz ({e}); refusing to unpickle it.") from None


def read_weights(folder: pathlib.Path) -> dict[str, np.ndarray]:
  """The state dict in a transformers/timm folder: safetensors (sharded or not) preferred, else torch .bin."""
  for name, index, reader in ((SAFETENSORS, SAFETENSORS_INDEX, read_safetensors),
                              (TORCH_BIN, TORCH_BIN_INDEX, read_torch_bin)):
    if (folder / name).exists():
      return reader(folder / name)
    if (folder / index).exists():
      shards = sorted(set(read_json(folder / index)["weight_map"].values()))
      tensors = {}
      for shard in shards:
        tensors.update(reader(folder / shard))
      return tensors
  raise FileNotFoundError(f"{folder} has no weights: expected {SAFETENSORS}, {SAFETENSORS_INDEX} or {TORCH_BIN}.")


def write_safetensors(tensors: dict[str, np.ndarray], path: pathlib.Path) -> None:
  """Writes through a temporary file so a killed save never leaves a half-written checkpoint."""
  from safetensors.numpy import save_file
  tmp = path.with_name(path.name + ".tmp")
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
  os.replace(tmp, path)


def write_json(data: dict, path: pathlib.Path) -> None:
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "w") as f:
    json.dump(data, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)
