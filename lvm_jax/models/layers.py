"""Blocks shared by the model families: attention, MLP, stochastic depth, partitioned initialisers."""

import functools
import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

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


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU in torch.nn.GELU's form, x/2 (1 + erf(x/sqrt 2)).

  jax.nn.gelu(approximate=False) uses the erfc form, equal within 1e-6 but about 3x the elementwise work on
  CPU (erfc expands to two polynomial branches).
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * math.sqrt(0.5)))


def cpu_custom_gradient(fn: Callable, fwd: Callable, bwd: Callable) -> Callable:
  """`fn` differentiated through fwd/bwd (jax.custom_vjp) when the default backend is CPU, plain `fn` elsewhere.

  For ops whose generic gradient XLA:CPU runs slowly. A custom gradient supports reverse mode (jax.grad,
  jax.vjp) but not forward mode (jax.jvp), as with other fused kernels such as cuDNN attention.
  """
  custom = jax.custom_vjp(fn)
  custom.defvjp(fwd, bwd)

  @functools.wraps(fn)
  def dispatch(*args):
    return custom(*args) if jax.default_backend() == "cpu" else fn(*args)

  return dispatch


def _matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x [..., in] @ kernel [in, out], the product of every dense layer and 1x1 convolution here (on CPU with
  the kernel gradient of _matmul_cpu_bwd)."""
  return jnp.einsum("...c,cd->...d", x, kernel)


def _matmul_fwd(x, kernel):
  return _matmul(x, kernel), (x, kernel)


def _matmul_cpu_bwd(residuals, dy):
  """The kernel's gradient x^T dy contracts both operands over their rows (batch x positions). XLA:CPU's dot
  runs that form at about half speed, so XLA has the producer of dy (a LayerNorm or BatchNorm backward) write
  it transposed, a strided loop that is slow; transposing the narrower of x and dy as an op of its own costs
  less (train step on 2 cores: ResNet-50 +13%, Swin-T +8%, ViT-B/16 +7%). The barrier keeps XLA from folding
  that transpose back into the dot."""
  x, kernel = residuals
  rows_x, rows_dy = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
  if rows_x.shape[1] <= rows_dy.shape[1]:
    dkernel = jax.lax.optimization_barrier(rows_x.T) @ rows_dy
  else:
    dkernel = (jax.lax.optimization_barrier(rows_dy.T) @ rows_x).T
  return jnp.einsum("...d,cd->...c", dy, kernel), dkernel


matmul = cpu_custom_gradient(_matmul, _matmul_fwd, _matmul_cpu_bwd)


class Dense(nn.Module):
  """nn.Dense's parameters ("kernel" [in, out], "bias" [out]) and result, through `matmul`."""
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
    y = matmul(x, kernel)
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
    x = Dense(self.hidden_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="fc1",
                 kernel_init=partitioned(xavier_uniform, ("embed", "mlp")),
                 bias_init=partitioned(nn.initializers.normal(1e-6), ("mlp",)))(x)
    x = gelu(x)
    x = constrain(x, ("batch", "length", "mlp"))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = Dense(width, dtype=self.dtype, param_dtype=self.param_dtype, name="fc2",
                 kernel_init=partitioned(xavier_uniform, ("mlp", "embed")),
                 bias_init=partitioned(nn.initializers.normal(1e-6), ("embed",)))(x)
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
    kernel = self.param("kernel", partitioned(_flat_init(xavier_uniform, self.in_dims), self.kernel_names),
                        x.shape[x.ndim - self.in_dims:] + features, self.param_dtype)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    batch_shape, in_shape = x.shape[:x.ndim - self.in_dims], x.shape[x.ndim - self.in_dims:]
    y = matmul(x.reshape(batch_shape + (math.prod(in_shape),)), kernel.reshape(math.prod(in_shape), -1))
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
    raise ValueError(f"Attention implementation must be one of {ATTENTION_IMPLEMENTATIONS}, got {requested!r}.")
  if requested is not None:
    return requested
  device = device if device is not None else jax.devices()[0]
  capability = getattr(device, "compute_capability", None)
  if (device.platform == "gpu" and capability and tuple(map(int, str(capability).split(".")[:2])) >= (8, 0)
      and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 128
      and not has_bias):
    return "cudnn"
  return "xla"


