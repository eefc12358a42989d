"""3x3 stride-2 max pool with torch's padding (ResNet's stem), with a CPU gradient."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from lvm_jax.kernels import switch


def reference_max_pool_3x3s2(x: jax.Array) -> jax.Array:
  """3x3/2 max pool with 1 pixel of padding that never wins the max, as torch.nn.MaxPool2d pads (-inf)."""
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


@jax.custom_vjp
def cpu_gradient_max_pool_3x3s2(x: jax.Array) -> jax.Array:
  """reference_max_pool_3x3s2 with the gradient of _cpu_gradient_bwd: XLA:CPU expands the generic one
  (select-and-scatter) into index arithmetic that costs several times as much."""
  return reference_max_pool_3x3s2(x)


def _cpu_gradient_fwd(x):
  y = reference_max_pool_3x3s2(x)
  return y, (x, y)


def _cpu_gradient_bwd(residuals, dy):
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
      tap = padded[:, i : i + 2 * out_h - 1 : 2, j : j + 2 * out_w - 1 : 2]
      hit = (tap == y) & ~taken
      taken = taken | hit
      spread = (
        (0, 0, 0),
        (i, padded.shape[1] - i - 2 * out_h + 1, 1),
        (j, padded.shape[2] - j - 2 * out_w + 1, 1),
        (0, 0, 0),
      )
      dpadded = dpadded + jax.lax.pad(jnp.where(hit, dy, zero), zero, spread)
  return (dpadded[:, 1 : height + 1, 1 : width + 1],)


cpu_gradient_max_pool_3x3s2.defvjp(_cpu_gradient_fwd, _cpu_gradient_bwd)


def max_pool_3x3s2(x: jax.Array) -> jax.Array:
  """3x3/2 max pool with torch's padding; while the CPU kernels are on, with cpu_gradient_max_pool_3x3s2's
  gradient."""
  if switch.cpu_kernels_enabled():
    return cpu_gradient_max_pool_3x3s2(x)
  return reference_max_pool_3x3s2(x)
