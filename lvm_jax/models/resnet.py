"""ResNet (He et al. 2016, "Deep Residual Learning for Image Recognition"), v1.5 as torchvision, timm and
Hugging Face transformers build it: a bottleneck block downsamples in its 3x3 convolution, not its first 1x1."""

import dataclasses
import functools
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lvm_jax import kernels
from lvm_jax.models import layers, param_groups

_BLOCKS = ("basic", "bottleneck")
EXPANSION = {"basic": 1, "bottleneck": 4}  # output channels of a block over its width
ModuleDef = Callable[..., nn.Module]


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """Where a residual block sits and what it computes; shared by the model and the weight converters."""

  stage: int
  index: int
  in_channels: int
  width: int  # channels of the inner convolutions
  out_channels: int
  strides: int

  @property
  def name(self) -> str:
    return f"stage_{self.stage}_block_{self.index}"

  @property
  def has_shortcut(self) -> bool:
    # A projection only where the identity cannot be added: new channel count or a downsampling block.
    return self.strides != 1 or self.in_channels != self.out_channels


class Conv(nn.Module):
  """nn.Conv without a bias: the same parameter ("kernel" [kh, kw, in, out]) and, within float32 rounding, the
  same result, computed by kernels.conv (the CPU kernels' form for the shape where they are on, lax.conv
  elsewhere). ResNet's default `conv`; nn.Conv(use_bias=False) takes its place unchanged."""

  features: int
  kernel_size: Sequence[int]
  strides: Sequence[int] = (1, 1)
  padding: Sequence[tuple[int, int]] = ((0, 0), (0, 0))
  kernel_init: Callable = nn.initializers.lecun_normal()
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = tuple(self.kernel_size) + (x.shape[-1], self.features)
    kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    return kernels.conv(x, kernel, self.strides, self.padding)


def _torch_conv(conv: ModuleDef, features: int, size: int, strides: int, name: str) -> nn.Module:
  """A size x size convolution with torch's padding (size // 2 on every side; "SAME" would pad a stride-2
  convolution asymmetrically)."""
  pad = size // 2
  return conv(features, (size, size), strides=(strides, strides), padding=((pad, pad), (pad, pad)), name=name)


def _scale_init(zero: bool) -> Callable:
  return layers.partitioned(layers.zeros if zero else layers.ones, ("conv_out",))


