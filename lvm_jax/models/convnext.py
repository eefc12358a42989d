"""ConvNeXt (Liu et al. 2022, "A ConvNet for the 2020s"): a ResNet modernised along Swin's lines, with a patchify
stem, 7x7 depthwise convolutions, inverted-bottleneck MLPs with GELU, LayerNorm, layer scale and separate
downsampling layers between the stages."""

import re
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lvm_jax.models import layers, param_groups

MLP_RATIO = 4  # the inverted bottleneck's hidden width over the block's width, fixed in every ConvNeXt (v1)
KERNEL_SIZE = 7  # the depthwise convolution
_FEATURE_MAP = ("batch", "height", "width", "embed")
_DOWNSAMPLE = re.compile(r"^downsample_(\d+)$")


class ConvNeXtBlock(nn.Module):
  """Depthwise 7x7 convolution, LayerNorm, Linear to 4x the width, GELU, Linear back, then layer scale and
  stochastic depth on the residual branch. layer_scale_init <= 0 leaves out the layer scale (as the references)."""

  layer_scale_init: float
  drop_path: float
  layer_norm_eps: float
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    channels = x.shape[-1]
    y = layers.DepthwiseConv(
      KERNEL_SIZE, use_bias=True, kernel_init=layers.trunc_normal_02, channel_axis="embed", name="dwconv", **kw
    )(x)
    y = layers.layer_norm(self.layer_norm_eps, name="norm", **kw)(y)
    y = layers.Dense(
      MLP_RATIO * channels,
      name="pwconv1",
      kernel_init=layers.partitioned(layers.trunc_normal_02, ("embed", "mlp")),
      bias_init=layers.partitioned(layers.zeros, ("mlp",)),
      **kw,
    )(y)
    y = layers.constrain(layers.gelu(y), ("batch", "height", "width", "mlp"))
    y = layers.Dense(
      channels,
      name="pwconv2",
      kernel_init=layers.partitioned(layers.trunc_normal_02, ("mlp", "embed")),
      bias_init=layers.partitioned(layers.zeros, ("embed",)),
      **kw,
    )(y)
    if self.layer_scale_init > 0:
      # A tiny per-channel scale starts every block close to the identity, which lets deep stacks train.
      gamma = self.param(
        "layer_scale",
        layers.partitioned(nn.initializers.constant(self.layer_scale_init), ("embed",)),
        (channels,),
        self.param_dtype,
      )
      y = y * gamma.astype(self.dtype)
    x = x + layers.DropPath(self.drop_path)(y, train=train)
    return layers.constrain(x, _FEATURE_MAP)


class Downsample(nn.Module):
  """LayerNorm then a 2x2 stride-2 convolution to `features` channels; an odd last row or column is dropped, as a
  torch convolution without padding does."""

  features: int
  layer_norm_eps: float
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = layers.layer_norm(self.layer_norm_eps, name="norm", **kw)(x)
    x = nn.Conv(
      self.features,
      (2, 2),
      strides=(2, 2),
      padding="VALID",
      name="conv",
      kernel_init=layers.partitioned(layers.trunc_normal_02, (None, None, "conv_in", "conv_out")),
      bias_init=layers.partitioned(layers.zeros, ("conv_out",)),
      **kw,
    )(x)
    return layers.constrain(x, _FEATURE_MAP)


