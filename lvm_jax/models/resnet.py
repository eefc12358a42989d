"""ResNet (He et al. 2016, "Deep Residual Learning for Image Recognition"), v1.5 as torchvision, timm and
Hugging Face transformers build it: a bottleneck block downsamples in its 3x3 convolution, not its first 1x1."""

import dataclasses
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lvm_jax.models import layers, winograd

# torchvision and timm initialise convolutions with He (Kaiming) normal, fan_out, for ReLU.
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_BLOCKS = ("basic", "bottleneck")
EXPANSION = {"basic": 1, "bottleneck": 4}  # output channels of a block over its width


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """Where a residual block sits and what it computes; shared by the model and the weight converters."""
  stage: int
  index: int
  in_channels: int
  width: int           # channels of the inner convolutions
  out_channels: int
  strides: int

  @property
  def name(self) -> str:
    return f"stage_{self.stage}_block_{self.index}"

  @property
  def has_shortcut(self) -> bool:
    # A projection only where the identity cannot be added: new channel count or a downsampling block.
    return self.strides != 1 or self.in_channels != self.out_channels


def _max_pool(x: jax.Array) -> jax.Array:
  """3x3/2 max pool with 1 pixel of padding that never wins the max, as torch.nn.MaxPool2d pads (-inf).

  On CPU with the gradient of _max_pool_cpu_bwd: XLA:CPU expands the generic one (select-and-scatter) into
  index arithmetic that costs 3x as much (ResNet-50's stem pool at batch 8: 117 -> 42 ms forward + backward).
  """
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def _max_pool_fwd(x):
  y = _max_pool(x)
  return y, (x, y)


def _max_pool_cpu_bwd(residuals, dy):
  """Each output's gradient goes to the first input of its window, in row-major order, that equals the max
  (what select-and-scatter does, ties included); the nine taps are strided views, so their gradients are
  interior-padded back to the input's grid and summed, all in one elementwise fusion."""
  x, y = residuals
  height, width = x.shape[1], x.shape[2]
  out_h, out_w = y.shape[1], y.shape[2]
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  zero = jnp.zeros((), dy.dtype)
  taken = jnp.zeros(y.shape, bool)
  dpadded = jnp.zeros(padded.shape, dy.dtype)
  for i in range(3):
    for j in range(3):
      tap = padded[:, i:i + 2 * out_h - 1:2, j:j + 2 * out_w - 1:2]
      hit = (tap == y) & ~taken
      taken = taken | hit
      spread = ((0, 0, 0), (i, padded.shape[1] - i - 2 * out_h + 1, 1), (j, padded.shape[2] - j - 2 * out_w + 1, 1),
                (0, 0, 0))
      dpadded = dpadded + jax.lax.pad(jnp.where(hit, dy, zero), zero, spread)
  return (dpadded[:, 1:height + 1, 1:width + 1],)


torch_max_pool = layers.cpu_custom_gradient(_max_pool, _max_pool_fwd, _max_pool_cpu_bwd)


