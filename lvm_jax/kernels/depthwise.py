"""Depthwise 2-D convolution (NHWC input, [k, k, 1, C] kernel, explicit padding, stride 1 or more): ConvNeXt's 7x7,
MobileNet's and EfficientNet's 3x3 and 5x5."""

import functools
from typing import Sequence

import jax
import jax.numpy as jnp

from lvm_jax.kernels import switch

Padding = Sequence[tuple[int, int]]


def reference_depthwise_conv(x: jax.Array, kernel: jax.Array, padding: Padding, strides: int = 1) -> jax.Array:
  return jax.lax.conv_general_dilated(
    x,
    kernel,
    (strides, strides),
    tuple(map(tuple, padding)),
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    feature_group_count=x.shape[-1],
  )


def _output_size(padded: int, k: int, strides: int) -> int:
  return (padded - k) // strides + 1


def _taps(padded: jax.Array, k: tuple[int, int], strides: int):
  """(i, j, the input under kernel tap (i, j) at every output position): strided slices of the padded input."""
  height, width = (_output_size(padded.shape[1 + a], k[a], strides) for a in range(2))
  for i in range(k[0]):
    for j in range(k[1]):
      window = padded[:, i : i + (height - 1) * strides + 1 : strides, j : j + (width - 1) * strides + 1 : strides]
      yield i, j, window


def _shifted_sum(padded: jax.Array, kernel: jax.Array, strides: int = 1) -> jax.Array:
  """sum over taps (i, j) of the input under the tap times kernel[i, j, 0]: one loop once XLA fuses it."""
  out = None
  for i, j, window in _taps(padded, kernel.shape[:2], strides):
    term = window * kernel[i, j, 0]
    out = term if out is None else out + term
  return out


def _pad(x: jax.Array, padding, interior: int = 0) -> jax.Array:
  # lax.pad takes negative amounts (crops), which the input gradient's padding can be
  config = ((0, 0, 0), *((lo, hi, interior) for lo, hi in padding), (0, 0, 0))
  return jax.lax.pad(x, jnp.zeros((), x.dtype), config)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _cpu_depthwise_conv(x: jax.Array, kernel: jax.Array, padding: tuple, strides: int) -> jax.Array:
  return _shifted_sum(_pad(x, padding), kernel, strides)


def _forward(x, kernel, padding, strides):
  padded = _pad(x, padding)
  return _shifted_sum(padded, kernel, strides), (padded, kernel)


def _backward(padding, strides, residuals, grad):
  padded, kernel = residuals
  k = kernel.shape[:2]
  # The input's gradient is the same form on the output's gradient spread back to the input's grid (strides - 1
  # zeros between its rows and columns) with the kernel flipped; the padding also crops off the input's padding.
  spread_padding = []
  for a in range(2):
    spread = (grad.shape[1 + a] - 1) * strides + 1
    lo, hi = padding[a]
    spread_padding.append((k[a] - 1 - lo, padded.shape[1 + a] - spread - hi))
  grad_x = _shifted_sum(_pad(grad, spread_padding, strides - 1), kernel[::-1, ::-1])
  # The kernel's gradient: k*k sums over (batch, height, width). One variadic reduce computes them in a single
  # pass over the input and the gradient, where k*k separate reductions would each read both again.
  products = tuple((window * grad).astype(jnp.float32) for _, _, window in _taps(padded, k, strides))
  zeros = (jnp.zeros((), jnp.float32),) * len(products)
  sums = jax.lax.reduce(products, zeros, lambda a, b: tuple(u + v for u, v in zip(a, b)), (0, 1, 2))
  grad_kernel = jnp.stack(sums).reshape(kernel.shape).astype(kernel.dtype)
  return grad_x, grad_kernel


_cpu_depthwise_conv.defvjp(_forward, _backward)


def cpu_depthwise_conv(x: jax.Array, kernel: jax.Array, padding: Padding, strides: int = 1) -> jax.Array:
  """reference_depthwise_conv as a sum of k*k shifted (strided) copies of the input, each scaled per channel:
  XLA:CPU fuses them into one loop, where its grouped convolution runs a generic, much slower one. Its gradient is
  written out (reverse mode only): the input's is the same form, the kernel's one variadic reduction."""
  return _cpu_depthwise_conv(x, kernel, tuple(tuple(int(p) for p in pair) for pair in padding), int(strides))


def depthwise_conv(x: jax.Array, kernel: jax.Array, padding: Padding, strides: int = 1) -> jax.Array:
  """lax's grouped convolution (reference_depthwise_conv), or cpu_depthwise_conv's form while the CPU kernels are
  on. `padding`: ((top, bottom), (left, right)); `strides`: the same in both directions."""
  if switch.cpu_kernels_enabled():
    return cpu_depthwise_conv(x, kernel, padding, strides)
  return reference_depthwise_conv(x, kernel, padding, strides)