class ConvNeXt(nn.Module):
  """ConvNeXt classifier or backbone.

  depths: blocks per stage; dims: the width of each stage. Stage 0 runs at stride patch_size (the patchify stem),
  each later stage starts with a Downsample that halves the resolution. Inputs that are not a multiple of the
  stride lose their last rows/columns, as in the references (their convolutions do not pad).
  layer_scale_init: the initial per-channel scale of each block's residual branch (<= 0: no layer scale).
  drop_path: stochastic depth, from 0 for the first block to drop_path for the last, over all stages.
  layer_norm_eps: the stem's, the blocks' and the downsampling norms' epsilon; head_norm_eps: the final norm's,
  which transformers' configs set apart (layer_norm_eps, 1e-12 in the released ones; timm uses 1e-6).
  image_size only records the size the model is meant for (configs, preprocessing, abstract initialisation);
  the network has no parameter that depends on it.
  num_classes=0 returns the pooled features instead of logits.
  With `return_features=True` the call returns {"stride_4", "stride_8", "stride_16", "stride_32": the outputs of
  the stages (before the next downsampling), NHWC; the key is the stage's stride, patch_size * 2**stage; "pooled":
  [B, C] the features the head sees: the final LayerNorm of the spatial mean (the norm follows the pooling here,
  unlike Swin)}.
  """

  num_classes: int = 1000
  image_size: int = 224
  patch_size: int = 4
  depths: Sequence[int] = (3, 3, 9, 3)
  dims: Sequence[int] = (96, 192, 384, 768)
  drop_path: float = 0.0
  layer_scale_init: float = 1e-6
  layer_norm_eps: float = 1e-6
  head_norm_eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False, return_features: bool = False):
    if len(self.depths) != len(self.dims):
      raise ValueError(
        f"ConvNeXt depths={tuple(self.depths)} and dims={tuple(self.dims)} must have one entry per stage."
      )
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    p = self.patch_size
    x = nn.Conv(
      self.dims[0],
      (p, p),
      strides=(p, p),
      padding="VALID",
      name="stem",
      kernel_init=layers.partitioned(layers.trunc_normal_02, (None, None, None, "embed")),
      bias_init=layers.partitioned(layers.zeros, ("embed",)),
      **kw,
    )(x.astype(self.dtype))
    x = layers.layer_norm(self.layer_norm_eps, name="stem_norm", **kw)(x)
    x = layers.constrain(x, _FEATURE_MAP)

    rates = iter(layers.drop_path_rates(self.drop_path, sum(self.depths)))
    features = {}
    for stage, (depth, dim) in enumerate(zip(self.depths, self.dims)):
      if stage > 0:
        x = Downsample(dim, self.layer_norm_eps, name=f"downsample_{stage}", **kw)(x)
      for i in range(depth):
        x = ConvNeXtBlock(
          self.layer_scale_init, next(rates), self.layer_norm_eps, name=f"stage_{stage}_block_{i}", **kw
        )(x, train=train)
      features[f"stride_{p * 2**stage}"] = x

    # Average in float32: a bf16 sum over 49+ positions loses the low bits the head needs.
    pooled = x.astype(jnp.float32).mean(axis=(1, 2)).astype(self.dtype)
    pooled = layers.layer_norm(self.head_norm_eps, name="norm", **kw)(pooled)
    pooled = layers.constrain(pooled, ("batch", "embed"))
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

  def feature_channels(self) -> dict[str, int]:
    """{"stride_<s>": channels} of each map return_features=True gives (besides "pooled")."""
    return {f"stride_{self.patch_size * 2**stage}": dim for stage, dim in enumerate(self.dims)}

  def layer_id(self, path: str) -> Optional[int]:
    """The parameter's layer for layer-wise lr decay (models/param_groups.py): stem and stem_norm 0, the blocks
    1, 2, ... in order over all stages, downsample_s (which runs between stage s - 1 and stage s) the id of stage
    s - 1's last block (as Swin's patch merging), the final norm and head the last."""
    top = param_groups.top_level(path)
    ends = np.cumsum(self.depths).tolist()  # the id of each stage's last block
    if match := param_groups.STAGE_BLOCK.match(top):
      stage, index = int(match.group(1)), int(match.group(2))
      if stage < len(ends) and index < self.depths[stage]:
        return ends[stage] - self.depths[stage] + index + 1
      return None
    if (match := _DOWNSAMPLE.match(top)) and 0 < int(match.group(1)) < len(ends):
      return ends[int(match.group(1)) - 1]
    if top in ("stem", "stem_norm"):
      return 0
    return self.num_layer_ids() - 1 if top in ("norm", "head") else None

  def num_layer_ids(self) -> int:
    return sum(self.depths) + 2

  def no_weight_decay(self) -> tuple[str, ...]:
    # Layer scales are per-channel gains, like norm scales (timm leaves every 1-D parameter undecayed).
    return param_groups.NO_WEIGHT_DECAY + (r"(^|/)layer_scale$",)


def _variant(depths: tuple, dims: tuple) -> dict:
  return dict(image_size=224, patch_size=4, depths=depths, dims=dims)


VARIANTS = {
  "convnext_tiny": _variant((3, 3, 9, 3), (96, 192, 384, 768)),
  "convnext_small": _variant((3, 3, 27, 3), (96, 192, 384, 768)),
  "convnext_base": _variant((3, 3, 27, 3), (128, 256, 512, 1024)),
  "convnext_large": _variant((3, 3, 27, 3), (192, 384, 768, 1536)),
}
