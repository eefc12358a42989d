"""Name-and-layout tables between lvm_jax variables and other libraries' flat tensor dicts.

A family converter lists one `Tensor` per variable: our path, their name, and how the layouts relate.
The same table converts both ways, so loading and saving can never disagree.
"""

import dataclasses
from typing import Callable, Iterable, Mapping

import numpy as np

Path = tuple[str, ...]

# How a tensor in PyTorch layout relates to ours:
#   "same"    identical shape (position embeddings, class token, bias tables)
#   "vector"  1-D there; ours may split it, e.g. a [heads * head_dim] bias as [heads, head_dim]
#   "linear"  torch.nn.Linear weight [out, in]; ours [in, *out] (a query kernel is [embed, heads, head_dim])
#   "linear2" as "linear" but ours has two input axes, [heads, head_dim, out] (attention output)
#   "conv"    torch [out, in, kh, kw]; ours [kh, kw, in, out]
LAYOUTS = ("same", "vector", "linear", "linear2", "conv")


@dataclasses.dataclass(frozen=True)
class Tensor:
  path: Path
  name: str
  layout: str = "same"

  def __post_init__(self):
    if self.layout not in LAYOUTS:
      raise ValueError(f"Unknown layout {self.layout!r} for {self.name}; expected one of {LAYOUTS}.")


def dense(ours: Path, theirs: str, layout: str = "linear", bias: bool = True) -> list[Tensor]:
  """A torch Linear (or Conv with layout="conv") named `theirs` against our kernel/bias under `ours`."""
  table = [Tensor(ours + ("kernel",), theirs + ".weight", layout)]
  if bias:
    table.append(Tensor(ours + ("bias",), theirs + ".bias", "vector"))
  return table


def norm(ours: Path, theirs: str) -> list[Tensor]:
  """A torch LayerNorm named `theirs` against our scale/bias under `ours`."""
  return [Tensor(ours + ("scale",), theirs + ".weight"), Tensor(ours + ("bias",), theirs + ".bias")]


def conv_bn(ours: Path, conv: str, bn: str, their_conv: str, their_bn: str) -> list[Tensor]:
  """A bias-free convolution and its BatchNorm under `ours` (our modules `conv`, `bn`), against torch's Conv2d
  `their_conv` and BatchNorm2d `their_bn`: weights in `params`, running statistics in `batch_stats`."""
  return [
    Tensor(("params",) + ours + (conv, "kernel"), their_conv + ".weight", "conv"),
    Tensor(("params",) + ours + (bn, "scale"), their_bn + ".weight"),
    Tensor(("params",) + ours + (bn, "bias"), their_bn + ".bias"),
    Tensor(("batch_stats",) + ours + (bn, "mean"), their_bn + ".running_mean"),
    Tensor(("batch_stats",) + ours + (bn, "var"), their_bn + ".running_var"),
  ]


def square_size(value, field: str) -> int:
  """A config's image or patch size, an int or a square [h, w] pair."""
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      raise ValueError(f"config {field}={value}: only square images and patches are supported.")
    value = value[0]
  return int(value)


class WeightsMismatchError(ValueError):
  """Raised when a checkpoint and a model disagree; the message lists every disagreement."""


def read_model_args(model_args: Callable[[Mapping], dict], tensors: Mapping, source: str) -> dict:
  """model_args(tensors): a model's arguments read off a checkpoint's names and shapes (a file without a config),
  every failure as a ValueError naming `source`: its own ValueErrors, and a tensor it needs that the file lacks as
  "missing tensor <name>"."""
  try:
    return model_args(tensors)
  except KeyError as e:
    name = e.args[0] if e.args else None
    if not isinstance(name, str) or name in tensors:
      raise
    raise ValueError(f"{source}: missing tensor {name}") from None
  except ValueError as e:
    raise ValueError(f"{source}: {e}") from None


def to_ours(t: Tensor, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  if t.layout in ("linear", "linear2"):
    array = array.T
  elif t.layout == "conv":
    array = array.transpose(2, 3, 1, 0)
  if array.size != int(np.prod(shape)) or (t.layout in ("same", "conv") and array.shape != tuple(shape)):
    raise ValueError(f"shape {tuple(array.shape)} cannot become {tuple(shape)}")
  return array.reshape(shape)


def to_theirs(t: Tensor, array: np.ndarray) -> np.ndarray:
  if t.layout == "vector":
    return array.reshape(-1)
  if t.layout in ("linear", "linear2"):
    n_in = 1 if t.layout == "linear" else 2
    return array.reshape(int(np.prod(array.shape[:n_in])), -1).T
  if t.layout == "conv":
    return array.transpose(3, 2, 0, 1)
  return array


def path_str(path: Path) -> str:
  return "/".join(path)


def flatten(tree: Mapping, prefix: Path = ()) -> dict[Path, object]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(flatten(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = value
  return out


def unflatten(flat: Mapping[Path, object]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def load_variables(
  table: Iterable[Tensor],
  tensors: Mapping[str, np.ndarray],
  expected: Mapping,
  *,
  source: str,
  ignore: Iterable[str] = (),
) -> dict:
  """Builds our variables from `tensors` (their names) following `table`.

  `expected` is the variables tree of the target model (arrays or ShapeDtypeStructs). `ignore` lists
  suffixes of their names that carry no information for us (e.g. BatchNorm's num_batches_tracked).
  Every missing tensor, unexpected tensor and shape mismatch is reported in one error naming `source`.
  """
  table = list(table)
  shapes = {path: tuple(leaf.shape) for path, leaf in flatten(expected).items()}
  problems, flat = [], {}
  for t in table:
    if t.path not in shapes:
      raise KeyError(f"Converter table names {path_str(t.path)}, which the model does not have.")
    if t.name not in tensors:
      problems.append(f"missing {t.name} (for {path_str(t.path)}, shape {shapes[t.path]})")
      continue
    array = np.asarray(tensors[t.name])
    try:
      flat[t.path] = to_ours(t, array, shapes[t.path]).astype(np.float32)
    except ValueError:
      problems.append(
        f"shape mismatch for {t.name}: checkpoint has {tuple(array.shape)}, model "
        f"{path_str(t.path)} expects {shapes[t.path]} ({t.layout} layout)"
      )
  uncovered = sorted(set(shapes) - {t.path for t in table})
  if uncovered:
    raise KeyError(f"Converter table misses model variables: {', '.join(map(path_str, uncovered))}.")
  used = {t.name for t in table}
  ignore = tuple(ignore)
  unexpected = sorted(n for n in tensors if n not in used and not n.endswith(ignore))
  problems += [f"unexpected {n} (shape {tuple(np.shape(tensors[n]))})" for n in unexpected]
  if problems:
    raise WeightsMismatchError(f"{source} does not fit the model:\n  " + "\n  ".join(problems))
  return unflatten(flat)


def save_tensors(table: Iterable[Tensor], variables: Mapping) -> dict[str, np.ndarray]:
  """The inverse of load_variables: our variables as a flat dict in their names and layouts."""
  flat = flatten(variables)
  return {t.name: np.ascontiguousarray(to_theirs(t, np.asarray(flat[t.path], np.float32))) for t in table}
