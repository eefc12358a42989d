"""MobileNetV2 (Sandler et al. 2018, "MobileNetV2: Inverted Residuals and Linear Bottlenecks") in torchvision's
layout: a 3x3 stride-2 stem, inverted residual blocks (1x1 expansion, 3x3 depthwise, linear 1x1 projection, each
with BatchNorm; ReLU6 after the first two), a 1x1 convolution to 1280 channels, average pooling, dropout and a
linear classifier. Channel counts are rounded as torchvision rounds them, so its state dicts load unchanged."""

import dataclasses
import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lvm_jax.models import layers, param_groups

# (expansion t, output channels c, blocks n, stride of the stage's first block s), the paper's Table 2.
INVERTED_RESIDUAL_SETTING = (
  (1, 16, 1, 1),
  (6, 24, 2, 2),
  (6, 32, 3, 2),
  (6, 64, 4, 2),
  (6, 96, 3, 1),
  (6, 160, 3, 2),
  (6, 320, 1, 1),
)
_FEATURE_MAP = ("batch", "height", "width", "conv_out")
# torchvision initialises convolutions with He (Kaiming) normal, fan_out (layers.he_normal_fan_out), and the
# classifier with N(0, 0.01).
_HEAD_INIT = layers.partitioned(nn.initializers.normal(0.01), ("embed", "classes"))
_TOP_LAYERS = ("last_conv", "last_bn", "head")  # the final 1x1 convolution and the classifier


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """One inverted residual block: where it sits and what it computes; shared by the model and the converter."""

  stage: int
  index: int
  in_channels: int
  out_channels: int
  expansion: int
  strides: int

  @property
  def name(self) -> str:
    return f"stage_{self.stage}_block_{self.index}"

  @property
  def hidden(self) -> int:
    return int(round(self.in_channels * self.expansion))

  @property
  def residual(self) -> bool:
    return self.strides == 1 and self.in_channels == self.out_channels


def _relu6(x: jax.Array) -> jax.Array:
  return jnp.clip(x, 0, 6)


class InvertedResidual(nn.Module):
  """1x1 expansion (left out when the expansion is 1), 3x3 depthwise, linear 1x1 projection; the input is added
  back where the block keeps resolution and width. conv(features, name=) builds a 1x1 convolution,
  norm(name=) a BatchNorm."""

  spec: BlockSpec
  conv: Any
  norm: Any
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    spec = self.spec
    y = x
    if spec.expansion != 1:
      y = _relu6(self.norm(name="expand_bn")(self.conv(spec.hidden, name="expand_conv")(y)))
    y = layers.DepthwiseConv(
      3,
      spec.strides,
      kernel_init=layers.he_normal_fan_out,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="dw_conv",
    )(y)
    y = _relu6(self.norm(name="dw_bn")(y))
    y = self.norm(name="project_bn")(self.conv(spec.out_channels, name="project_conv")(y))
    if spec.residual:
      y = x + y
    return layers.constrain(y, _FEATURE_MAP)


