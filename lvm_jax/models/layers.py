"""Blocks shared by the model families: dense layers, attention, MLP, stochastic depth, partitioned initialisers."""

import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lvm_jax import kernels
from lvm_jax.kernels.attention import bias_groups

Dtype = Any


def partitioned(init: Callable, names: Sequence[Optional[str]]) -> Callable:
  """An initialiser whose parameter carries logical axis names, so sharding rules can place it."""
  return nn.with_logical_partitioning(init, tuple(names))


def constrain(x: jax.Array, names: Sequence[Optional[str]]) -> jax.Array:
  """Pins an activation's logical layout; a no-op outside a mesh with axis rules."""
  return nn.with_logical_constraint(x, tuple(names))


# torch.nn.Linear / Conv default is not what the papers train with; these match timm and big_vision.
trunc_normal_02 = nn.initializers.truncated_normal(stddev=0.02)
xavier_uniform = nn.initializers.xavier_uniform()
zeros = nn.initializers.zeros
ones = nn.initializers.ones
# He (Kaiming) normal for ReLU-like nets, fan_out: how torchvision, timm, transformers and TF's reference code
# initialise convolutions (ResNet, ResNetV2, MobileNetV2, EfficientNet).
he_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def make_divisible(value: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
  """A channel count: `value` rounded to the nearest multiple of `divisor`, at least `min_value` (default
  `divisor`), and one `divisor` more where rounding would lose over 10% of `value`. TF-slim's rule, which
  torchvision's _make_divisible (MobileNetV2), timm's make_divisible (BiT, EfficientNet) and transformers'
  round_filters (EfficientNet) share."""
  min_value = divisor if min_value is None else min_value
  rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
  return int(rounded + divisor if rounded < 0.9 * value else rounded)


def same_padding(size: Sequence[int], kernel_size: int, strides: int) -> tuple[tuple[int, int], ...]:
  """TensorFlow's "SAME" zero padding of a kernel_size x kernel_size convolution: (before, after) for each axis of
  `size` (the input's spatial shape), ceil(n / strides) outputs, the odd pixel after."""
  pads = []
  for n in size:
    total = max((-(-n // strides) - 1) * strides + kernel_size - n, 0)
    pads.append((total // 2, total - total // 2))
  return tuple(pads)


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU in torch.nn.GELU's form, x/2 (1 + erf(x/sqrt 2)).

  jax.nn.gelu(approximate=False) uses the erfc form, equal within 1e-6 but several times the elementwise work
  on CPU (erfc expands to two polynomial branches).
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * math.sqrt(0.5)))


class Dense(nn.Module):
  """nn.Dense's parameters ("kernel" [in, out], "bias" [out]) and result, through kernels.matmul: the one dense
  layer of every model here."""

  features: int
  use_bias: bool = True
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = kernels.matmul(x, kernel)
    return y if bias is None else y + bias


def drop_path_rates(max_rate: float, num_blocks: int) -> list[float]:
  """Stochastic depth per block, linear from 0 (first block) to `max_rate` (last), as timm and the papers."""
  return [max_rate * i / max(num_blocks - 1, 1) for i in range(num_blocks)]


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per example during training.

  rate: a float, or a scalar array (a scanned stack of layers feeds each its own, traced, rate).
  """

  rate: Any

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    if not train or (isinstance(self.rate, (int, float)) and self.rate == 0.0):
      return x
    keep = 1.0 - self.rate
    if isinstance(keep, jax.Array):
      keep = keep.astype(x.dtype)  # an f32 rate would promote a bf16 branch
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


class Mlp(nn.Module):
  """Two dense layers with GELU between, as in every transformer block here."""

  hidden_dim: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    width = x.shape[-1]
    x = Dense(
      self.hidden_dim,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="fc1",
      kernel_init=partitioned(xavier_uniform, ("embed", "mlp")),
      bias_init=partitioned(nn.initializers.normal(1e-6), ("mlp",)),
    )(x)
    x = gelu(x)
    x = constrain(x, ("batch", "length", "mlp"))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = Dense(
      width,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="fc2",
      kernel_init=partitioned(xavier_uniform, ("mlp", "embed")),
      bias_init=partitioned(nn.initializers.normal(1e-6), ("embed",)),
    )(x)
    return nn.Dropout(self.dropout, deterministic=not train)(x)


def _flat_init(init: Callable, in_dims: int) -> Callable:
  """`init` drawn on the 2-D (fan_in, fan_out) view and reshaped: the numbers nn.DenseGeneral draws."""

  def flat(key, shape, dtype=jnp.float32):
    return init(key, (math.prod(shape[:in_dims]), math.prod(shape[in_dims:])), dtype).reshape(shape)

  return flat


class Projection(nn.Module):
  """x @ kernel over x's last `in_dims` axes, with a kernel of shape in_shape + features.

  nn.DenseGeneral cannot carry logical names on a multi-axis kernel: it boxes the flat 2-D kernel and
  unboxing that under axis rules and a mesh (flax re-runs the init to check shapes even in apply) applies a
  3-name constraint to a 2-D array. This draws the same numbers with the names on the real shape.
  """

  features: Sequence[int]
  in_dims: int
  kernel_names: Sequence[Optional[str]]
  bias_names: Sequence[Optional[str]]
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = tuple(self.features)
    kernel = self.param(
      "kernel",
      partitioned(_flat_init(xavier_uniform, self.in_dims), self.kernel_names),
      x.shape[x.ndim - self.in_dims :] + features,
      self.param_dtype,
    )
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    batch_shape, in_shape = x.shape[: x.ndim - self.in_dims], x.shape[x.ndim - self.in_dims :]
    y = kernels.matmul(x.reshape(batch_shape + (math.prod(in_shape),)), kernel.reshape(math.prod(in_shape), -1))
    y = y.reshape(batch_shape + features)
    if self.use_bias:
      y = y + self.param("bias", partitioned(zeros, self.bias_names), features, self.param_dtype).astype(self.dtype)
    return y


ATTENTION_IMPLEMENTATIONS = (None, "xla", "cudnn")


def attention_implementation(requested: Optional[str], head_dim: int, dtype, has_bias: bool, device=None) -> str:
  """The jax.nn.dot_product_attention implementation to use: `requested`, or for None the fastest that applies.

  jax's own default (None) is always XLA's unfused softmax(QK^T)V, which on a GPU writes the [heads, queries,
  keys] logits and weights to memory and back. None here picks cuDNN's fused flash attention where it runs:
  an NVIDIA GPU of compute capability >= 8.0 (Ampere or newer), bfloat16/float16 inputs, a head dim that is a
  multiple of 8 up to 128, and no bias (cuDNN's training kernel needs even sequence lengths with a bias, and
  Swin's 7x7 windows have 49). `device` defaults to the default backend's first device.
  """
  if requested not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLEMENTATIONS}, got {requested!r}.")
  if requested is not None:
    return requested
  device = device if device is not None else jax.devices()[0]
  capability = getattr(device, "compute_capability", None)
  if (
    device.platform == "gpu"
    and capability
    and tuple(map(int, str(capability).split(".")[:2])) >= (8, 0)
    and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    and head_dim % 8 == 0
    and head_dim <= 128
    and not has_bias
  ):
    return "cudnn"
  return "xla"


def dot_product_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  bias: Optional[jax.Array],
  implementation: str,
  valid_length: Optional[int] = None,
) -> jax.Array:
  """Attention on [batch, length, heads, head_dim] by `implementation` ("xla": kernels.xla_attention, "cudnn").

  bias: added to the [batch, heads, queries, keys] logits; it broadcasts, or its leading axis is a divisor G of
  the batch when examples come in groups (Swin's windows: example i takes bias[i % G]).
  valid_length: tokens from this index on are padding, masked out as keys (their outputs are not meaningful).
  cuDNN's flash attention trains only on even lengths (ViT's 196 patches + 1 class token are 197): for it an odd
  length is padded by one token here, masked the same way; models pad once instead (ViT), which saves the
  per-layer copies.
  """
  queries, keys = q.shape[1], k.shape[1]
  if implementation == "cudnn" and (queries % 2 or keys % 2):

    def pad(x, axis, length):
      return jnp.pad(x, [(0, length % 2 if i == axis else 0) for i in range(x.ndim)])

    q, k, v = pad(q, 1, queries), pad(k, 1, keys), pad(v, 1, keys)
    if bias is not None:  # [..., queries, keys], either may broadcast (size 1)
      bias = pad(
        pad(bias, bias.ndim - 2, queries if bias.shape[-2] == queries else 0),
        bias.ndim - 1,
        keys if bias.shape[-1] == keys else 0,
      )
    valid_length = keys if valid_length is None else valid_length
    return dot_product_attention(q, k, v, bias, implementation, valid_length)[:, :queries]
  if implementation == "xla":
    return kernels.xla_attention(q, k, v, bias, valid_length)
  return kernels.jax_attention(q, k, v, bias, valid_length, implementation)


def attention_probabilities(
  q: jax.Array, k: jax.Array, bias: Optional[jax.Array] = None, valid_length: Optional[int] = None
) -> jax.Array:
  """The float32 weights softmax(q k^T / sqrt(head_dim) + bias), [batch, heads, queries, keys], of q and k
  [batch, length, heads, head_dim], with `bias` and `valid_length` as for dot_product_attention (padding keys get
  weight 0). The attention kernels never write these; this is for looking at them."""
  q, k = q.astype(jnp.float32), k.astype(jnp.float32)
  logits = jnp.einsum("bqnh,bknh->bnqk", q, k) * q.shape[-1] ** -0.5
  if bias is not None:
    # Example i takes bias[i % groups] (Swin's windows), so group the batch for the bias to broadcast.
    groups = bias_groups(bias, q.shape[0])
    logits = (logits.reshape((-1, groups) + logits.shape[1:]) + bias.astype(jnp.float32)).reshape(logits.shape)
  if valid_length is not None:
    logits = jnp.where(jnp.arange(k.shape[1]) < valid_length, logits, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(logits, axis=-1)


class Attention(nn.Module):
  """Multi-head self-attention with separate query/key/value projections split into heads.

  Kernels are [embed, heads, head_dim] (and [heads, head_dim, embed] for the output), so tensor
  parallelism can shard heads. `bias` (e.g. Swin's relative position bias plus its shifted-window mask)
  is added to the attention logits: [batch or groups or 1, heads, queries, keys] (dot_product_attention).
  attention_impl: "xla", "cudnn" (fused flash attention, NVIDIA GPUs) or None for the fastest that applies
  (attention_implementation). Training with attention dropout always runs kernels.einsum_attention, the one form
  with dropout on the weights.
  Applied with mutable=["intermediates"], it also sows the float32 attention weights (before any attention
  dropout) as "attention_weights", [batch, heads, queries, keys] (attention_probabilities); otherwise it computes
  nothing extra.
  """

  num_heads: int
  dropout: float = 0.0
  qkv_bias: bool = True  # the output projection always has a bias, as in every reference
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: Optional[str] = None

  @nn.compact
  def __call__(
    self, x: jax.Array, *, train: bool, bias: Optional[jax.Array] = None, valid_length: Optional[int] = None
  ) -> jax.Array:
    """valid_length: tokens from this index on are padding, never attended to (dot_product_attention)."""
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"Attention width {width} is not divisible by num_heads={self.num_heads}.")
    head_dim = width // self.num_heads

    def project(name):
      return Projection(
        (self.num_heads, head_dim),
        1,
        ("embed", "heads", "kv"),
        ("heads", "kv"),
        use_bias=self.qkv_bias,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=name,
      )(x)

    q, k, v = project("query"), project("key"), project("value")
    q = constrain(q, ("batch", "length", "heads", "kv"))
    if bias is not None:
      bias = bias.astype(q.dtype)
    if self.is_mutable_collection("intermediates"):
      # The kernels never materialise the weights: recompute them, only when a caller asks for intermediates.
      self.sow("intermediates", "attention_weights", attention_probabilities(q, k, bias, valid_length))
    if train and self.dropout > 0.0:
      out = kernels.einsum_attention(q, k, v, bias, valid_length, nn.Dropout(self.dropout, deterministic=False))
    else:
      implementation = attention_implementation(self.attention_impl, head_dim, q.dtype, bias is not None)
      out = dot_product_attention(q, k, v, bias, implementation, valid_length)
    return Projection(
      (width,), 2, ("heads", "kv", "embed"), ("embed",), dtype=self.dtype, param_dtype=self.param_dtype, name="out"
    )(out)


def layer_norm(eps: float, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(
    epsilon=eps,
    dtype=dtype,
    param_dtype=param_dtype,
    name=name,
    scale_init=partitioned(ones, ("embed",)),
    bias_init=partitioned(zeros, ("embed",)),
  )


class FrozenBatchNorm(nn.Module):
  """BatchNorm with fixed statistics and affine transform, as torchvision's FrozenBatchNorm2d (its detectors'
  backbones): y = x * scale / sqrt(var + epsilon) + (bias - mean * scale / sqrt(var + epsilon)).

  All four vectors live in the `batch_stats` collection, as torchvision keeps them in buffers: the optimizer never
  sees them and a model's parameter count is torchvision's. It takes nn.BatchNorm's constructor arguments so that
  it can replace it (ResNet's `norm` field); use_running_average and momentum are accepted and ignored, and
  scale_init/bias_init give the initial scale and bias.
  """

  use_running_average: bool = True
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  scale_init: Callable = ones
  bias_init: Callable = zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = (x.shape[-1],)

    def stat(name: str, init: Callable) -> jax.Array:
      # Constant initialisers (ones, zeros) need no fresh key; the values are meant to be loaded anyway.
      return self.variable("batch_stats", name, lambda: init(jax.random.key(0), shape, jnp.float32)).value

    scale, bias = stat("scale", self.scale_init), stat("bias", self.bias_init)
    mean, var = stat("mean", zeros), stat("var", ones)
    # In float32, as torchvision folds them, then one multiply-add in the compute dtype.
    factor = scale * jax.lax.rsqrt(var + self.epsilon)
    shift = bias - mean * factor
    return x.astype(self.dtype) * factor.astype(self.dtype) + shift.astype(self.dtype)


class Conv2d(nn.Module):
  """A k x k convolution with torch.nn.Conv2d's symmetric padding (k // 2 on every side; "SAME" would pad a stride-2
  convolution asymmetrically) and an optional bias, computed by kernels.conv. Parameters "kernel" [k, k, in, out]
  and "bias" [out], named (None, None, "conv_in", "conv_out") and ("conv_out",). padding: ((top, bottom), (left,
  right)) instead (e.g. same_padding's); None pads k // 2."""

  features: int
  kernel_size: int
  strides: int = 1
  use_bias: bool = True
  padding: Optional[tuple] = None
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = zeros
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    kernel_init = partitioned(self.kernel_init, (None, None, "conv_in", "conv_out"))
    kernel = self.param("kernel", kernel_init, (k, k, x.shape[-1], self.features), self.param_dtype)
    bias = None
    if self.use_bias:
      bias = self.param("bias", partitioned(self.bias_init, ("conv_out",)), (self.features,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    padding = self.padding if self.padding is not None else ((k // 2, k // 2),) * 2
    y = kernels.conv(x, kernel, (self.strides, self.strides), padding)
    return y if bias is None else y + bias


class DepthwiseConv(nn.Module):
  """A k x k depthwise convolution (torch.nn.Conv2d with groups = channels), computed by kernels.depthwise_conv.
  Parameters "kernel" [k, k, 1, C] and, with use_bias, "bias" [C] (nn.Conv's with feature_group_count=C), their
  channel axis named `channel_axis`. padding: ((top, bottom), (left, right)); None pads k // 2 on every side, as
  torch does."""

  kernel_size: int
  strides: int = 1
  padding: Optional[tuple] = None
  use_bias: bool = False
  kernel_init: Callable = nn.initializers.lecun_normal()
  channel_axis: str = "conv_out"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, channels = self.kernel_size, x.shape[-1]
    kernel_init = partitioned(self.kernel_init, (None, None, None, self.channel_axis))
    kernel = self.param("kernel", kernel_init, (k, k, 1, channels), self.param_dtype)
    bias = None
    if self.use_bias:
      bias = self.param("bias", partitioned(zeros, (self.channel_axis,)), (channels,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    padding = self.padding if self.padding is not None else ((k // 2, k // 2),) * 2
    y = kernels.depthwise_conv(x, kernel, padding, self.strides)
    return y if bias is None else y + bias
