"""Swin Transformer (Liu et al. 2021, "Hierarchical Vision Transformer using Shifted Windows")."""

import re
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lvm_jax.models import layers, param_groups

# Added to the logits of token pairs that a cyclic shift brought together from distant image regions;
# the reference implementations use -100 rather than -inf, and parity depends on the same number.
MASKED = -100.0
_MERGE = re.compile(r"^merge_(\d+)$")


def relative_position_index(window: int, table_window: int) -> np.ndarray:
  """[window**2, window**2] rows of the bias table of a `table_window` model, one per token pair.

  The table holds one entry per relative offset (dh, dw), row-major over dh, dw in
  [-(table_window - 1), table_window - 1]. A window shrunk below `table_window` (a stage smaller than
  the window) reads the same offsets from the middle of that table.
  """
  coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij")).reshape(2, -1)
  dh, dw = coords[:, :, None] - coords[:, None, :]
  return (dh + table_window - 1) * (2 * table_window - 1) + (dw + table_window - 1)


def shifted_window_mask(height: int, width: int, window: int, shift: int) -> np.ndarray:
  """[num_windows, window**2, window**2] additive mask: MASKED between tokens of different regions.

  After rolling the map by -shift, the last `shift` rows/columns come from the opposite border; tokens
  may only attend within their own region (3 bands per axis, as the paper's slices define them).
  """

  def bands(size):
    idx = np.arange(size)
    return (idx >= size - window).astype(np.int64) + (idx >= size - shift)

  region = bands(height)[:, None] * 3 + bands(width)[None, :]
  region = region.reshape(height // window, window, width // window, window).transpose(0, 2, 1, 3)
  region = region.reshape(-1, window * window)
  return np.where(region[:, :, None] != region[:, None, :], MASKED, 0.0).astype(np.float32)


def to_windows(x: jax.Array, window: int) -> jax.Array:
  """[B, H, W, C] -> [B * num_windows, window**2, C], windows in row-major order."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // window, window, w // window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, window * window, c)


def from_windows(x: jax.Array, window: int, height: int, width: int) -> jax.Array:
  """The inverse of to_windows."""
  c = x.shape[-1]
  x = x.reshape(-1, height // window, width // window, window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, height, width, c)


class WindowAttention(nn.Module):
  """layers.Attention over the tokens of each window, plus a learned bias per relative position.

  The bias table lives in the same parameter scope as the query/key/value/out projections. Its size
  follows the configured window, so parameters never depend on the input size (as in transformers 5;
  the paper's code sizes it for a shrunk window instead, which no released checkpoint needs).
  """

  num_heads: int
  window_size: int
  qkv_bias: bool
  attention_dropout: float
  dtype: Any
  param_dtype: Any

  def setup(self):
    self.attention = layers.Attention(
      self.num_heads,
      dropout=self.attention_dropout,
      qkv_bias=self.qkv_bias,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )
    nn.share_scope(self, self.attention)

  @nn.compact
  def __call__(self, windows: jax.Array, *, window: int, mask: Optional[np.ndarray], train: bool) -> jax.Array:
    table = self.param(
      "relative_position_bias_table",
      layers.partitioned(layers.trunc_normal_02, (None, "heads")),
      ((2 * self.window_size - 1) ** 2, self.num_heads),
      self.param_dtype,
    )
    bias = table[relative_position_index(window, self.window_size)].transpose(2, 0, 1)  # [heads, N, N]
    # [windows or 1, heads, N, N]: window i of every image takes row i (layers.dot_product_attention).
    bias = bias[None] if mask is None else bias[None] + jnp.asarray(mask)[:, None]
    return self.attention(windows, train=train, bias=bias)


class SwinBlock(nn.Module):
  """Pre-norm block: (shifted) window attention, then MLP.

  Both residual branches get stochastic depth, as in the paper's code and timm (transformers drops the
  attention branch only; the same in eval mode).
  """

  num_heads: int
  window_size: int
  shift: bool
  mlp_ratio: float
  qkv_bias: bool
  dropout: float
  attention_dropout: float
  drop_path: float
  layer_norm_eps: float
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    _, height, width, channels = x.shape
    window, shift = self.window_size, self.window_size // 2 if self.shift else 0
    if min(height, width) <= window:  # one window covers the stage: nothing to shift across
      window, shift = min(height, width), 0

    y = layers.layer_norm(self.layer_norm_eps, name="norm1", **kw)(x)
    # Pad after the norm, so padded tokens are zeros that every window may attend to (as HF does).
    pad_h, pad_w = -height % window, -width % window
    y = jnp.pad(y, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    padded_h, padded_w = height + pad_h, width + pad_w
    mask = None
    if shift:
      y = jnp.roll(y, (-shift, -shift), axis=(1, 2))
      mask = shifted_window_mask(padded_h, padded_w, window, shift)
    y = WindowAttention(self.num_heads, self.window_size, self.qkv_bias, self.attention_dropout, name="attn", **kw)(
      to_windows(y, window), window=window, mask=mask, train=train
    )
    y = from_windows(y, window, padded_h, padded_w)
    if shift:
      y = jnp.roll(y, (shift, shift), axis=(1, 2))
    y = y[:, :height, :width]
    y = nn.Dropout(self.dropout, deterministic=not train)(y)
    x = x + layers.DropPath(self.drop_path)(y, train=train)

    y = layers.layer_norm(self.layer_norm_eps, name="norm2", **kw)(x)
    y = layers.Mlp(int(channels * self.mlp_ratio), dropout=self.dropout, name="mlp", **kw)(y, train=train)
    x = x + layers.DropPath(self.drop_path)(y, train=train)
    return layers.constrain(x, ("batch", "height", "width", "embed"))


class PatchMerging(nn.Module):
  """Halves the resolution: each 2x2 neighbourhood concatenated, normalized, projected to 2x the width."""

  layer_norm_eps: float
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    _, height, width, channels = x.shape
    x = jnp.pad(x, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)))
    # The references' order: (row 0, col 0), (row 1, col 0), (row 0, col 1), (row 1, col 1).
    x = jnp.concatenate([x[:, row::2, col::2] for col in (0, 1) for row in (0, 1)], axis=-1)
    x = layers.layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, name="norm")(x)
    x = layers.Dense(
      2 * channels,
      use_bias=False,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="reduction",
      kernel_init=layers.partitioned(layers.trunc_normal_02, ("mlp", "embed")),
    )(x)
    return layers.constrain(x, ("batch", "height", "width", "embed"))


class SwinTransformer(nn.Module):
  """Swin classifier or backbone.

  The window attention of each stage runs on the actual input size: inputs that are not a multiple of
  the patch size or of the window are zero-padded (bottom/right) as in HF transformers, and a stage
  whose resolution is <= window_size uses one window of that size with no shift. `image_size` only
  records the size the model is meant for (configs, checkpoints).
  num_classes=0 returns the pooled features instead of logits.
  With `return_features=True` the call returns {"stride_4", "stride_8", "stride_16", "stride_32": the
  outputs of the stages (before the next patch merging and before the final norm), NHWC; the key is the
  stage's stride, patch_size * 2**stage; "pooled": [B, C] the features the head sees}.
  """

  num_classes: int = 1000
  image_size: int = 224
  patch_size: int = 4
  embed_dim: int = 96
  depths: Sequence[int] = (2, 2, 6, 2)
  num_heads: Sequence[int] = (3, 6, 12, 24)
  window_size: int = 7
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  dropout: float = 0.0
  attention_dropout: float = 0.0
  drop_path: float = 0.0
  layer_norm_eps: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False, return_features: bool = False):
    if len(self.depths) != len(self.num_heads):
      raise ValueError(
        f"Swin depths={tuple(self.depths)} and num_heads={tuple(self.num_heads)} must have one entry per stage."
      )
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    p = self.patch_size
    x = x.astype(self.dtype)
    x = jnp.pad(x, ((0, 0), (0, -x.shape[1] % p), (0, -x.shape[2] % p), (0, 0)))
    x = nn.Conv(
      self.embed_dim,
      (p, p),
      strides=(p, p),
      padding="VALID",
      name="patch_embed",
      kernel_init=layers.partitioned(nn.initializers.lecun_normal(), (None, None, None, "embed")),
      bias_init=layers.partitioned(layers.zeros, ("embed",)),
      **kw,
    )(x)
    x = layers.layer_norm(self.layer_norm_eps, name="patch_norm", **kw)(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = layers.constrain(x, ("batch", "height", "width", "embed"))

    rates = iter(layers.drop_path_rates(self.drop_path, sum(self.depths)))
    features = {}
    for stage, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
      for i in range(depth):
        x = SwinBlock(
          heads,
          self.window_size,
          i % 2 == 1,
          self.mlp_ratio,
          self.qkv_bias,
          self.dropout,
          self.attention_dropout,
          next(rates),
          self.layer_norm_eps,
          name=f"stage_{stage}_block_{i}",
          **kw,
        )(x, train=train)
      features[f"stride_{p * 2**stage}"] = x
      if stage < len(self.depths) - 1:
        x = PatchMerging(self.layer_norm_eps, name=f"merge_{stage}", **kw)(x)

    x = layers.layer_norm(self.layer_norm_eps, name="norm", **kw)(x)
    pooled = x.mean(axis=(1, 2))
    if return_features:
      return {**features, "pooled": pooled}
    if self.num_classes == 0:
      return pooled
    return layers.Dense(
      self.num_classes,
      name="head",
      kernel_init=layers.partitioned(layers.trunc_normal_02, ("embed", "classes")),
      bias_init=layers.partitioned(layers.zeros, ("classes",)),
      **kw,
    )(pooled)

  def layer_id(self, path: str) -> Optional[int]:
    """The parameter's layer for layer-wise lr decay (models/param_groups.py): patch_embed and patch_norm 0,
    the blocks 1, 2, ... in order over all stages, merge_s (which runs after stage s) the id of stage s's last
    block, the final norm and head the last."""
    top = param_groups.top_level(path)
    ends = np.cumsum(self.depths).tolist()  # the id of each stage's last block
    if match := param_groups.STAGE_BLOCK.match(top):
      stage, index = int(match.group(1)), int(match.group(2))
      if stage < len(ends) and index < self.depths[stage]:
        return ends[stage] - self.depths[stage] + index + 1
      return None
    if (match := _MERGE.match(top)) and int(match.group(1)) < len(ends) - 1:
      return ends[int(match.group(1))]
    if top in ("patch_embed", "patch_norm"):
      return 0
    return self.num_layer_ids() - 1 if top in ("norm", "head") else None

  def num_layer_ids(self) -> int:
    return sum(self.depths) + 2

  def no_weight_decay(self) -> tuple[str, ...]:
    return param_groups.NO_WEIGHT_DECAY + (r"(^|/)relative_position_bias_table$",)


def _variant(embed_dim: int, depths: tuple, num_heads: tuple, image_size: int = 224, window_size: int = 7) -> dict:
  return dict(
    image_size=image_size,
    patch_size=4,
    embed_dim=embed_dim,
    depths=depths,
    num_heads=num_heads,
    window_size=window_size,
  )


VARIANTS = {
  "swin_t": _variant(96, (2, 2, 6, 2), (3, 6, 12, 24)),
  "swin_s": _variant(96, (2, 2, 18, 2), (3, 6, 12, 24)),
  "swin_b": _variant(128, (2, 2, 18, 2), (4, 8, 16, 32)),
  "swin_l": _variant(192, (2, 2, 18, 2), (6, 12, 24, 48)),
  "swin_b_384": _variant(128, (2, 2, 18, 2), (4, 8, 16, 32), image_size=384, window_size=12),
  "swin_l_384": _variant(192, (2, 2, 18, 2), (6, 12, 24, 48), image_size=384, window_size=12),
}
