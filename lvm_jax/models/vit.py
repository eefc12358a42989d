"""Vision Transformer (Dosovitskiy et al. 2020, "An Image is Worth 16x16 Words"), and the paper's hybrids: a ResNet
(v2, GroupNorm, weight-standardised) turns the image into a feature map that the patch embedding then cuts."""

import functools
import re
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lvm_jax import logical_axes
from lvm_jax.models import layers, param_groups
from lvm_jax.models.resnetv2 import BOTTLENECK_RATIO, ResNetV2

# name -> (width, depth, mlp_dim, num_heads), from the paper's Table 1 and the AugReg / big_vision releases.
_SIZES = {
  "Ti": (192, 12, 768, 3),
  "S": (384, 12, 1536, 6),
  "B": (768, 12, 3072, 12),
  "L": (1024, 24, 4096, 16),
  "H": (1280, 32, 5120, 16),
  "g": (1408, 40, 6144, 16),
}


def vit_args(variant: str) -> dict:
  """Decodes "B/16" into the constructor arguments of that variant."""
  size, _, patch = variant.partition("/")
  if size not in _SIZES or not patch.isdigit():
    raise ValueError(f"Unknown ViT variant {variant!r}: expected SIZE/PATCH with SIZE in {sorted(_SIZES)}.")
  width, depth, mlp_dim, heads = _SIZES[size]
  return dict(patch_size=int(patch), width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads)


class EncoderBlock(nn.Module):
  """Pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

  num_heads: int
  mlp_dim: int
  dropout: float
  attention_dropout: float
  drop_path: float
  layer_norm_eps: float
  dtype: Any
  param_dtype: Any
  attention_impl: Optional[str] = None

  @nn.compact
  def __call__(
    self, x: jax.Array, *, train: bool, drop_path_rate: Optional[jax.Array] = None, valid_length: Optional[int] = None
  ) -> jax.Array:
    """drop_path_rate: this layer's stochastic-depth rate as an array (a scanned stack feeds one per layer),
    instead of the `drop_path` field. valid_length: tokens from there on are padding, never attended to."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    rate = self.drop_path if drop_path_rate is None else drop_path_rate
    y = layers.layer_norm(self.layer_norm_eps, name="norm1", **kw)(x)
    y = layers.Attention(
      self.num_heads, dropout=self.attention_dropout, attention_impl=self.attention_impl, name="attn", **kw
    )(y, train=train, valid_length=valid_length)
    y = nn.Dropout(self.dropout, deterministic=not train)(y)
    x = x + layers.DropPath(rate)(y, train=train)
    y = layers.layer_norm(self.layer_norm_eps, name="norm2", **kw)(x)
    y = layers.Mlp(self.mlp_dim, dropout=self.dropout, name="mlp", **kw)(y, train=train)
    x = x + layers.DropPath(rate)(y, train=train)
    return layers.constrain(x, ("batch", "length", "embed"))


