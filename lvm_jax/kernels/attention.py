"""softmax(q k^T / sqrt(head_dim) + bias) v with XLA: jax.nn.dot_product_attention (the reference), or the same
einsums laid out head-major with the softmax's division deferred (the CPU kernel).

XLA:CPU runs the batched products far faster with the batch axes leading ([batch, heads, length, head_dim]) than
with jax's token-major einsums. Logits and softmax are float32 in both, as jax's XLA implementation computes them.
"""

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from lvm_jax.kernels import switch


def bias_groups(bias: jax.Array, batch: int) -> int:
  """How many distinct leading entries an attention bias has: example i takes bias[i % groups]."""
  groups = bias.shape[0] if bias.ndim == 4 else 1
  if batch % groups:
    raise ValueError(
      f"Attention bias of shape {bias.shape}: its leading axis must divide the batch of {batch} "
      "(example i takes bias[i % groups])."
    )
  return groups


def jax_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, bias: Optional[jax.Array], valid_length: Optional[int], implementation: str
) -> jax.Array:
  """jax.nn.dot_product_attention on [batch, length, heads, head_dim], with a grouped bias and padding keys.

  bias: broadcasts to [batch, heads, queries, keys], or its leading axis divides the batch (bias_groups).
  valid_length: keys from this index on are padding, masked out.
  """
  if bias is not None and bias.ndim == 4 and bias.shape[0] not in (1, q.shape[0]):
    # jax's kernels need the bias broadcastable to the whole batch: repeat the groups.
    bias = jnp.tile(bias, (q.shape[0] // bias_groups(bias, q.shape[0]), 1, 1, 1))
  key_lengths = None if valid_length is None else jnp.full((q.shape[0],), valid_length, jnp.int32)
  return jax.nn.dot_product_attention(
    q, k, v, bias=bias, implementation=implementation, key_value_seq_lengths=key_lengths
  )


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
    groups = bias_groups(bias, q.shape[0])
    grouped = logits.reshape((-1, groups) + logits.shape[1:])  # the bias broadcasts here, never materialized
    logits = (grouped + bias.astype(jnp.float32)).reshape(logits.shape)
  if valid_length is not None:
    logits = jnp.where(jnp.arange(k.shape[2]) < valid_length, logits, jnp.finfo(jnp.float32).min)
  return logits


def _normalized_attention(q, k, v, bias, valid_length, dropout=None):
  """Head-major attention through the softmax weights: what the gradient needs, and dropout acts on."""
  weights = jax.nn.softmax(_head_major_logits(q, k, bias, valid_length), axis=-1).astype(v.dtype)
  if dropout is not None:
    weights = dropout(weights)
  return jnp.einsum("bnqk,bnkh->bnqh", weights, v)


@jax.custom_vjp
def _deferred_attention(q, k, v, bias, valid_length):
  """The same attention with the softmax's division moved after the product with v: [queries, head_dim] divided
  instead of [queries, keys], and no normalized weights written. Its gradient is the normalized form's, which
  keeps the weights the backward reads (differentiating the deferred form made the training step slower)."""
  logits = _head_major_logits(q, k, bias, valid_length)
  exp = jnp.exp(logits - logits.max(-1, keepdims=True))
  out = jnp.einsum("bnqk,bnkh->bnqh", exp.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return (out / exp.sum(-1, keepdims=True)).astype(v.dtype)


def _deferred_attention_fwd(q, k, v, bias, valid_length):
  # valid_length is an ordinary argument (it may be traced) with no gradient.
  return jax.vjp(lambda q, k, v, bias: _normalized_attention(q, k, v, bias, valid_length), q, k, v, bias)


def _deferred_attention_bwd(normalized_vjp, dout):
  return (*normalized_vjp(dout), None)


_deferred_attention.defvjp(_deferred_attention_fwd, _deferred_attention_bwd)


def einsum_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  bias: Optional[jax.Array] = None,
  valid_length: Optional[int] = None,
  dropout: Optional[Callable] = None,
) -> jax.Array:
  """Attention on [batch, length, heads, head_dim] as head-major einsums; `bias` and `valid_length` as for
  jax_attention.

  Without dropout the softmax's division is deferred (a custom gradient: reverse mode only, jax.grad, jax.vjp and
  jax.hessian work, jax.jvp and jax.jacfwd do not). `dropout`, if given, acts on the attention weights: plain
  einsums, differentiable in both modes, and the one form here with dropout, so it serves with the switch off too.
  """
  q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))
  if dropout is not None:
    out = _normalized_attention(q, k, v, bias, valid_length, dropout)
  else:
    out = _deferred_attention(q, k, v, bias, valid_length)
  return jnp.swapaxes(out, 1, 2)


def xla_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, bias: Optional[jax.Array] = None, valid_length: Optional[int] = None
) -> jax.Array:
  """XLA's attention: einsum_attention while the CPU kernels are on, jax.nn.dot_product_attention otherwise."""
  if switch.cpu_kernels_enabled():
    return einsum_attention(q, k, v, bias, valid_length)
  return jax_attention(q, k, v, bias, valid_length, "xla")
