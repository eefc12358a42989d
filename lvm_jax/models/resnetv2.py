"""ResNet v2 as BiT builds it (Kolesnikov et al. 2020, "Big Transfer (BiT): General Visual Representation Learning"):
pre-activation bottlenecks (He et al. 2016, "Identity Mappings in Deep Residual Networks") with GroupNorm and
weight-standardised convolutions, so that nothing depends on the batch: the network transfers the same at batch 1 as
at batch 4096. With preact=False the same module builds the post-activation bottlenecks with TensorFlow "SAME"
padding that the ViT hybrids (Dosovitskiy et al. 2020) run before their patch embedding."""

from typing import Any, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lvm_jax import kernels
from lvm_jax.models import layers, param_groups

PADDINGS = ("symmetric", "SAME")
BOTTLENECK_RATIO = 4  # a unit's output channels over its inner width
_FEATURE_MAP = ("batch", "height", "width", "conv_out")


class StdConv(nn.Module):
  """A bias-free k x k convolution whose kernel is standardised per output channel before use (Qiao et al. 2019,
  "Weight Standardization"): (w - mean) / sqrt(var + eps) over [kh, kw, in], in float32.

  padding: "symmetric" (k // 2 on every side, as torch pads) or "SAME" (TensorFlow's, from the input's size).
  """

  features: int
  kernel_size: int
  strides: int = 1
  padding: str = "symmetric"
  eps: float = 1e-8
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, s = self.kernel_size, self.strides
    kernel_init = layers.partitioned(layers.he_normal_fan_out, (None, None, "conv_in", "conv_out"))
    kernel = self.param("kernel", kernel_init, (k, k, x.shape[-1], self.features), self.param_dtype)
    w = kernel.astype(jnp.float32)
    w = w - w.mean(axis=(0, 1, 2), keepdims=True)
    w = w * jax.lax.rsqrt(jnp.square(w).mean(axis=(0, 1, 2), keepdims=True) + self.eps)
    if self.padding == "SAME":
      pads = layers.same_padding(x.shape[1:3], k, s)
    else:
      pads = ((k // 2, k // 2),) * 2
    return kernels.conv(x.astype(self.dtype), w.astype(self.dtype), (s, s), pads)


def group_norm(groups: int, eps: float, dtype: Any, param_dtype: Any, name: str) -> nn.GroupNorm:
  # Two-pass variance: a pre-activation trunk is never normalised, so its mean can dwarf its spread.
  return nn.GroupNorm(
    num_groups=groups,
    epsilon=eps,
    use_fast_variance=False,
    dtype=dtype,
    param_dtype=param_dtype,
    scale_init=layers.partitioned(layers.ones, ("conv_out",)),
    bias_init=layers.partitioned(layers.zeros, ("conv_out",)),
    name=name,
  )


class Unit(NamedTuple):
  """Where a bottleneck unit sits and its channels; shared by the model and the weight converters."""

  stage: int
  index: int
  in_channels: int
  mid_channels: int
  out_channels: int
  strides: int

  @property
  def name(self) -> str:
    return f"stage_{self.stage}_block_{self.index}"

  @property
  def projection(self) -> bool:
    # Every stage's first unit projects its shortcut (1x1, with the unit's stride), as timm and transformers
    # build BiT, even where the identity would fit.
    return self.index == 0


class Bottleneck(nn.Module):
  """1x1, 3x3 (with the stride), 1x1 weight-standardised convolutions with GroupNorm.

  preact=True (BiT): GroupNorm + ReLU before each convolution, the shortcut projection taking the normalised input,
  and nothing after the sum. preact=False (the ViT hybrid's stem): GroupNorm after each convolution, ReLU after the
  first two and after the sum, the projection followed by its own GroupNorm.
  """

  unit: Unit
  preact: bool
  padding: str
  groups: int
  gn_eps: float
  ws_eps: float
  drop_path: float
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    u, kw = self.unit, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    conv = lambda features, k, strides, name: StdConv(features, k, strides, self.padding, self.ws_eps, name=name, **kw)
    norm = lambda name: group_norm(self.groups, self.gn_eps, name=name, **kw)
    convs = ((u.mid_channels, 1, 1), (u.mid_channels, 3, u.strides), (u.out_channels, 1, 1))
    if self.preact:
      y = nn.relu(norm("norm1")(x))
      shortcut = conv(u.out_channels, 1, u.strides, "proj_conv")(y) if u.projection else x
      for i, (features, k, strides) in enumerate(convs, start=1):
        if i > 1:
          y = nn.relu(norm(f"norm{i}")(y))
        y = conv(features, k, strides, f"conv{i}")(y)
      out = shortcut + layers.DropPath(self.drop_path)(y, train=train)
    else:
      shortcut = x
      if u.projection:
        shortcut = norm("proj_norm")(conv(u.out_channels, 1, u.strides, "proj_conv")(x))
      y = x
      for i, (features, k, strides) in enumerate(convs, start=1):
        y = norm(f"norm{i}")(conv(features, k, strides, f"conv{i}")(y))
        if i < 3:
          y = nn.relu(y)
      out = nn.relu(shortcut + layers.DropPath(self.drop_path)(y, train=train))
    return layers.constrain(out, _FEATURE_MAP)


class ResNetV2(nn.Module):
  """BiT ResNet v2 classifier or backbone.

  depths: units per stage; widths: each stage's output channels before width_factor (its units are 4x narrower
  inside); stem_width: the stem's channels before width_factor. Channels are rounded to multiples of 8 as
  layers.make_divisible does (BiT R50x3: stem 192, stages 768 ... 6144). Stage 0 runs at stride 4, each later one
  halves the resolution in its first unit's 3x3 convolution.
  preact: pre-activation units, a final GroupNorm + ReLU before pooling and none in the stem (BiT); False: units
  with post-activation, GroupNorm + ReLU in the stem and no final norm (the ViT hybrids' ResNet).
  padding: "symmetric": convolutions padded k // 2 on every side and the stem's 3x3/2 max pool on a one-pixel zero
  border (BiT's "fixed" padding, as timm's resnetv2_*_bit and transformers' BitConfig(global_padding=None));
  "SAME": TensorFlow's SAME padding everywhere, the max pool's border never winning (the ViT hybrids).
  groups: GroupNorm's groups (32 in every release); gn_eps its epsilon.
  ws_eps: added to each kernel's variance when it is standardised: 1e-8 as timm and transformers (the original
  JAX code adds 1e-10 (BiT) or divides by std + 1e-5 (vision_transformer's hybrids); every loader here, the .npz
  ones included, runs a checkpoint as timm and transformers run it).
  drop_path: stochastic depth, from 0 for the first unit to drop_path for the last, over all stages.
  image_size only records the size the model is meant for; no parameter depends on it.
  num_classes=0 returns the pooled features instead of logits.
  With `return_features=True` the call returns {"stride_4", "stride_8", "stride_16", "stride_32": the outputs of the
  stages, NHWC, keyed by stride (a model without stages gives its stem's output as "stride_4"); "pooled": [B, C] the
  features the head sees: the spatial mean, after the final GroupNorm + ReLU with preact}. The stage outputs of a
  pre-activation model are the un-normalised residual stream, as timm's and transformers' BiT features.
  """

  num_classes: int = 1000
  image_size: int = 224
  depths: Sequence[int] = (3, 4, 6, 3)
  widths: Sequence[int] = (256, 512, 1024, 2048)
  stem_width: int = 64
  width_factor: int = 1
  preact: bool = True
  padding: str = "symmetric"
  groups: int = 32
  gn_eps: float = 1e-5
  ws_eps: float = 1e-8
  drop_path: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def stem_channels(self) -> int:
    return layers.make_divisible(self.stem_width * self.width_factor)

  def units(self) -> list[Unit]:
    """Every bottleneck unit in order, with its channels and stride."""
    if len(self.depths) != len(self.widths):
      raise ValueError(
        f"ResNetV2 depths={tuple(self.depths)} and widths={tuple(self.widths)} must have one entry per stage."
      )
    if self.padding not in PADDINGS:
      raise ValueError(f"ResNetV2 padding must be one of {PADDINGS}, got {self.padding!r}.")
    if any(depth < 1 for depth in self.depths):  # each stage halves the resolution: an empty one would misname maps
      raise ValueError(f"ResNetV2 depths={tuple(self.depths)}: every stage needs at least one unit.")
    units, channels = [], self.stem_channels()
    for stage, (depth, width) in enumerate(zip(self.depths, self.widths)):
      out = layers.make_divisible(width * self.width_factor)
      mid = layers.make_divisible(out / BOTTLENECK_RATIO)
      for index in range(depth):
        units.append(Unit(stage, index, channels, mid, out, 2 if stage > 0 and index == 0 else 1))
        channels = out
    return units

  def feature_channels(self) -> dict[str, int]:
    """{"stride_<s>": channels} of each map return_features=True gives (besides "pooled")."""
    channels = {"stride_4": self.stem_channels()}
    channels.update({f"stride_{4 * 2**u.stage}": u.out_channels for u in self.units()})
    return channels

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False, return_features: bool = False):
    units = self.units()
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = StdConv(self.stem_channels(), 7, 2, self.padding, self.ws_eps, name="stem_conv", **kw)(x.astype(self.dtype))
    if not self.preact:
      x = nn.relu(group_norm(self.groups, self.gn_eps, name="stem_norm", **kw)(x))
    if self.padding == "SAME":
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    else:  # BiT pads with zeros, which win the max over negative pre-activations at the border
      x = nn.max_pool(jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))), (3, 3), strides=(2, 2), padding="VALID")
    x = layers.constrain(x, _FEATURE_MAP)

    features = {"stride_4": x}
    rates = layers.drop_path_rates(self.drop_path, len(units))
    for unit, rate in zip(units, rates):
      block = Bottleneck(
        unit, self.preact, self.padding, self.groups, self.gn_eps, self.ws_eps, rate, name=unit.name, **kw
      )
      x = block(x, train=train)
      features[f"stride_{4 * 2**unit.stage}"] = x  # the stage's last unit wins

    if self.preact:
      x = nn.relu(group_norm(self.groups, self.gn_eps, name="norm", **kw)(x))
    # Average in float32: a bf16 sum over 49+ positions loses the low bits the head needs.
    pooled = x.astype(jnp.float32).mean(axis=(1, 2)).astype(self.dtype)
    pooled = layers.constrain(pooled, ("batch", "embed"))
    if return_features:
      return {**features, "pooled": pooled}
    if self.num_classes == 0:
      return pooled
    # A zero head, as BiT fine-tunes: the pretrained features reach the new classes unchanged on the first step.
    return layers.Dense(
      self.num_classes,
      name="head",
      kernel_init=layers.partitioned(layers.zeros, ("embed", "classes")),
      bias_init=layers.partitioned(layers.zeros, ("classes",)),
      **kw,
    )(pooled)

  def layer_id(self, path: str) -> Optional[int]:
    """The parameter's layer for layer-wise lr decay (models/param_groups.py): the stem 0, the units 1, 2, ... in
    order over all stages, the final norm and the head the last."""
    top = param_groups.top_level(path)
    if top in ("stem_conv", "stem_norm"):
      return 0
    if match := param_groups.STAGE_BLOCK.match(top):
      stage, index = int(match.group(1)), int(match.group(2))
      if stage < len(self.depths) and index < self.depths[stage]:
        return int(np.sum(self.depths[:stage])) + index + 1
      return None
    return self.num_layer_ids() - 1 if top in ("norm", "head") else None

  def num_layer_ids(self) -> int:
    return sum(self.depths) + 2

  def no_weight_decay(self) -> tuple[str, ...]:
    return param_groups.NO_WEIGHT_DECAY  # GroupNorm scales and biases; the head's bias


def _bit(depths: tuple, width_factor: int) -> dict:
  return dict(image_size=224, depths=depths, width_factor=width_factor)


# The BiT release (BiT-S and BiT-M): R50x1, R50x3, R101x1, R101x3, R152x2, R152x4.
VARIANTS = {
  "bit_r50x1": _bit((3, 4, 6, 3), 1),
  "bit_r50x3": _bit((3, 4, 6, 3), 3),
  "bit_r101x1": _bit((3, 4, 23, 3), 1),
  "bit_r101x3": _bit((3, 4, 23, 3), 3),
  "bit_r152x2": _bit((3, 8, 36, 3), 2),
  "bit_r152x4": _bit((3, 8, 36, 3), 4),
}