class VisionTransformer(nn.Module):
  """ViT classifier or backbone.

  pooling: "token" (class token, as HF and the original release) or "gap" (mean of patch tokens).
  class_token: prepend a learned class token (needed by "token" pooling; optional with "gap", as in timm).
  fc_norm: with "gap", normalize after pooling instead of before (timm's avg-pool ViTs, MAE).
  no_embed_class: position embeddings cover patches only, the class token gets none (big_vision style).
  representation_size: optional pre-logits Dense + tanh (the ImageNet-21k releases).
  num_classes=0 returns the pooled features instead of logits.
  With `return_features=True` the call returns {"grid": [B, h, w, width] normalized patch tokens,
  "pooled": [B, width] features before the head}.
  With `return_blocks=(i, j, ...)` it returns the outputs of those blocks instead (as timm's forward_intermediates
  with intermediates_only=True): a tuple of [B, h, w, width] patch-token grids, class token dropped, in the order
  asked; negative indices count from the last block. They are the residual stream before the final norm, unless
  normalize_blocks=True applies the final norm ("norm", the same parameters as the plain call) to each, as timm's
  norm=True. Without scan_layers the blocks after the last one asked for do not run (nor exist in an init made
  this way); with scan_layers every block runs.
  dynamic_image_size: accept inputs of any size whose sides are multiples of patch_size (detection canvases): the
  position embeddings, a grid for image_size, are resized (bicubic, as from_pretrained(image_size=) resizes them)
  to the input's patch grid on every call whose grid differs, as timm's dynamic_img_size and ViTDet do.
  scan_layers: the blocks are one nn.scan over a single block (params["blocks"], each leaf with a leading
  layer axis named "layers"), so XLA compiles the block once and compile time stays flat with depth. Same
  outputs as the per-layer model ("block_0" ... ); stack_blocks / unstack_blocks convert between the two.
  attention_impl: "xla", "cudnn" or None (cuDNN flash attention on NVIDIA GPUs in bfloat16/float16, else XLA;
  layers.attention_implementation).
  resnet_depths: a hybrid (R50+ViT-B/16: (3, 4, 9)): a ResNetV2 with post-activation units and "SAME" padding
  (params["resnet"], hybrid_resnet) runs first, with these units per stage after its stride-4 stem (stage i at
  stride 4 * 2**i; () keeps the stem only), and the patch embedding cuts its last map into patch_size patches
  (1 for R50+ViT-B/16: one token per stride-16 position). resnet_width: its stem's channels (64 in R50; stage i has
  4 * resnet_width * 2**i). patch_stride is the pixels per token: patch_size times the ResNet's stride.
  """

  num_classes: int = 1000
  image_size: int = 224
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  mlp_dim: int = 3072
  num_heads: int = 12
  pooling: str = "token"
  class_token: bool = True
  fc_norm: bool = False
  no_embed_class: bool = False
  representation_size: Optional[int] = None
  dropout: float = 0.0
  attention_dropout: float = 0.0
  drop_path: float = 0.0
  layer_norm_eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan_layers: bool = False
  attention_impl: Optional[str] = None
  dynamic_image_size: bool = False
  resnet_depths: Optional[Sequence[int]] = None
  resnet_width: int = 64

  @property
  def patch_stride(self) -> int:
    if self.resnet_depths is None:
      return self.patch_size
    return self.patch_size * 4 * 2 ** max(len(self.resnet_depths) - 1, 0)

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_stride

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    *,
    train: bool = False,
    return_features: bool = False,
    return_blocks: Optional[Sequence[int]] = None,
    normalize_blocks: bool = False,
  ):
    if self.pooling not in ("token", "gap"):
      raise ValueError(f"ViT pooling must be 'token' or 'gap', got {self.pooling!r}.")
    if self.pooling == "token" and not self.class_token:
      raise ValueError("ViT pooling='token' needs class_token=True.")
    taps = None if return_blocks is None else self._block_indices(return_blocks, return_features, normalize_blocks)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    p = self.patch_size
    self._check_input(x.shape[1], x.shape[2])
    if self.resnet_depths is not None:
      resnet = hybrid_resnet(self, name="resnet")
      x = resnet(x, train=train, return_features=True)[f"stride_{self.patch_stride // p}"]
    x = nn.Conv(
      self.width,
      (p, p),
      strides=(p, p),
      padding="VALID",
      name="patch_embed",
      kernel_init=layers.partitioned(nn.initializers.lecun_normal(), (None, None, None, "embed")),
      bias_init=layers.partitioned(layers.zeros, ("embed",)),
      **kw,
    )(x.astype(self.dtype))
    batch, h, w, _ = x.shape
    x = x.reshape(batch, h * w, self.width)

    use_cls = self.class_token
    num_pos = self.grid_size**2 + (1 if use_cls and not self.no_embed_class else 0)  # the table's size
    pos = self.param(
      "pos_embed",
      layers.partitioned(layers.trunc_normal_02, (None, "length", "embed")),
      (1, num_pos, self.width),
      self.param_dtype,
    )
    if (h, w) != (self.grid_size, self.grid_size):  # dynamic_image_size (_check_input)
      pos = _resize_position_grid(pos, num_pos - self.grid_size**2, self.grid_size, (h, w))
    pos = pos.astype(self.dtype)
    if use_cls:
      cls = self.param(
        "cls_token", layers.partitioned(layers.zeros, (None, None, "embed")), (1, 1, self.width), self.param_dtype
      ).astype(self.dtype)
      cls = jnp.broadcast_to(cls, (batch, 1, self.width))
      if self.no_embed_class:
        x = jnp.concatenate([cls, x + pos], axis=1)
      else:
        x = jnp.concatenate([cls, x], axis=1) + pos
    else:
      x = x + pos
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = layers.constrain(x, ("batch", "length", "embed"))

    tokens = x.shape[1]
    if tokens % 2 and self._attention_implementation() == "cudnn":
      # cuDNN's flash attention trains only on even lengths: one padding token for the whole encoder, masked out
      # as a key in every block, costs less than a pad and a slice in every layer.
      x, blocks = self._encoder(jnp.pad(x, ((0, 0), (0, 1), (0, 0))), train, taps, valid_length=tokens)
      x, blocks = x[:, :tokens], {i: y[:, :tokens] for i, y in blocks.items()}
    else:
      x, blocks = self._encoder(x, train, taps)

    prefix = 1 if use_cls else 0
    if taps is not None:
      norm = layers.layer_norm(self.layer_norm_eps, name="norm", **kw) if normalize_blocks else None
      grids = []
      for i in taps:
        y = blocks[i] if norm is None else norm(blocks[i])
        grids.append(y[:, prefix:].reshape(batch, h, w, self.width))
      return tuple(grids)
    if self.fc_norm:
      grid = x[:, prefix:]
      pooled = layers.layer_norm(self.layer_norm_eps, name="fc_norm", **kw)(grid.mean(axis=1))
    else:
      x = layers.layer_norm(self.layer_norm_eps, name="norm", **kw)(x)
      grid = x[:, prefix:]
      pooled = x[:, 0] if self.pooling == "token" else grid.mean(axis=1)

    if self.representation_size is not None:
      pooled = layers.Dense(
        self.representation_size,
        name="pre_logits",
        kernel_init=layers.partitioned(nn.initializers.lecun_normal(), ("embed", "mlp")),
        bias_init=layers.partitioned(layers.zeros, ("mlp",)),
        **kw,
      )(pooled)
      pooled = jnp.tanh(pooled)

    if return_features:
      return {"grid": grid.reshape(batch, h, w, self.width), "pooled": pooled}
    if self.num_classes == 0:
      return pooled
    return layers.Dense(
      self.num_classes,
      name="head",
      kernel_init=layers.partitioned(layers.zeros, ("embed", "classes")),
      bias_init=layers.partitioned(layers.zeros, ("classes",)),
      **kw,
    )(pooled)

  def layer_id(self, path: str) -> Optional[int]:
    """The parameter's layer for layer-wise lr decay (models/param_groups.py): a hybrid's resnet, patch_embed,
    pos_embed and cls_token 0, block_i i + 1, the final norm, fc_norm, pre_logits and head depth + 1."""
    top = param_groups.top_level(path)
    if top == SCANNED_BLOCKS:
      raise ValueError(
        "ViT layer ids need one parameter subtree per block; a ViT built with scan_layers=True stacks "
        "them (params['blocks']): build it with scan_layers=False for layer-wise lr decay."
      )
    if (match := _BLOCK.match(top)) and int(match.group(1)) < self.depth:
      return int(match.group(1)) + 1
    if top in ("resnet", "patch_embed", "pos_embed", "cls_token"):
      return 0
    return self.depth + 1 if top in ("norm", "fc_norm", "pre_logits", "head") else None

  def num_layer_ids(self) -> int:
    return self.depth + 2

  def no_weight_decay(self) -> tuple[str, ...]:
    return param_groups.NO_WEIGHT_DECAY + (r"(^|/)pos_embed$", r"(^|/)cls_token$")

  def drop_path_rates(self) -> list[float]:
    """Stochastic depth per block: linear from 0 (first block) to `drop_path` (last)."""
    return layers.drop_path_rates(self.drop_path, self.depth)

  def _attention_implementation(self) -> str:
    return layers.attention_implementation(
      self.attention_impl, self.width // self.num_heads, self.dtype, has_bias=False
    )

  def _check_input(self, height: int, width: int) -> None:
    """Raises ValueError when an input of height x width pixels is not one this model takes."""
    p = self.patch_stride
    if self.dynamic_image_size:
      if height % p or width % p or not min(height, width):
        raise ValueError(
          f"ViT with dynamic_image_size=True takes inputs whose sides are positive multiples of "
          f"{'patch_size' if self.resnet_depths is None else 'patch_stride'}={p}, "
          f"got {height}x{width}."
        )
      return
    h, w = height // p, width // p
    if self.resnet_depths is not None and (height % p or width % p or self.image_size % p):
      # the hybrid's SAME-padded ResNet rounds a partial patch up, where a patch embedding drops it
      raise ValueError(
        f"A hybrid ViT takes images whose sides are multiples of patch_stride={p}: image_size={self.image_size}, "
        f"got {height}x{width}."
      )
    if (h, w) != (self.grid_size, self.grid_size):
      raise ValueError(
        f"ViT built for {self.image_size}x{self.image_size} images (a {self.grid_size}x{self.grid_size} patch "
        f"grid) got a {h}x{w} grid; build it with image_size={h * p} (from_pretrained(..., "
        f"image_size=) resizes the position embeddings), or with dynamic_image_size=True for inputs of any size."
      )

  def _block_indices(self, return_blocks: Sequence[int], return_features: bool, normalize: bool) -> tuple[int, ...]:
    """return_blocks as indices 0..depth-1 (negative ones count from the end), checked."""
    if return_features:
      raise ValueError("ViT: ask for return_features or return_blocks, not both.")
    if normalize and self.fc_norm:
      raise ValueError(
        "ViT normalize_blocks=True: a model with fc_norm=True normalizes after pooling and has no per-token final "
        "norm to apply to the blocks; ask with normalize_blocks=False."
      )
    indices = tuple(int(i) for i in return_blocks)
    if not indices or any(not -self.depth <= i < self.depth for i in indices):
      raise ValueError(
        f"ViT return_blocks={tuple(return_blocks)}: need one or more block indices in [-{self.depth}, "
        f"{self.depth - 1}] (the model has depth={self.depth})."
      )
    return tuple(i % self.depth for i in indices)

  def _encoder(
    self, x: jax.Array, train: bool, taps: Optional[tuple[int, ...]] = None, valid_length: Optional[int] = None
  ) -> tuple[jax.Array, dict[int, jax.Array]]:
    """(the last block's output, {i: block i's output for i in taps}). Without scan_layers, the blocks after the
    last tap do not run."""
    block = functools.partial(
      EncoderBlock,
      self.num_heads,
      self.mlp_dim,
      self.dropout,
      self.attention_dropout,
      layer_norm_eps=self.layer_norm_eps,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      attention_impl=self.attention_impl,
    )
    taps = taps or ()
    if not self.scan_layers:
      blocks = {}
      last = max(taps) + 1 if taps else self.depth
      for i, rate in enumerate(self.drop_path_rates()[:last]):
        x = block(drop_path=rate, name=f"block_{i}")(x, train=train, valid_length=valid_length)
        if i in taps:
          blocks[i] = x
      return x, blocks

    # Every layer's output comes out of the scan (stacked) only when a block before the last one is asked for.
    stack_outputs = any(i != self.depth - 1 for i in taps)

    def body(layer, x, rate):
      y = layer(x, train=train, drop_path_rate=rate, valid_length=valid_length)
      return y, (y if stack_outputs else None)

    # No drop path: no per-layer input, so the block keeps DropPath's static shortcut.
    rates = jnp.asarray(self.drop_path_rates(), jnp.float32) if self.drop_path else None
    stack = nn.scan(
      body,
      # Sown intermediates (attention weights) come out stacked per layer, as the params do.
      variable_axes={"params": 0, "intermediates": 0},
      split_rngs={"params": True, "dropout": True},
      length=self.depth,
      metadata_params={nn.PARTITION_NAME: logical_axes.LAYERS},
    )
    x, outputs = stack(block(drop_path=0.0, name=SCANNED_BLOCKS), x, rates)
    return x, {i: outputs[i] if stack_outputs else x for i in taps}