def _head_bias_init(fan_in: int):
  """torch.nn.Linear's bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = fan_in**-0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class ResidualBlock(nn.Module):
  """Basic (3x3, 3x3) or bottleneck (1x1, 3x3, 1x1) residual block with post-activation normalization.

  conv, norm: module constructors with everything but the per-layer arguments bound (ResNet binds them):
  conv(features, kernel_size, strides=, padding=, name=) and norm(scale_init=, name=).
  """

  spec: BlockSpec
  bottleneck: bool
  drop_path: float
  zero_init_last: bool
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    spec = self.spec
    if self.bottleneck:
      convs = [(spec.width, 1, 1), (spec.width, 3, spec.strides), (spec.out_channels, 1, 1)]
    else:
      convs = [(spec.width, 3, spec.strides), (spec.out_channels, 3, 1)]
    y = x
    for i, (features, kernel, strides) in enumerate(convs, start=1):
      last = i == len(convs)
      y = _torch_conv(self.conv, features, kernel, strides, f"conv{i}")(y)
      # A zero scale on the branch's last norm starts every block as the identity (Goyal et al. 2017).
      y = self.norm(scale_init=_scale_init(last and self.zero_init_last), name=f"bn{i}")(y)
      if not last:
        y = nn.relu(y)
    if spec.has_shortcut:
      x = _torch_conv(self.conv, spec.out_channels, 1, spec.strides, "shortcut_conv")(x)
      x = self.norm(scale_init=_scale_init(False), name="shortcut_bn")(x)
    y = layers.DropPath(self.drop_path)(y, train=train)
    return layers.constrain(nn.relu(x + y), ("batch", "height", "width", "conv_out"))


class ResNet(nn.Module):
  """ResNet classifier or backbone.

  stage_sizes: blocks per stage; block: "basic" or "bottleneck" (4x wider output than its inner width).
  width: channels of the stem, and the inner width of the first stage; stage s has width * 2**s unless
  stage_widths gives each stage's inner width (checkpoints with other widths, e.g. small test models).
  conv, norm: the convolution and normalization modules every layer is built from (as the Flax ImageNet example's
  fields), so a kernel choice touches no block code. conv is called as conv(features, kernel_size, strides=,
  padding=, kernel_init=, dtype=, param_dtype=, name=) and must add no bias: Conv (default) or
  functools.partial(nn.Conv, use_bias=False). norm is called as norm(use_running_average=, momentum=, epsilon=,
  dtype=, param_dtype=, scale_init=, bias_init=, name=): nn.BatchNorm (default) or a module taking those.
  BatchNorm keeps running statistics in the `batch_stats` collection: train=True normalizes with the batch
  statistics and updates them (apply with mutable=["batch_stats"]); train=False uses them. Flax updates the
  running variance with the biased batch variance, torch with the unbiased one (differs by n/(n-1)).
  bn_momentum follows Flax (0.9 is torch's momentum=0.1).
  drop_path: stochastic depth on each residual branch, from 0 for the first block to drop_path for the last.
  num_classes=0 returns the pooled features instead of logits.
  With `return_features=True` the call returns {"stride_4", "stride_8", "stride_16", "stride_32": the outputs
  of the stages, NHWC (one entry per stage; the key is its stride); "pooled": [B, C] the features the head sees}.
  """

  num_classes: int = 1000
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  block: str = "bottleneck"
  width: int = 64
  stage_widths: Optional[Sequence[int]] = None
  bn_momentum: float = 0.9
  bn_eps: float = 1e-5
  drop_path: float = 0.0
  zero_init_last: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  conv: ModuleDef = Conv
  norm: ModuleDef = nn.BatchNorm

  def block_specs(self) -> list[BlockSpec]:
    """Every residual block in order, with its channels and stride."""
    if self.block not in _BLOCKS:
      raise ValueError(f"ResNet block must be one of {_BLOCKS}, got {self.block!r}.")
    widths = self.stage_widths or tuple(self.width * 2**s for s in range(len(self.stage_sizes)))
    if len(widths) != len(self.stage_sizes):
      raise ValueError(
        f"ResNet stage_widths={tuple(widths)} and stage_sizes={tuple(self.stage_sizes)} must have one entry per stage."
      )
    if not self.stage_sizes or min(self.stage_sizes) < 1:
      raise ValueError(f"ResNet stage_sizes={tuple(self.stage_sizes)}: every stage needs at least one block.")
    specs, channels = [], self.width
    for stage, (depth, width) in enumerate(zip(self.stage_sizes, widths)):
      out = width * EXPANSION[self.block]
      for index in range(depth):
        # The stem already downsampled 4x; each later stage halves the resolution in its first block.
        strides = 2 if stage > 0 and index == 0 else 1
        specs.append(BlockSpec(stage, index, channels, width, out, strides))
        channels = out
    return specs

  def layer_id(self, path: str) -> Optional[int]:
    """The parameter's layer for layer-wise lr decay (models/param_groups.py): the stem 0, stage s s + 1 (a stage
    shares one id, as in the usual ResNet fine-tuning recipes), the head the last."""
    top = param_groups.top_level(path)
    if top in ("stem_conv", "stem_bn"):
      return 0
    if (match := param_groups.STAGE_BLOCK.match(top)) and int(match.group(1)) < len(self.stage_sizes):
      return int(match.group(1)) + 1
    return self.num_layer_ids() - 1 if top == "head" else None

  def num_layer_ids(self) -> int:
    return len(self.stage_sizes) + 2

  def no_weight_decay(self) -> tuple[str, ...]:
    return param_groups.NO_WEIGHT_DECAY

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False, return_features: bool = False):
    specs = self.block_specs()
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    # torchvision and timm initialise convolutions with He (Kaiming) normal, fan_out, for ReLU.
    conv_init = layers.partitioned(layers.he_normal_fan_out, (None, None, "conv_in", "conv_out"))
    conv = functools.partial(self.conv, kernel_init=conv_init, **kw)
    norm = functools.partial(
      self.norm,
      use_running_average=not train,
      momentum=self.bn_momentum,
      epsilon=self.bn_eps,
      bias_init=layers.partitioned(layers.zeros, ("conv_out",)),
      **kw,
    )
    x = _torch_conv(conv, self.width, 7, 2, "stem_conv")(x.astype(self.dtype))
    x = norm(scale_init=_scale_init(False), name="stem_bn")(x)
    x = kernels.max_pool_3x3s2(nn.relu(x))
    x = layers.constrain(x, ("batch", "height", "width", "conv_out"))

    features = {}
    for i, (spec, rate) in enumerate(zip(specs, layers.drop_path_rates(self.drop_path, len(specs)))):
      x = ResidualBlock(spec, self.block == "bottleneck", rate, self.zero_init_last, conv, norm, name=spec.name)(
        x, train=train
      )
      if i + 1 == len(specs) or specs[i + 1].stage != spec.stage:
        features[f"stride_{4 * 2**spec.stage}"] = x

    # Average in float32: a bf16 sum over 49+ positions loses the low bits the head needs.
    pooled = x.astype(jnp.float32).mean(axis=(1, 2)).astype(self.dtype)
    pooled = layers.constrain(pooled, ("batch", "embed"))
    if return_features:
      return {**features, "pooled": pooled}
    if self.num_classes == 0:
      return pooled
    # torch.nn.Linear's default init, U(+-1/sqrt(fan_in)) for kernel and bias: the fresh head that timm and
    # torchvision ResNet recipes train from. Not zeros (as ViT's head): a zero kernel gives the body no
    # gradient on the first step, and the recipes were tuned with this head.
    return layers.Dense(
      self.num_classes,
      name="head",
      kernel_init=layers.partitioned(
        nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"), ("embed", "classes")
      ),
      bias_init=layers.partitioned(_head_bias_init(x.shape[-1]), ("classes",)),
      **kw,
    )(pooled)


VARIANTS = {
  "resnet18": dict(stage_sizes=(2, 2, 2, 2), block="basic"),
  "resnet34": dict(stage_sizes=(3, 4, 6, 3), block="basic"),
  "resnet50": dict(stage_sizes=(3, 4, 6, 3), block="bottleneck"),
  "resnet101": dict(stage_sizes=(3, 4, 23, 3), block="bottleneck"),
  "resnet152": dict(stage_sizes=(3, 8, 36, 3), block="bottleneck"),
}
