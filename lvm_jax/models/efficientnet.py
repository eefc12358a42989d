"""EfficientNet (Tan & Le 2019, "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks"): a
mobile inverted-bottleneck (MBConv) network with squeeze-excitation and SiLU, scaled from B0 to B7 by one width and
one depth multiplier (and the image size they were searched for)."""

import dataclasses
import functools
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lvm_jax import kernels
from lvm_jax.models import layers, param_groups


@dataclasses.dataclass(frozen=True)
class StageDef:
  """One stage of EfficientNet-B0, before scaling: every variant scales these same seven."""

  kernel_size: int
  strides: int  # of the stage's first block; the others keep the resolution
  expand_ratio: int
  in_channels: int
  out_channels: int
  repeats: int


STAGES = (
  StageDef(3, 1, 1, 32, 16, 1),
  StageDef(3, 2, 6, 16, 24, 2),
  StageDef(5, 2, 6, 24, 40, 2),
  StageDef(3, 2, 6, 40, 80, 3),
  StageDef(5, 1, 6, 80, 112, 3),
  StageDef(5, 2, 6, 112, 192, 4),
  StageDef(3, 1, 6, 192, 320, 1),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
STEM_KERNEL = 3
SE_RATIO = 0.25  # squeeze-excitation width over the block's input width (not its expanded width)
PADDINGS = ("same", "symmetric", "transformers")
_FEATURE_MAP = ("batch", "height", "width", "conv_out")
# TF's EfficientNet initialises convolutions with He normal, fan_out (layers.he_normal_fan_out; timm does the same);
# a depthwise kernel's fan is its k*k taps, which is what "fan_in" gives on our [k, k, 1, C] layout.
_DEPTHWISE_INIT = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
# U(+-1/sqrt(classes)) for the classifier kernel, as TF's and timm's EfficientNet.
_HEAD_INIT = nn.initializers.variance_scaling(1 / 3, "fan_out", "uniform")


def round_repeats(repeats: int, multiplier: float) -> int:
  return int(math.ceil(multiplier * repeats))


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """Where an MBConv block sits and what it computes; shared by the model and the weight converters."""

  stage: int
  index: int  # within the stage
  number: int  # over all stages, from 0: the block's place in transformers' flat list
  in_channels: int
  out_channels: int
  expand_ratio: int
  kernel_size: int
  strides: int
  se_channels: int

  @property
  def name(self) -> str:
    return f"stage_{self.stage}_block_{self.index}"

  @property
  def expanded(self) -> int:
    return self.in_channels * self.expand_ratio

  @property
  def has_residual(self) -> bool:
    return self.strides == 1 and self.in_channels == self.out_channels


def conv_padding(
  mode: str, size: Sequence[int], kernel_size: int, strides: int, symmetric: bool = False
) -> tuple[tuple[int, int], ...]:
  """((top, bottom), (left, right)) zero padding of a kernel_size x kernel_size convolution on a [height, width]
  input, by EfficientNet.padding's mode; `symmetric` marks a depthwise convolution EfficientNet.symmetric_blocks
  lists (mode "transformers" only)."""
  k = kernel_size
  if mode == "symmetric" or strides == 1:
    # For stride 1 and an odd kernel, TF's SAME is symmetric too.
    return ((k // 2, k // 2),) * len(size)
  if mode == "same":
    return layers.same_padding(size, k, strides)
  # transformers: SAME as computed for an even input, whatever the input's size.
  return ((k // 2, k // 2) if symmetric else (k // 2 - 1, k // 2),) * len(size)


def _conv(features: int, kernel_size: int = 1, strides: int = 1, **kwargs) -> layers.Conv2d:
  """A bias-free convolution initialised as TF's EfficientNet (a stride-2 one padded as conv_padding gives)."""
  return layers.Conv2d(features, kernel_size, strides, use_bias=False, kernel_init=layers.he_normal_fan_out, **kwargs)


class PooledConv(nn.Module):
  """A 1x1 convolution with bias applied to a pooled [batch, channels] vector: nn.Conv's parameters ("kernel"
  [1, 1, in, out], "bias" [out], the references' layout), computed as a matrix product."""

  features: int
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel_init = layers.partitioned(layers.he_normal_fan_out, (None, None, "conv_in", "conv_out"))
    kernel = self.param("kernel", kernel_init, (1, 1, x.shape[-1], self.features), self.param_dtype)
    bias = self.param("bias", layers.partitioned(layers.zeros, ("conv_out",)), (self.features,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    return kernels.matmul(x, kernel[0, 0]) + bias


class SqueezeExcite(nn.Module):
  """Per-channel gates from the spatial mean: 1x1 convolution to `reduced` channels ("reduce"), SiLU, 1x1
  convolution back ("expand"), sigmoid."""

  reduced: int
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    # Average in float32: a bf16 sum over many positions loses the low bits.
    pooled = x.astype(jnp.float32).mean(axis=(1, 2)).astype(self.dtype)
    hidden = nn.silu(PooledConv(self.reduced, name="reduce", **kw)(pooled))
    gates = nn.sigmoid(PooledConv(x.shape[-1], name="expand", **kw)(hidden))
    return x * gates[:, None, None, :].astype(x.dtype)


class MBConvBlock(nn.Module):
  """Mobile inverted bottleneck: 1x1 expansion (left out at expand_ratio 1), k x k depthwise convolution, squeeze-
  excitation, 1x1 projection; BatchNorm after each convolution and SiLU after all but the projection. A block that
  keeps the resolution and the width adds its input back (with stochastic depth on the branch).

  norm: nn.BatchNorm with everything but the name bound (EfficientNet binds it).
  """

  spec: BlockSpec
  drop_path: float
  padding: str
  symmetric_padding: bool
  norm: Any
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    spec = self.spec
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    pointwise = functools.partial(_conv, **kw)
    y = x
    if spec.expand_ratio != 1:
      y = pointwise(spec.expanded, name="expand_conv")(y)
      y = nn.silu(self.norm(name="expand_bn")(y))
      y = layers.constrain(y, _FEATURE_MAP)
    pads = conv_padding(self.padding, y.shape[1:3], spec.kernel_size, spec.strides, self.symmetric_padding)
    y = layers.DepthwiseConv(spec.kernel_size, spec.strides, pads, kernel_init=_DEPTHWISE_INIT, name="dw_conv", **kw)(y)
    y = nn.silu(self.norm(name="dw_bn")(y))
    y = SqueezeExcite(spec.se_channels, name="se", **kw)(y)
    y = pointwise(spec.out_channels, name="project_conv")(y)
    y = self.norm(name="project_bn")(y)
    if spec.has_residual:
      y = x + layers.DropPath(self.drop_path)(y, train=train)
    return layers.constrain(y, _FEATURE_MAP)


class EfficientNet(nn.Module):
  """EfficientNet classifier or backbone.

  width_multiplier, depth_multiplier: scale B0's channels (rounded to multiples of depth_divisor, layers.make_divisible)
  and blocks per stage (rounded up); image_size records the resolution the variant is meant for (configs,
  preprocessing, abstract initialisation, the depthwise_padding a saved transformers config gets); no parameter
  depends on it.
  padding: how the stride-2 convolutions (the stem and four depthwise ones) pad; stride-1 ones always pad k // 2 on
  every side.
    "same"          TF's SAME, from the input's actual size: (k - 2) // 2 before and k // 2 after on an even side,
                    k // 2 on both sides of an odd one. The original (Keras/TPU) models and timm's tf_efficientnet_*.
    "symmetric"     k // 2 on every side, as torch's padding=k//2: timm's efficientnet_* (trained in PyTorch).
    "transformers"  transformers' port of the Keras weights: SAME as it is for the config's image_size, fixed
                    whatever the input: the stem and stride-2 depthwise convolutions pad as for an even side,
                    except the depthwise convolutions of symmetric_blocks (its depthwise_padding, the blocks whose
                    input is odd at that size), which pad k // 2 on both sides.
  symmetric_blocks: block numbers over all stages, from 0 (padding "transformers" only).
  bn_eps: BatchNorm epsilon, 1e-3 in TF (and so in transformers and timm's tf_ models), 1e-5 in timm's own.
  bn_momentum: Flax's (0.99 = TF's 0.99 = torch's momentum=0.01).
  BatchNorm keeps running statistics in the `batch_stats` collection: train=True normalizes with the batch
  statistics and updates them (apply with mutable=["batch_stats"]); train=False uses them.
  dropout: on the pooled features before the classifier; drop_path: stochastic depth of block n, drop_path * n /
  number of blocks (from 0; as the references).
  num_classes=0 returns the pooled features instead of logits.
  With `return_features=True` the call returns {"stride_4", "stride_8", "stride_16", "stride_32": NHWC outputs of
  the last block at each stride (B0: 24, 40, 112 and 320 channels; before the 1x1 head convolution); "pooled":
  [B, C] the features the classifier sees: the spatial mean of the head convolution's output (after its BatchNorm
  and SiLU), C = channels(1280)}.
  """

  num_classes: int = 1000
  image_size: int = 224
  width_multiplier: float = 1.0
  depth_multiplier: float = 1.0
  depth_divisor: int = 8
  dropout: float = 0.2
  drop_path: float = 0.2
  padding: str = "same"
  symmetric_blocks: Sequence[int] = ()
  bn_eps: float = 1e-3
  bn_momentum: float = 0.99
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def channels(self, base: int) -> int:
    """B0's `base` channels scaled by width_multiplier, to a multiple of depth_divisor (the paper's code, transformers'
    round_filters and timm's round_channels)."""
    return layers.make_divisible(base * self.width_multiplier, self.depth_divisor)

  def block_specs(self) -> list[BlockSpec]:
    """Every MBConv block in order, with its widths, kernel and stride."""
    specs = []
    for stage, d in enumerate(STAGES):
      in_channels, out_channels = self.channels(d.in_channels), self.channels(d.out_channels)
      for index in range(round_repeats(d.repeats, self.depth_multiplier)):
        channels = in_channels if index == 0 else out_channels
        se = max(1, int(channels * SE_RATIO))
        strides = d.strides if index == 0 else 1
        specs.append(
          BlockSpec(stage, index, len(specs), channels, out_channels, d.expand_ratio, d.kernel_size, strides, se)
        )
    return specs

  def feature_channels(self) -> dict[str, int]:
    """{"stride_<s>": channels} of each map return_features=True gives (besides "pooled")."""
    out, stride = {}, 2
    for d in STAGES:
      stride *= d.strides
      if stride >= 4:
        out[f"stride_{stride}"] = self.channels(d.out_channels)  # the last stage at a stride wins
    return out

  def _check(self):
    if self.padding not in PADDINGS:
      raise ValueError(f"EfficientNet padding must be one of {PADDINGS}, got {self.padding!r}.")
    if self.symmetric_blocks and self.padding != "transformers":
      raise ValueError(
        f"EfficientNet symmetric_blocks={tuple(self.symmetric_blocks)} applies to padding='transformers' only; "
        f"this model has padding={self.padding!r}."
      )

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False, return_features: bool = False):
    self._check()
    specs = self.block_specs()
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = functools.partial(
      nn.BatchNorm,
      use_running_average=not train,
      momentum=self.bn_momentum,
      epsilon=self.bn_eps,
      scale_init=layers.partitioned(layers.ones, ("conv_out",)),
      bias_init=layers.partitioned(layers.zeros, ("conv_out",)),
      **kw,
    )
    k = STEM_KERNEL
    pads = conv_padding(self.padding, x.shape[1:3], k, 2)
    stem = _conv(self.channels(STEM_CHANNELS), k, 2, padding=pads, name="stem_conv", **kw)
    x = stem(x.astype(self.dtype))
    x = nn.silu(norm(name="stem_bn")(x))
    x = layers.constrain(x, _FEATURE_MAP)

    features, stride = {}, 2
    for spec in specs:
      rate = self.drop_path * spec.number / len(specs)
      symmetric = spec.number in tuple(self.symmetric_blocks)
      x = MBConvBlock(spec, rate, self.padding, symmetric, norm, name=spec.name, **kw)(x, train=train)
      stride *= spec.strides
      if stride >= 4:
        features[f"stride_{stride}"] = x

    x = _conv(self.channels(HEAD_CHANNELS), name="head_conv", **kw)(x)
    x = nn.silu(norm(name="head_bn")(x))
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
      kernel_init=layers.partitioned(_HEAD_INIT, ("embed", "classes")),
      bias_init=layers.partitioned(layers.zeros, ("classes",)),
      **kw,
    )(pooled)

  def layer_id(self, path: str) -> Optional[int]:
    """The parameter's layer for layer-wise lr decay (models/param_groups.py): the stem 0, the blocks 1, 2, ... in
    order over all stages, the head convolution, its norm and the classifier the last (as timm's group_matcher)."""
    top = param_groups.top_level(path)
    if top in ("stem_conv", "stem_bn"):
      return 0
    if param_groups.STAGE_BLOCK.match(top):
      numbers = {spec.name: spec.number for spec in self.block_specs()}
      return numbers[top] + 1 if top in numbers else None
    return self.num_layer_ids() - 1 if top in ("head_conv", "head_bn", "head") else None

  def num_layer_ids(self) -> int:
    return len(self.block_specs()) + 2

  def no_weight_decay(self) -> tuple[str, ...]:
    return param_groups.NO_WEIGHT_DECAY


def _variant(width: float, depth: float, image_size: int, dropout: float) -> dict:
  return dict(width_multiplier=width, depth_multiplier=depth, image_size=image_size, dropout=dropout, drop_path=0.2)


# The paper's (width, depth, resolution, dropout) per variant.
VARIANTS = {
  "efficientnet_b0": _variant(1.0, 1.0, 224, 0.2),
  "efficientnet_b1": _variant(1.0, 1.1, 240, 0.2),
  "efficientnet_b2": _variant(1.1, 1.2, 260, 0.3),
  "efficientnet_b3": _variant(1.2, 1.4, 300, 0.3),
  "efficientnet_b4": _variant(1.4, 1.8, 380, 0.4),
  "efficientnet_b5": _variant(1.6, 2.2, 456, 0.4),
  "efficientnet_b6": _variant(1.8, 2.6, 528, 0.5),
  "efficientnet_b7": _variant(2.0, 3.1, 600, 0.5),
}
