"""kernels.max_pool_3x3s2: torch's padding, and the CPU gradient against XLA's select-and-scatter."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lvm_jax import kernels


def test_max_pool_pads_like_torch_with_minus_infinity():
  x = -1.0 - np.abs(np.random.RandomState(0).randn(2, 7, 9, 3).astype(np.float32))  # all negative
  expected = torch.nn.functional.max_pool2d(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), 3, 2, 1)
  for enabled in (True, False):
    with kernels.use_cpu_kernels(enabled):
      np.testing.assert_array_equal(kernels.max_pool_3x3s2(jnp.asarray(x)), expected.numpy().transpose(0, 2, 3, 1))


@pytest.mark.parametrize("shape", [(2, 112, 112, 8), (1, 7, 9, 3), (2, 8, 5, 4)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_max_pool_gradient_on_cpu_is_select_and_scatters(shape, dtype):
  """The hand-written CPU gradient sends each output's gradient where XLA's generic one does, ties included
  (ReLU outputs are full of tied zeros) and never into the padding (all-negative inputs)."""
  assert jax.default_backend() == "cpu"  # the custom gradient is the CPU path
  rng = np.random.default_rng(0)
  for x in (
    np.maximum(rng.standard_normal(shape), 0),
    -np.abs(rng.standard_normal(shape)) - 1,
    np.round(rng.standard_normal(shape)),
  ):
    x = jnp.asarray(x, dtype)
    program = str(jax.make_jaxpr(lambda x: kernels.max_pool_3x3s2(x))(x))
    assert "custom_vjp_call" in program  # really the hand-written gradient
    y, pullback = jax.vjp(kernels.max_pool_3x3s2, x)
    y_ref, pullback_ref = jax.vjp(lambda x: nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1))), x)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
    cotangent = jnp.asarray(rng.standard_normal(y.shape), dtype)
    (dx,), (dx_ref,) = pullback(cotangent), pullback_ref(cotangent)
    assert dx.dtype == dtype and dx.shape == x.shape
    tol = 1e-6 if dtype == jnp.float32 else 2e-2  # overlapping windows sum in another order
    np.testing.assert_allclose(np.asarray(dx, np.float32), np.asarray(dx_ref, np.float32), rtol=tol, atol=tol)