def hybrid_resnet(vit: VisionTransformer, name: Optional[str] = None) -> ResNetV2:
  """The ResNet a hybrid ViT runs before its patch embedding: its submodule when built inside its __call__, an
  unbound module elsewhere (the weight converters read its units). A function, not a method: flax makes a module
  built in any method its child."""
  depths = tuple(vit.resnet_depths)
  return ResNetV2(
    num_classes=0,
    image_size=vit.image_size,
    depths=depths,
    widths=tuple(BOTTLENECK_RATIO * vit.resnet_width * 2**i for i in range(len(depths))),
    stem_width=vit.resnet_width,
    preact=False,
    padding="SAME",
    dtype=vit.dtype,
    param_dtype=vit.param_dtype,
    name=name,
  )


def _resize_position_grid(pos: jax.Array, num_prefix: int, grid: int, new_hw: tuple[int, int]) -> jax.Array:
  """[1, num_prefix + grid**2, C] position embeddings with their patch grid resized to new_hw (bicubic, as
  weights/transfer.py resizes them for a new image_size); the prefix (class token) entries are kept."""
  prefix, table = pos[:, :num_prefix], pos[:, num_prefix:].reshape(grid, grid, -1)
  table = jax.image.resize(table, (*new_hw, table.shape[-1]), "bicubic").reshape(1, new_hw[0] * new_hw[1], -1)
  return jnp.concatenate([prefix, table], axis=1)


