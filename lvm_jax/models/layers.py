"""Blocks shared by the model families: attention, MLP, stochastic depth, partitioned initialisers."""

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
  # Exact (erf) GELU, as torch.nn.GELU and HF "gelu" compute it.
  return nn.gelu(x, approximate=False)


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per example during training."""
  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    if not train or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
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
    x = nn.Dense(self.hidden_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="fc1",
                 kernel_init=partitioned(xavier_uniform, ("embed", "mlp")),
                 bias_init=partitioned(nn.initializers.normal(1e-6), ("mlp",)))(x)
    x = gelu(x)
    x = constrain(x, ("batch", "length", "mlp"))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype, name="fc2",
                 kernel_init=partitioned(xavier_uniform, ("mlp", "embed")),
                 bias_init=partitioned(nn.initializers.normal(1e-6), ("embed",)))(x)
    return nn.Dropout(self.dropout, deterministic=not train)(x)


class Attention(nn.Module):
  """Multi-head self-attention with separate query/key/value projections split into heads.

  Kernels are [embed, heads, head_dim] (and [heads, head_dim, embed] for the output), so tensor
  parallelism can shard heads. `bias` (e.g. Swin's relative position bias plus its shifted-window mask)
  is added to the attention logits; it broadcasts to [batch, heads, queries, keys].
  """
  num_heads: int
  dropout: float = 0.0
  qkv_bias: bool = True  # the output projection always has a bias, as in every reference
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool, bias: Optional[jax.Array] = None) -> jax.Array:
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"Attention width {width} is not divisible by num_heads={self.num_heads}.")
    head_dim = width // self.num_heads

    def project(name):
      return nn.DenseGeneral(
          (self.num_heads, head_dim), use_bias=self.qkv_bias, dtype=self.dtype,
          param_dtype=self.param_dtype, name=name,
          kernel_init=partitioned(xavier_uniform, ("embed", "heads", "kv")),
          bias_init=partitioned(zeros, ("heads", "kv")))(x)

    q, k, v = project("query"), project("key"), project("value")
    q = constrain(q, ("batch", "length", "heads", "kv"))
    if bias is not None:
      bias = bias.astype(q.dtype)
    if train and self.dropout > 0.0:
      logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head_dim).astype(q.dtype)
      if bias is not None:
        logits = logits + bias
      weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(q.dtype)
      weights = nn.Dropout(self.dropout, deterministic=False)(weights)
      out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    else:
      # Lets the backend pick a fused kernel (cuDNN flash attention on GPU, Pallas/XLA on TPU).
      out = jax.nn.dot_product_attention(q, k, v, bias=bias)
    return nn.DenseGeneral(
        width, axis=(-2, -1), dtype=self.dtype, param_dtype=self.param_dtype,
        name="out", kernel_init=partitioned(xavier_uniform, ("heads", "kv", "embed")),
        bias_init=partitioned(zeros, ("embed",)))(out)


def layer_norm(eps: float, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name,
                      scale_init=partitioned(ones, ("embed",)),
                      bias_init=partitioned(zeros, ("embed",)))
