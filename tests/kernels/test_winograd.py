"""Winograd F(2x2, 3x3): the same convolution as lax.conv, forward and both gradients, at every size parity; and
where kernels.conv chooses it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvm_jax import kernels
from lvm_jax.kernels import winograd

# (N, H, W, C, K): even and odd sizes (odd ones pad a last tile with zeros), a single pixel, more outputs than
# inputs.
SHAPES = [(2, 8, 8, 4, 6), (1, 7, 9, 3, 5), (2, 1, 1, 2, 3), (1, 2, 3, 5, 4), (2, 14, 14, 16, 16)]
TOLERANCE = 2e-6  # float32 distance from the direct convolution, relative to the largest output (measured ~1e-6)


def _relative_error(actual, expected):
  return float(jnp.abs(actual - expected).max() / jnp.abs(expected).max())


@jax.jit(static_argnums=0)
def _value_and_pullback(conv, x, kernel, dy):
  y, pullback = jax.vjp(conv, x, kernel)
  return y, pullback(dy)


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_gradients_equal_the_direct_convolution(shape):
  n, height, width, c, k = shape
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (n, height, width, c))
  kernel = jax.random.normal(keys[1], (3, 3, c, k))
  dy = jax.random.normal(keys[2], (n, height, width, k))
  y, (dx, dkernel) = _value_and_pullback(winograd.winograd_conv3x3, x, kernel, dy)
  y_ref, (dx_ref, dkernel_ref) = _value_and_pullback(winograd.direct_conv3x3, x, kernel, dy)
  assert y.shape == y_ref.shape == (n, height, width, k) and y.dtype == jnp.float32
  assert dx.shape == x.shape and dkernel.shape == kernel.shape
  for got, want in ((y, y_ref), (dx, dx_ref), (dkernel, dkernel_ref)):
    assert _relative_error(got, want) < TOLERANCE


def test_gradient_under_jit_and_grad():
  x = jax.random.normal(jax.random.key(1), (2, 9, 6, 3))
  kernel = jax.random.normal(jax.random.key(2), (3, 3, 3, 4))
  loss = lambda conv: jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.tanh(conv(x, w))), argnums=(0, 1)))
  for got, want in zip(loss(winograd.winograd_conv3x3)(x, kernel), loss(winograd.direct_conv3x3)(x, kernel)):
    assert _relative_error(got, want) < TOLERANCE


def _conv3x3(x, kernel):
  return kernels.conv(x, kernel, (1, 1), ((1, 1), (1, 1)))


def _program(x, kernel) -> str:
  # A new function each time: jax would hand back its cached trace, taken under another switch setting.
  return str(jax.make_jaxpr(lambda x, kernel: _conv3x3(x, kernel))(x, kernel))


def test_float32_on_cpu_is_winograd_and_other_dtypes_the_direct_convolution():
  assert jax.default_backend() == "cpu"
  x, kernel = jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2))
  float32_program = _program(x, kernel)
  assert "custom_vjp_call" in float32_program and "conv_general_dilated" not in float32_program
  bf16_program = _program(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16))
  assert "conv_general_dilated" in bf16_program and "custom_vjp_call" not in bf16_program
  with kernels.use_cpu_kernels(False):
    off_program = _program(x, kernel)
  assert "conv_general_dilated" in off_program and "custom_vjp_call" not in off_program


def test_a_kernel_that_is_not_3x3_is_an_error():
  with pytest.raises(ValueError, match=r"\[3, 3, C, K\] kernel, got shapes \(1, 4, 4, 2\) and \(5, 5, 2, 2\)"):
    winograd.winograd_conv3x3(jnp.ones((1, 4, 4, 2)), jnp.ones((5, 5, 2, 2)))
  with pytest.raises(ValueError, match=r"got shapes \(1, 4, 4, 3\) and \(3, 3, 2, 2\)"):
    winograd.winograd_conv3x3(jnp.ones((1, 4, 4, 3)), jnp.ones((3, 3, 2, 2)))


@pytest.mark.parametrize("axis_type", [jax.sharding.AxisType.Auto, jax.sharding.AxisType.Explicit])
def test_batch_sharded_input_over_a_mesh(axis_type):
  """Under an auto mesh the types carry no sharding and Winograd runs; over explicit axes the tile reshapes would
  have to name the sharding, so the direct convolution runs instead."""
  mesh = jax.make_mesh((2,), ("data",), axis_types=(axis_type,))
  x = jax.random.normal(jax.random.key(0), (4, 6, 5, 3))
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 3, 2))
  with jax.set_mesh(mesh):
    sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    y = jax.jit(_conv3x3)(sharded, kernel)
  winograd_y, direct_y = jax.jit(winograd.winograd_conv3x3)(x, kernel), jax.jit(winograd.direct_conv3x3)(x, kernel)
  assert not np.array_equal(winograd_y, direct_y)  # the two paths round apart, so equality tells which ran
  np.testing.assert_array_equal(y, winograd_y if axis_type == jax.sharding.AxisType.Auto else direct_y)