class MobileNetV2(nn.Module):
  """MobileNetV2 classifier or backbone, torchvision's MobileNetV2 (its parameters, names aside, and outputs).

  width_mult: scales every width (stem, blocks; the last convolution only when above 1), each rounded to a
  multiple of round_nearest (layers.make_divisible). inverted_residual_setting: (expansion, channels, blocks, stride)
  per stage. stem_channels, last_channel: before the width multiplier.
  BatchNorm keeps running statistics in the `batch_stats` collection, as in ResNet: train=True normalizes with the
  batch statistics and updates them (apply with mutable=["batch_stats"]); bn_momentum follows Flax (0.9 is
  torch's momentum=0.1). dropout: before the classifier (needs a "dropout" rng in training).
  image_size only records the size the model is meant for; the network takes any size.
  num_classes=0 returns the pooled features instead of logits.
  With `return_features=True` the call returns {"stride_4", "stride_8", "stride_16", "stride_32": NHWC, the
  last map at each stride (stride_32: the final 1x1 convolution's, the map that is pooled); "pooled": [B, C] the
  features the head sees (before dropout)}.
  """

  num_classes: int = 1000
  image_size: int = 224
  width_mult: float = 1.0
  round_nearest: int = 8
  inverted_residual_setting: Sequence[Sequence[int]] = INVERTED_RESIDUAL_SETTING
  stem_channels: int = 32
  last_channel: int = 1280
  dropout: float = 0.2
  bn_momentum: float = 0.9
  bn_eps: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    # Rows read back from JSON (a run's model.json) are lists: as tuples the module compares equal and hashes.
    object.__setattr__(self, "inverted_residual_setting", tuple(map(tuple, self.inverted_residual_setting)))
    super().__post_init__()

  def block_specs(self) -> list[BlockSpec]:
    """Every inverted residual block in order (stage_<s>_block_<i>, s the row of inverted_residual_setting)."""
    setting = self.inverted_residual_setting
    if not setting or any(len(row) != 4 for row in setting):
      raise ValueError(
        f"MobileNetV2 inverted_residual_setting={setting}: expected rows of (expansion, channels, blocks, stride)."
      )
    if any(row[3] not in (1, 2) or row[2] < 1 for row in setting):
      raise ValueError(f"MobileNetV2 inverted_residual_setting={setting}: strides must be 1 or 2, blocks at least 1.")
    specs, channels = [], self.stem_width()
    for stage, (expansion, width, repeats, strides) in enumerate(setting):
      out = layers.make_divisible(width * self.width_mult, self.round_nearest)
      for index in range(repeats):
        specs.append(BlockSpec(stage, index, channels, out, expansion, strides if index == 0 else 1))
        channels = out
    return specs

  def stem_width(self) -> int:
    return layers.make_divisible(self.stem_channels * self.width_mult, self.round_nearest)

  def last_width(self) -> int:
    return layers.make_divisible(self.last_channel * max(1.0, self.width_mult), self.round_nearest)

  def feature_channels(self) -> dict[str, int]:
    """{"stride_<s>": channels} of each map return_features=True gives (besides "pooled")."""
    channels, stride = {}, 2
    for spec in self.block_specs():
      stride *= spec.strides
      if stride >= 4:
        channels[f"stride_{stride}"] = spec.out_channels
    channels[f"stride_{stride}"] = self.last_width()
    return channels

  def layer_id(self, path: str) -> Optional[int]:
    """The parameter's layer for layer-wise lr decay (models/param_groups.py): the stem 0, the blocks 1, 2, ...
    in order, the final 1x1 convolution with the head the last."""
    top = param_groups.top_level(path)
    if top in ("stem_conv", "stem_bn"):
      return 0
    if top in _TOP_LAYERS:
      return self.num_layer_ids() - 1
    names = [spec.name for spec in self.block_specs()]
    return names.index(top) + 1 if top in names else None

  def num_layer_ids(self) -> int:
    return len(self.block_specs()) + 2

  def no_weight_decay(self) -> tuple[str, ...]:
    return param_groups.NO_WEIGHT_DECAY

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False, return_features: bool = False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    conv = functools.partial(layers.Conv2d, use_bias=False, kernel_init=layers.he_normal_fan_out, **kw)
    pointwise = functools.partial(conv, kernel_size=1)
    norm = functools.partial(
      nn.BatchNorm,
      use_running_average=not train,
      momentum=self.bn_momentum,
      epsilon=self.bn_eps,
      scale_init=layers.partitioned(layers.ones, ("conv_out",)),
      bias_init=layers.partitioned(layers.zeros, ("conv_out",)),
      **kw,
    )
    stem = conv(self.stem_width(), 3, 2, name="stem_conv")
    x = _relu6(norm(name="stem_bn")(stem(x.astype(self.dtype))))
    x = layers.constrain(x, _FEATURE_MAP)

    features, stride = {}, 2
    for spec in self.block_specs():
      x = InvertedResidual(spec, pointwise, norm, name=spec.name, **kw)(x)
      stride *= spec.strides
      if stride >= 4:
        features[f"stride_{stride}"] = x
    x = _relu6(norm(name="last_bn")(pointwise(self.last_width(), name="last_conv")(x)))
    x = layers.constrain(x, _FEATURE_MAP)
    features[f"stride_{stride}"] = x

    # Average in float32: a bf16 sum over 49+ positions loses the low bits the head needs.
    pooled = x.astype(jnp.float32).mean(axis=(1, 2)).astype(self.dtype)
    pooled = layers.constrain(pooled, ("batch", "embed"))
    if return_features:
      return {**features, "pooled": pooled}
    if self.num_classes == 0:
      return pooled
    pooled = nn.Dropout(self.dropout, deterministic=not train)(pooled)
    return layers.Dense(
      self.num_classes,
      name="head",
      kernel_init=_HEAD_INIT,
      bias_init=layers.partitioned(layers.zeros, ("classes",)),
      **kw,
    )(pooled)


VARIANTS = {
  "mobilenet_v2": dict(width_mult=1.0),
}
