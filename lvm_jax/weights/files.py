"""Finding and reading checkpoint files safely: safetensors, npz without pickle, torch .bin weights only."""

import contextlib
import hashlib
import json
import os
import pathlib
import re
import secrets
import stat
import urllib.request
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
      return pathlib.Path(
        huggingface_hub.snapshot_download(repo_id=str(source), allow_patterns=patterns, local_files_only=True)
      )
    except Exception:
      raise FileNotFoundError(
        f"Could not download {source!r} from the Hugging Face hub ({online_error.__class__.__name__}: "
        f"{online_error}) and it is not in the local cache."
      ) from online_error


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
  """PyTorch .bin files are pickles: read only with torch's weights_only loader, never a plain unpickle.

  The file holds a flat dict of tensor name -> tensor (torch.save(model.state_dict())), or a training
  checkpoint with that dict under "state_dict" or "model" (timm's train.py, many scripts), which is unwrapped.
  """
  try:
    import torch
  except ImportError:
    raise ImportError(
      f"{path} is a PyTorch .bin checkpoint; reading it safely needs torch installed "
      "(torch.load(weights_only=True)). Convert it to safetensors to read it without torch."
    ) from None
  try:
    loaded = torch.load(str(path), map_location="cpu", weights_only=True)
  except Exception as e:
    raise ValueError(
      f"{path} could not be read as a weights-only PyTorch checkpoint. Objects other than tensors "
      "and plain containers (a training checkpoint's argparse arguments, ...) are never unpickled: "
      "save the state dict alone, torch.save(model.state_dict(), path). torch.load said: "
      f"{e}"
    ) from None
  state = _state_dict(loaded, path, torch.Tensor)
  return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}


_TORCH_LAYOUT = "a flat dict of tensor name -> tensor, as torch.save(model.state_dict()) writes"
# Where training checkpoints keep the model's state dict, in the order timm's own loader looks.
_STATE_DICT_KEYS = ("state_dict", "model")


def _state_dict(loaded, path: pathlib.Path, tensor_type: type) -> dict:
  """The flat {name: tensor} dict in what torch.load returned, unwrapped from a training checkpoint (torch.Tensor
  comes in as tensor_type: only the .bin reader imports torch)."""
  if not isinstance(loaded, dict):
    raise ValueError(f"{path} holds a {type(loaded).__name__}; expected {_TORCH_LAYOUT}.")
  where = ""
  if not all(isinstance(v, tensor_type) for v in loaded.values()):
    for key in _STATE_DICT_KEYS:
      if isinstance(loaded.get(key), dict):
        loaded, where = loaded[key], f"[{key!r}]"
        break
  bad = [(k, v) for k, v in loaded.items() if not (isinstance(k, str) and isinstance(v, tensor_type))]
  if not bad:
    return loaded
  listed = ", ".join(f"{k!r} ({type(v).__name__})" for k, v in bad[:5])
  more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
  nested = [k for k, v in bad if isinstance(v, dict) and v and all(isinstance(t, tensor_type) for t in v.values())]
  hint = (
    (
      f" The tensors may be the dict under {nested[0]!r}: save it alone with "
      f"torch.save(checkpoint[{nested[0]!r}], ...)."
    )
    if nested and not where
    else ""
  )
  raise ValueError(
    f"{path}{where} holds entries that are not tensors: {listed}{more}. Expected {_TORCH_LAYOUT}, "
    f"or that dict under {' or '.join(repr(k) for k in _STATE_DICT_KEYS)}.{hint}"
  )