class Conv(nn.Module):
  """A bias-free k x k convolution with torch's padding (k // 2 on every side; "SAME" would pad a stride-2
  convolution asymmetrically), computed the way XLA:CPU runs each kind fastest:
  - 1x1: a matrix product over the channels (layers.matmul), 1.2-2.5x faster than XLA:CPU's convolution for
    ResNet's 1x1 shapes (a strided one reads every stride-th position); accelerators run both as a GEMM;
  - 3x3, stride 1: winograd.conv3x3, Winograd F(2x2, 3x3) forward and backward on CPU in float32 (ResNet-50,
    batch 8 on 2 cores, A/B in one process: inference 16.35 -> 18.35 img/s, train step 4.17 -> 4.31, 4.22 ->
    4.75 in another run), lax.conv elsewhere;
  - otherwise lax.conv.
  Same parameter as nn.Conv ("kernel" [k, k, in, out]), same result within float32 rounding.
  """
  features: int
  kernel_size: int
  strides: int = 1
  kernel_init: Callable = nn.initializers.lecun_normal()
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    size, strides = self.kernel_size, self.strides
    kernel = self.param("kernel", self.kernel_init, (size, size, x.shape[-1], self.features), self.param_dtype)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    if size == 1:
      return layers.matmul(x[:, ::strides, ::strides], kernel[0, 0])
    if size == 3 and strides == 1:
      return winograd.conv3x3(x, kernel)
    pad = size // 2
    return jax.lax.conv_general_dilated(x, kernel, (strides, strides), ((pad, pad), (pad, pad)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _conv(features: int, kernel: int, strides: int, name: str, kw: dict) -> nn.Module:
  kernel_init = layers.partitioned(_CONV_INIT, (None, None, "conv_in", "conv_out"))
  return Conv(features, kernel, strides, kernel_init, name=name, **kw)


def _batch_norm(name: str, train: bool, momentum: float, eps: float, kw: dict, zero_scale: bool = False):
  return nn.BatchNorm(use_running_average=not train, momentum=momentum, epsilon=eps, name=name,
                      scale_init=layers.partitioned(layers.zeros if zero_scale else layers.ones, ("conv_out",)),
                      bias_init=layers.partitioned(layers.zeros, ("conv_out",)), **kw)


def _head_bias_init(fan_in: int):
  """torch.nn.Linear's bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = fan_in ** -0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


class ResidualBlock(nn.Module):
  """Basic (3x3, 3x3) or bottleneck (1x1, 3x3, 1x1) residual block with post-activation BatchNorm."""
  spec: BlockSpec
  bottleneck: bool
  drop_path: float
  bn_momentum: float
  bn_eps: float
  zero_init_last: bool
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    spec, kw = self.spec, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.bottleneck:
      convs = [(spec.width, 1, 1), (spec.width, 3, spec.strides), (spec.out_channels, 1, 1)]
    else:
      convs = [(spec.width, 3, spec.strides), (spec.out_channels, 3, 1)]
    y = x
    for i, (features, kernel, strides) in enumerate(convs, start=1):
      last = i == len(convs)
      y = _conv(features, kernel, strides, f"conv{i}", kw)(y)
      # A zero scale on the branch's last norm starts every block as the identity (Goyal et al. 2017).
      y = _batch_norm(f"bn{i}", train, self.bn_momentum, self.bn_eps, kw, zero_scale=last and self.zero_init_last)(y)
      if not last:
        y = nn.relu(y)
    if spec.has_shortcut:
      x = _conv(spec.out_channels, 1, spec.strides, "shortcut_conv", kw)(x)
      x = _batch_norm("shortcut_bn", train, self.bn_momentum, self.bn_eps, kw)(x)
    y = layers.DropPath(self.drop_path)(y, train=train)
    return layers.constrain(nn.relu(x + y), ("batch", "height", "width", "conv_out"))


class ResNet(nn.Module):
  """ResNet classifier or backbone.

  stage_sizes: blocks per stage; block: "basic" or "bottleneck" (4x wider output than its inner width).
  width: channels of the stem, and the inner width of the first stage; stage s has width * 2**s unless
  stage_widths gives each stage's inner width (checkpoints with other widths, e.g. small test models).
  BatchNorm keeps running statistics in the `batch_stats` collection: train=True normalises with the batch
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

  def block_specs(self) -> list[BlockSpec]:
    """Every residual block in order, with its channels and stride."""
    if self.block not in _BLOCKS:
      raise ValueError(f"ResNet block must be one of {_BLOCKS}, got {self.block!r}.")
    widths = self.stage_widths or tuple(self.width * 2 ** s for s in range(len(self.stage_sizes)))
    if len(widths) != len(self.stage_sizes):
      raise ValueError(f"ResNet stage_widths={tuple(widths)} and stage_sizes={tuple(self.stage_sizes)} must have "
                       "one entry per stage.")
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

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False, return_features: bool = False):
    specs = self.block_specs()
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = _conv(self.width, 7, 2, "stem_conv", kw)(x.astype(self.dtype))
    x = _batch_norm("stem_bn", train, self.bn_momentum, self.bn_eps, kw)(x)
    x = torch_max_pool(nn.relu(x))
    x = layers.constrain(x, ("batch", "height", "width", "conv_out"))

    features = {}
    for i, (spec, rate) in enumerate(zip(specs, layers.drop_path_rates(self.drop_path, len(specs)))):
      x = ResidualBlock(spec, self.block == "bottleneck", rate, self.bn_momentum, self.bn_eps, self.zero_init_last,
                        name=spec.name, **kw)(x, train=train)
      if i + 1 == len(specs) or specs[i + 1].stage != spec.stage:
        features[f"stride_{4 * 2 ** spec.stage}"] = x

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
    return nn.Dense(self.num_classes, name="head",
                    kernel_init=layers.partitioned(nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
                                                   ("embed", "classes")),
                    bias_init=layers.partitioned(_head_bias_init(x.shape[-1]), ("classes",)), **kw)(pooled)


VARIANTS = {
    "resnet18": dict(stage_sizes=(2, 2, 2, 2), block="basic"),
    "resnet34": dict(stage_sizes=(3, 4, 6, 3), block="basic"),
    "resnet50": dict(stage_sizes=(3, 4, 6, 3), block="bottleneck"),
    "resnet101": dict(stage_sizes=(3, 4, 23, 3), block="bottleneck"),
    "resnet152": dict(stage_sizes=(3, 8, 36, 3), block="bottleneck"),
}