def _bias_groups(bias: jax.Array, batch: int) -> int:
  """How many distinct leading entries an attention bias has: example i takes bias[i % groups]."""
  groups = bias.shape[0] if bias.ndim == 4 else 1
  if batch % groups:
    raise ValueError(f"Attention bias of shape {bias.shape}: its leading axis must divide the batch of {batch} "
                     "(example i takes bias[i % groups]).")
  return groups


def _head_major_logits(q, k, bias, valid_length):
  """[batch, heads, queries, keys] float32 logits of head-major q, k, with the bias added and padding masked.
  A float32 q is scaled before the product ([queries, head_dim] multiplications instead of [queries, keys]);
  lower precisions scale the float32 logits, as jax does (a bfloat16 q * 1/sqrt(32) would round)."""
  scale = q.shape[-1] ** -0.5
  if q.dtype == jnp.float32:
    logits = jnp.einsum("bnqh,bnkh->bnqk", q * scale, k, preferred_element_type=jnp.float32)
  else:
    logits = jnp.einsum("bnqh,bnkh->bnqk", q, k, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    groups = _bias_groups(bias, q.shape[0])
    grouped = logits.reshape((-1, groups) + logits.shape[1:])  # the bias broadcasts here, never materialised
    logits = (grouped + bias.astype(jnp.float32)).reshape(logits.shape)
  if valid_length is not None:
    logits = jnp.where(jnp.arange(k.shape[2]) < valid_length, logits, jnp.finfo(jnp.float32).min)
  return logits


def _normalised_attention(q, k, v, bias, valid_length, dropout=None):
  """Head-major attention through the softmax weights: what the gradient needs, and dropout acts on."""
  weights = jax.nn.softmax(_head_major_logits(q, k, bias, valid_length), axis=-1).astype(v.dtype)
  if dropout is not None:
    weights = dropout(weights)
  return jnp.einsum("bnqk,bnkh->bnqh", weights, v)


@jax.custom_vjp
def _deferred_attention(q, k, v, bias, valid_length):
  """The same attention with the softmax's division moved after the product with v: [queries, head_dim] divided
  instead of [queries, keys], and no normalised weights written (ViT-B/16 inference +3.5-6%, Swin-T +0.5-3% in
  A/B runs on 2 cores). Its gradient is the normalised form's, which keeps the
  weights the backward reads (differentiating the deferred form made Swin-T's training step 2-4% slower)."""
  logits = _head_major_logits(q, k, bias, valid_length)
  exp = jnp.exp(logits - logits.max(-1, keepdims=True))
  out = jnp.einsum("bnqk,bnkh->bnqh", exp.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return (out / exp.sum(-1, keepdims=True)).astype(v.dtype)


def _deferred_attention_fwd(q, k, v, bias, valid_length):
  # valid_length is an ordinary argument (it may be traced) with no gradient.
  return jax.vjp(lambda q, k, v, bias: _normalised_attention(q, k, v, bias, valid_length), q, k, v, bias)


def _deferred_attention_bwd(normalised_vjp, dout):
  return (*normalised_vjp(dout), None)


_deferred_attention.defvjp(_deferred_attention_fwd, _deferred_attention_bwd)


def einsum_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: Optional[jax.Array] = None,
                     valid_length: Optional[int] = None, dropout: Optional[Callable] = None) -> jax.Array:
  """softmax(q k^T / sqrt(head_dim) + bias) v on [batch, length, heads, head_dim], as plain einsums.

  Computed head-major ([batch, heads, length, head_dim]): XLA:CPU runs the batched products far faster with
  the batch axes leading than with jax.nn.dot_product_attention's token-major einsums (ViT-B/16 attention at
  batch 8: 21.5 -> 13.5 ms a layer, 8 ms with the deferred division). Logits and softmax in float32, as jax's
  XLA implementation does. `bias` as for dot_product_attention; `dropout`, if given, is applied to the
  attention weights. Without dropout, reverse-mode only: jax.grad, jax.vjp, jax.hessian work, jax.jvp and
  jax.jacfwd do not.
  """
  q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))
  if dropout is not None:
    out = _normalised_attention(q, k, v, bias, valid_length, dropout)
  else:
    out = _deferred_attention(q, k, v, bias, valid_length)
  return jnp.swapaxes(out, 1, 2)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: Optional[jax.Array],
                          implementation: str, valid_length: Optional[int] = None) -> jax.Array:
  """jax.nn.dot_product_attention on [batch, length, heads, head_dim]; einsum_attention for "xla" on CPU.

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
      bias = pad(pad(bias, bias.ndim - 2, queries if bias.shape[-2] == queries else 0),
                 bias.ndim - 1, keys if bias.shape[-1] == keys else 0)
    valid_length = keys if valid_length is None else valid_length
    return dot_product_attention(q, k, v, bias, implementation, valid_length)[:, :queries]
  if implementation == "xla" and jax.default_backend() == "cpu":
    return einsum_attention(q, k, v, bias, valid_length)
  if bias is not None and bias.ndim == 4 and bias.shape[0] not in (1, q.shape[0]):
    # jax's kernels need the bias broadcastable to the whole batch: repeat the groups.
    bias = jnp.tile(bias, (q.shape[0] // _bias_groups(bias, q.shape[0]), 1, 1, 1))
  key_lengths = None if valid_length is None else jnp.full((q.shape[0],), valid_length, jnp.int32)
  return jax.nn.dot_product_attention(q, k, v, bias=bias, implementation=implementation,
                                      key_value_seq_lengths=key_lengths)


class Attention(nn.Module):
  """Multi-head self-attention with separate query/key/value projections split into heads.

  Kernels are [embed, heads, head_dim] (and [heads, head_dim, embed] for the output), so tensor
  parallelism can shard heads. `bias` (e.g. Swin's relative position bias plus its shifted-window mask)
  is added to the attention logits: [batch or groups or 1, heads, queries, keys] (dot_product_attention). `implementation`:
  "xla", "cudnn" (fused flash attention, NVIDIA GPUs) or None for the fastest that applies
  (attention_implementation).
  """
  num_heads: int
  dropout: float = 0.0
  qkv_bias: bool = True  # the output projection always has a bias, as in every reference
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  implementation: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool, bias: Optional[jax.Array] = None,
               valid_length: Optional[int] = None) -> jax.Array:
    """valid_length: tokens from this index on are padding, never attended to (dot_product_attention)."""
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"Attention width {width} is not divisible by num_heads={self.num_heads}.")
    head_dim = width // self.num_heads

    def project(name):
      return Projection((self.num_heads, head_dim), 1, ("embed", "heads", "kv"), ("heads", "kv"),
                        use_bias=self.qkv_bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name)(x)

    q, k, v = project("query"), project("key"), project("value")
    q = constrain(q, ("batch", "length", "heads", "kv"))
    if bias is not None:
      bias = bias.astype(q.dtype)
    if train and self.dropout > 0.0:
      out = einsum_attention(q, k, v, bias, valid_length, nn.Dropout(self.dropout, deterministic=False))
    else:
      implementation = attention_implementation(self.implementation, head_dim, q.dtype, bias is not None)
      out = dot_product_attention(q, k, v, bias, implementation, valid_length)
    return Projection((width,), 2, ("heads", "kv", "embed"), ("embed",), dtype=self.dtype,
                      param_dtype=self.param_dtype, name="out")(out)


def layer_norm(eps: float, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name,
                      scale_init=partitioned(ones, ("embed",)),
                      bias_init=partitioned(zeros, ("embed",)))
