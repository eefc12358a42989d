"""Re-targeting loaded weights: a fresh head for new classes, resized position tables for new image sizes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lvm_jax.weights import mapping

HEADS = ("head",)


def resize_grid(table: np.ndarray, new_hw: tuple[int, int]) -> np.ndarray:
  """Bicubic resize of a [h, w, C] grid, as timm and big_vision resample position tables."""
  if table.shape[:2] == tuple(new_hw):
    return table
  return np.asarray(jax.image.resize(jnp.asarray(table), (*new_hw, table.shape[-1]), "bicubic"))


def resize_pos_embed(pos: np.ndarray, new_shape: tuple[int, ...], num_prefix: int) -> np.ndarray:
  """[1, prefix + g*g, C] -> [1, prefix + g'*g', C]; the class-token entry is kept as is."""
  prefix, grid = pos[:, :num_prefix], pos[0, num_prefix:]
  old, new = int(round(grid.shape[0] ** 0.5)), int(round((new_shape[1] - num_prefix) ** 0.5))
  if old * old != grid.shape[0] or new * new != new_shape[1] - num_prefix:
    raise ValueError(f"Position embeddings {pos.shape} -> {new_shape} are not square grids.")
  grid = resize_grid(grid.reshape(old, old, -1), (new, new)).reshape(1, new * new, -1)
  return np.concatenate([prefix, grid], axis=1)


def resize_bias_table(table: np.ndarray, new_shape: tuple[int, ...]) -> np.ndarray:
  """Swin relative position bias [(2w-1)^2, heads] -> [(2w'-1)^2, heads]."""
  old, new = int(round(table.shape[0] ** 0.5)), int(round(new_shape[0] ** 0.5))
  return resize_grid(table.reshape(old, old, -1), (new, new)).reshape(new_shape)


def transfer(variables: dict, source_model, target_model, rng: jax.Array) -> dict:
  """Variables of `source_model` re-targeted to `target_model` (same architecture, other classes/size).

  Tensors of equal shape are copied; position embeddings and relative position bias tables are resized;
  the classification head is freshly initialised when its shape changes. Anything else that differs is
  an error naming the variable.
  """
  size = getattr(target_model, "image_size", 224)
  # jit: one compiled initialiser instead of one eager dispatch per parameter
  fresh = jax.jit(target_model.init)(rng, jnp.zeros((1, size, size, 3), jnp.float32))
  fresh = mapping.flatten(nn.meta.unbox(fresh))
  loaded = mapping.flatten(variables)
  num_prefix = int(getattr(source_model, "class_token", False) and not getattr(source_model, "no_embed_class", False))
  out = {}
  for path, target in fresh.items():
    value = loaded.get(path)
    leaf = path[-1]
    if value is not None and value.shape == target.shape:
      out[path] = value
    elif path[1] in HEADS:
      out[path] = target
    elif value is not None and leaf == "pos_embed":
      out[path] = resize_pos_embed(np.asarray(value), target.shape, num_prefix).astype(target.dtype)
    elif value is not None and leaf == "relative_position_bias_table":
      out[path] = resize_bias_table(np.asarray(value), target.shape).astype(target.dtype)
    else:
      got = "missing" if value is None else f"shape {tuple(value.shape)}"
      raise ValueError(
        f"Cannot transfer {mapping.path_str(path)}: checkpoint has {got}, target model needs {tuple(target.shape)}."
      )
  return mapping.unflatten(out)