def read_npz(path: pathlib.Path) -> dict[str, np.ndarray]:
  try:
    with np.load(str(path), allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  except ValueError as e:
    raise ValueError(f"{path} holds pickled objects or is not a valid .npz ({e}); refusing to unpickle it.") from None


def read_weights(folder: pathlib.Path) -> dict[str, np.ndarray]:
  """The state dict in a transformers/timm folder: safetensors (sharded or not) preferred, else torch .bin."""
  for name, index, reader in (
    (SAFETENSORS, SAFETENSORS_INDEX, read_safetensors),
    (TORCH_BIN, TORCH_BIN_INDEX, read_torch_bin),
  ):
    if (folder / name).exists():
      return reader(folder / name)
    if (folder / index).exists():
      shards = sorted(set(read_json(folder / index)["weight_map"].values()))
      tensors = {}
      for shard in shards:
        tensors.update(reader(folder / shard))
      return tensors
  raise FileNotFoundError(f"{folder} has no weights: expected {SAFETENSORS}, {SAFETENSORS_INDEX} or {TORCH_BIN}.")


@contextlib.contextmanager
def _replaced_atomically(path: pathlib.Path):
  """Yields a temporary path beside `path` to write; on success it becomes `path` in one rename, so a killed save
  never leaves a half-written file. The result gets the mode a plain open() gives (0666 less the umask):
  safetensors writes through its own 0600 temporary, so the mode is read off one we create, never by os.umask
  (setting the umask to read it races with other threads)."""
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  try:
    mode = stat.S_IMODE(os.fstat(fd).st_mode)
  finally:
    os.close(fd)
  try:
    yield tmp
    os.chmod(tmp, mode)
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


def write_safetensors(tensors: dict[str, np.ndarray], path: pathlib.Path) -> None:
  from safetensors.numpy import save_file

  with _replaced_atomically(path) as tmp:
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})


def write_json(data: dict, path: pathlib.Path) -> None:
  with _replaced_atomically(path) as tmp:
    with open(tmp, "w") as f:
      json.dump(data, f, indent=2, sort_keys=True)
      f.write("\n")


def is_state_dict_file(source) -> bool:
  """Whether `source` names a single state-dict file (local or http(s)) rather than a folder or hub id."""
  name = str(source).split("?")[0]
  return name.endswith((".safetensors", ".pth", ".pt", ".bin")) and not os.path.isdir(name)


# torchvision's (and torch.hub's) file names end in the first hex digits of the file's sha256: name-<digits>.pth
_HASH_PREFIX = re.compile(r"-([0-9a-f]{8,})\.[^.]+$")
DOWNLOAD_TIMEOUT_S = 60


def fetch(url_or_path: str) -> pathlib.Path:
  """A local copy of a checkpoint file: a path as it is, an http(s) URL (torchvision publishes its weights at
  download.pytorch.org) downloaded once into $LVM_JAX_CACHE/downloads/<hash of the URL>/ (default
  ~/.cache/lvm_jax), written to a temporary name and renamed, so an interrupted download is never read. A file
  name carrying a sha256 prefix (torchvision's) is checked against the downloaded bytes, as torch.hub does."""
  url = str(url_or_path)
  if not url.startswith(("http://", "https://")):
    return pathlib.Path(url_or_path)
  name = os.path.basename(url.split("?")[0])
  cache = pathlib.Path(os.environ.get("LVM_JAX_CACHE") or pathlib.Path.home() / ".cache" / "lvm_jax") / "downloads"
  target = cache / hashlib.sha256(url.encode()).hexdigest()[:16] / name  # one URL, one file: same names may differ
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  partial = target.with_name(f"{name}.{os.getpid()}.partial")
  digest = hashlib.sha256()
  try:
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(partial, "wb") as out:
      while chunk := response.read(1 << 20):
        digest.update(chunk)
        out.write(chunk)
  except OSError as e:
    partial.unlink(missing_ok=True)
    raise OSError(f"Downloading {url} failed: {e}") from None
  expected = _HASH_PREFIX.search(name)
  if expected and not digest.hexdigest().startswith(expected.group(1)):
    partial.unlink(missing_ok=True)
    raise OSError(
      f"Downloading {url}: its sha256 is {digest.hexdigest()}, not the {expected.group(1)}... its name promises; "
      "the file was not kept."
    )
  os.replace(partial, target)
  return target


def read_state_dict(path) -> dict[str, np.ndarray]:
  """A state dict from a .safetensors file, or a .pth / .pt / .bin file read by torch.load(weights_only=True)
  (needs torch; nothing is ever unpickled otherwise)."""
  path = pathlib.Path(path)
  if path.suffix == ".safetensors":
    return read_safetensors(path)
  if path.suffix in (".pth", ".pt", ".bin"):
    return read_torch_bin(path)
  raise ValueError(f"{path}: expected a .safetensors file or a PyTorch .pth/.pt/.bin state dict.")
