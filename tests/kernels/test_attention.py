"""Head-major einsum attention (the CPU kernel) against jax.nn.dot_product_attention (the reference)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvm_jax import kernels
from lvm_jax.models import layers


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_einsum_attention_is_jax_attention(dtype):
  """The head-major einsums XLA runs on CPU: jax.nn.dot_product_attention's numbers, with a broadcast bias
  (Swin's [1, heads, q, k]) and masked padding keys, forward and backward."""
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((2, 9, 3, 8)), dtype) for _ in range(3))
  bias = jnp.asarray(rng.standard_normal((1, 3, 9, 9)), dtype)
  tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2)
  for b, valid in ((None, None), (bias, None), (bias, 7)):
    lengths = None if valid is None else jnp.full((2,), valid, jnp.int32)

    def expected(q, k, v):
      return jax.nn.dot_product_attention(q, k, v, bias=b, implementation="xla", key_value_seq_lengths=lengths)

    def einsum(q, k, v):
      return kernels.einsum_attention(q, k, v, b, valid)

    np.testing.assert_allclose(
      np.asarray(einsum(q, k, v), np.float32), np.asarray(expected(q, k, v), np.float32), **tol
    )
    grads = [
      jax.grad(lambda *qkv: jnp.sum(f(*qkv).astype(jnp.float32) * v[:, :, :1]), argnums=(0, 1, 2))(q, k, v)
      for f in (expected, einsum)
    ]
    for a, e in zip(*grads):
      np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(e, np.float32), **tol)
  # Grouped bias (Swin's windows): example i takes bias[i % 3], here against the bias repeated by hand.
  q6, k6, v6 = (jnp.concatenate([t] * 3) for t in (q, k, v))
  grouped = jnp.asarray(rng.standard_normal((3, 3, 9, 9)), dtype)
  repeated = jnp.tile(grouped, (2, 1, 1, 1))
  expected = jax.nn.dot_product_attention(q6, k6, v6, bias=repeated, implementation="xla")
  np.testing.assert_allclose(
    np.asarray(kernels.einsum_attention(q6, k6, v6, grouped), np.float32), np.asarray(expected, np.float32), **tol
  )
  with kernels.use_cpu_kernels(False):  # the reference: jax's kernel, with the groups repeated
    np.testing.assert_allclose(
      np.asarray(kernels.xla_attention(q6, k6, v6, grouped), np.float32), np.asarray(expected, np.float32), **tol
    )
  with pytest.raises(ValueError, match=r"must divide the batch of 6"):
    kernels.einsum_attention(q6, k6, v6, grouped[:2].repeat(2, 0)[:4])
  for enabled in (True, False):  # the CPU kernels run the einsums for XLA's choice; off, jax's own
    with kernels.use_cpu_kernels(enabled):
      program = str(jax.make_jaxpr(lambda q: layers.dot_product_attention(q, k, v, bias, "xla"))(q))
    assert ("custom_vjp_call" in program) == enabled


def test_einsum_attention_matches_jax_in_bfloat16_at_head_dim_32_and_with_a_traced_valid_length():
  """Large bfloat16 logits at head_dim 32 (whose scale a bfloat16 q would round): jax's numbers, forward and
  backward; a valid_length traced under jit takes the same masking."""
  rng = np.random.default_rng(1)
  q, k = (jnp.asarray(3 * rng.standard_normal((4, 50, 4, 32)), jnp.bfloat16) for _ in range(2))
  v = jnp.asarray(rng.standard_normal((4, 50, 4, 32)), jnp.bfloat16)
  expected = jax.nn.dot_product_attention(q, k, v, implementation="xla")
  np.testing.assert_allclose(
    np.asarray(kernels.einsum_attention(q, k, v), np.float32), np.asarray(expected, np.float32), rtol=2e-2, atol=2e-2
  )
  grads = [
    jax.grad(lambda q, f=f: jnp.sum(f(q).astype(jnp.float32) * v[..., :1]))(q)
    for f in (
      lambda q: jax.nn.dot_product_attention(q, k, v, implementation="xla"),
      lambda q: kernels.einsum_attention(q, k, v),
    )
  ]
  np.testing.assert_allclose(np.asarray(grads[1], np.float32), np.asarray(grads[0], np.float32), rtol=2e-2, atol=2e-2)
  traced = jax.jit(lambda n: kernels.einsum_attention(q, k, v, None, n))(7)
  np.testing.assert_allclose(
    np.asarray(traced, np.float32),
    np.asarray(kernels.einsum_attention(q, k, v, None, 7), np.float32),
    rtol=1e-2,
    atol=1e-2,
  )