SCANNED_BLOCKS = "blocks"
_BLOCK = re.compile(r"^block_(\d+)$")


def stack_blocks(params: dict) -> dict:
  """A per-layer ViT params tree (block_0 ... block_{n-1}, as checkpoints are released) in the scan_layers
  layout: one "blocks" subtree whose leaves carry a leading layer axis. Takes unboxed params (or any tree
  shaped like them, e.g. Adam moments)."""
  params = dict(params)
  ids = sorted(int(m.group(1)) for key in params if (m := _BLOCK.match(key)))
  if not ids or ids != list(range(len(ids))):
    raise ValueError(f"stack_blocks needs per-layer ViT params block_0 ... block_N-1, got keys {sorted(params)}.")
  blocks = [params.pop(f"block_{i}") for i in ids]
  params[SCANNED_BLOCKS] = jax.tree.map(lambda *layer: jnp.stack(layer), *blocks)
  return params


def unstack_blocks(params: dict) -> dict:
  """The scan_layers params layout back to per-layer block_0 ... block_{n-1} (what the converters write)."""
  params = dict(params)
  if SCANNED_BLOCKS not in params:
    raise ValueError(
      f"unstack_blocks needs scanned ViT params (a {SCANNED_BLOCKS!r} subtree), got keys {sorted(params)}."
    )
  blocks = params.pop(SCANNED_BLOCKS)
  depth = jax.tree.leaves(blocks)[0].shape[0]
  params.update({f"block_{i}": jax.tree.map(lambda x: x[i], blocks) for i in range(depth)})
  return params


VARIANTS = {
  f"vit_{size.lower()}{patch}": vit_args(f"{size}/{patch}")
  for size, patch in (
    ("Ti", 16),
    ("S", 16),
    ("S", 32),
    ("B", 16),
    ("B", 32),
    ("L", 16),
    ("L", 32),
    ("H", 14),
    ("g", 14),
  )
}
# R50+ViT-B/16: ResNet-50's first three stages (3, 4, 9 units; the third has 9, not 6) to stride 16, then ViT-B on
# 1x1 patches.
VARIANTS["vit_b16_r50"] = dict(vit_args("B/1"), resnet_depths=(3, 4, 9), resnet_width=64)
