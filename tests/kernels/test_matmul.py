"""kernels.matmul: the CPU gradient of the dense product against autodiff's, and the plain product when off."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvm_jax import kernels


@pytest.mark.parametrize("shape,features", [((2, 5, 7, 8), 24), ((2, 5, 7, 24), 8), ((3, 11, 16), 16), ((4, 6), 3)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matmul_gradients_equal_the_einsum_gradients(shape, features, dtype):
  """On CPU the kernel gradient transposes the narrower operand by hand: same numbers as autodiff's."""
  assert jax.default_backend() == "cpu"  # the custom gradient is the CPU path
  x = jax.random.normal(jax.random.key(0), shape, dtype)
  kernel = jax.random.normal(jax.random.key(1), (shape[-1], features), dtype)
  cotangent = jax.random.normal(jax.random.key(2), shape[:-1] + (features,), dtype)

  def vjp(f):
    out, pullback = jax.vjp(f, x, kernel)
    return (out,) + pullback(cotangent)

  program = str(jax.make_jaxpr(lambda x, kernel: kernels.matmul(x, kernel))(x, kernel))
  assert "custom_vjp_call" in program  # really the hand-written gradient
  got = vjp(kernels.matmul)
  want = vjp(lambda x, k: jnp.einsum("...c,cd->...d", x, k))
  tol = 1e-5 if dtype == jnp.float32 else 5e-2
  for g, w in zip(got, want):
    assert g.dtype == w.dtype == dtype and g.shape == w.shape
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=tol, atol=tol)


def test_switched_off_it_is_the_plain_product_and_jvp_works():
  x, kernel = jnp.ones((3, 4)), jnp.full((4, 2), 0.5)
  with kernels.use_cpu_kernels(False):
    assert "custom_vjp_call" not in str(jax.make_jaxpr(lambda x, kernel: kernels.matmul(x, kernel))(x, kernel))
    _, tangent = jax.jvp(kernels.matmul, (x, kernel), (x, jnp.zeros_like(kernel)))
  np.testing.assert_array_equal(tangent, x @ kernel)
