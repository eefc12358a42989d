"""Where a ViT looks: its attention weights, the last layer's class-token attention, and attention rollout
(Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers").

The attention kernels never write the weights; layers.Attention recomputes and sows them when a caller makes the
"intermediates" collection mutable, which is what attention_weights does. The map functions take those weights
[layers, batch, heads, tokens, tokens] and a patch grid, and return [batch, h, w] maps over the patches; the
tokens before the patches (a class token) are the prefix, tokens - h * w of them. To draw a map over its image,
resize it, e.g. jax.image.resize(maps, (batch, height, width), "bilinear").
"""

import functools
from typing import Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from lvm_jax.models import vit

GridSize = Union[int, Sequence[int]]
HEAD_FUSIONS = ("mean", "max", "min")


def attention_weights(model: nn.Module, variables: dict, images: jax.Array) -> jax.Array:
  """The attention weights of every block of a VisionTransformer (per-layer or scan_layers) on `images`.

  Args:
    model: a VisionTransformer.
    variables: its variables ({"params": ...}).
    images: [batch, height, width, 3], preprocessed as for the model's forward pass.

  Returns:
    float32 [layers, batch, heads, tokens, tokens], block order, each row a softmax over the keys; tokens are the
    class token (if the model has one) then the patches in row-major grid order.
  """
  if not isinstance(model, vit.VisionTransformer):
    raise ValueError(
      f"attention_weights supports VisionTransformer models (per-layer or scan_layers=True), got "
      f"{type(model).__name__}; Swin's windowed attention has no map over the whole image."
    )
  variables = {name: tree for name, tree in variables.items() if name != "intermediates"}  # sow would append
  return _vit_attention_weights(model, variables, jnp.asarray(images))


@functools.partial(jax.jit, static_argnums=0)
def _vit_attention_weights(model: vit.VisionTransformer, variables: dict, images: jax.Array) -> jax.Array:
  _, state = model.apply(variables, images, train=False, mutable=["intermediates"])
  blocks = state["intermediates"]
  if model.scan_layers:
    (weights,) = blocks[vit.SCANNED_BLOCKS]["attn"]["attention_weights"]
  else:
    weights = jnp.stack([blocks[f"block_{i}"]["attn"]["attention_weights"][0] for i in range(model.depth)])
  # With cuDNN attention the encoder runs one padding token (weight 0 as a key): cut it off.
  tokens = model.grid_size**2 + int(model.class_token)
  return weights[..., :tokens, :tokens]


def class_token_attention(weights: jax.Array, grid_size: GridSize) -> jax.Array:
  """How much the class token attends to each patch in the last layer, averaged over heads.

  Args:
    weights: attention_weights' [layers, batch, heads, tokens, tokens] (or a list of per-layer arrays).
    grid_size: the patch grid, h = w or (h, w) (a ViT's model.grid_size).

  Returns:
    [batch, h, w]; it sums to less than 1 by what the class token gives the prefix tokens (itself).
  """
  weights = jnp.asarray(weights)
  (h, w), prefix = _grid_and_prefix(weights, grid_size)
  if prefix == 0:
    raise ValueError(
      f"class_token_attention needs a model with a class token: these weights have {weights.shape[-1]} tokens, "
      f"the {h}x{w} patches only. attention_rollout maps such models through the mean over all queries."
    )
  last = weights[-1].mean(axis=1)  # [batch, queries, keys]
  return last[:, 0, prefix:].reshape(-1, h, w)


def attention_rollout(
  weights: jax.Array, grid_size: GridSize, head_fusion: str = "mean", discard_ratio: float = 0.0
) -> jax.Array:
  """Attention rollout: how much of each patch flows into the output token, through every layer.

  Each layer's fused weights W (heads combined by `head_fusion`) become A = (W + I) / 2, the identity standing
  for the residual connection, with rows renormalised; the rollout is A_L ... A_2 A_1. Its class-token row,
  restricted to the patches, is the map; a model without a class token (gap pooling) gets the mean of all
  query rows, since every token feeds its pooled output.

  Args:
    weights: attention_weights' [layers, batch, heads, tokens, tokens] (or a list of per-layer arrays).
    grid_size: the patch grid, h = w or (h, w).
    head_fusion: "mean" (the paper), "max" or "min" over the heads.
    discard_ratio: in [0, 1): the fraction of each query row's weakest fused weights set to zero before adding
      the identity, which sharpens maps that noise from many weak links washes out.

  Returns:
    [batch, h, w].
  """
  weights = jnp.asarray(weights, jnp.float32)
  (h, w), prefix = _grid_and_prefix(weights, grid_size)
  if head_fusion not in HEAD_FUSIONS:
    raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}.")
  if not 0.0 <= discard_ratio < 1.0:
    raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}.")
  fused = getattr(jnp, head_fusion)(weights, axis=2)  # [layers, batch, queries, keys]
  tokens = fused.shape[-1]
  discard = int(discard_ratio * tokens)
  if discard:
    rank = jnp.argsort(jnp.argsort(fused, axis=-1), axis=-1)  # 0 for a row's smallest weight
    fused = jnp.where(rank >= discard, fused, 0.0)
  flow = 0.5 * fused + 0.5 * jnp.eye(tokens, dtype=fused.dtype)
  flow = flow / flow.sum(axis=-1, keepdims=True)
  rollout = flow[0]
  for layer in flow[1:]:
    rollout = jnp.matmul(layer, rollout, precision=jax.lax.Precision.HIGHEST)
  rows = rollout[:, 0] if prefix else rollout.mean(axis=1)
  return rows[:, prefix:].reshape(-1, h, w)


def _grid_and_prefix(weights: jax.Array, grid_size: GridSize) -> tuple[tuple[int, int], int]:
  """The (h, w) grid and the number of tokens before the patches, checked against the weights' shape."""
  if weights.ndim != 5 or weights.shape[-1] != weights.shape[-2]:
    raise ValueError(
      f"Expected attention weights [layers, batch, heads, tokens, tokens] (attention_weights), got shape "
      f"{weights.shape}."
    )
  h, w = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
  prefix = weights.shape[-1] - h * w
  if prefix < 0:
    raise ValueError(f"A {h}x{w} patch grid needs at least {h * w} tokens; the weights have {weights.shape[-1]}.")
  return (h, w), prefix
