"""Depthwise 2-D convolution, stride 1 (NHWC input, [k, k, 1, C] kernel, explicit padding): ConvNeXt's 7x7."""

import functools
from typing import Sequence

import jax
import jax.numpy as jnp

from lvm_jax.kernels import switch

Padding = Sequence[tuple[int, int]]


def reference_depthwise_conv(x: jax.Array, kernel: jax.Array, padding: Padding) -> jax.Array:
  return jax.lax.conv_general_dilated(
    x,
    kernel,
    (1, 1),
    tuple(map(tuple, padding)),
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    feature_group_count=x.shape[-1],
  )


def _shifted_sum(padded: jax.Array, kernel: jax.Array) -> jax.Array:
  """sum over (i, j) of padded[:, i:i+H, j:j+W] * kernel[i, j, 0]: one loop once XLA fuses it."""
  kh, kw = kernel.shape[:2]
  height, width = padded.shape[1] - kh + 1, padded.shape[2] - kw + 1
  out = None
  for i in range(kh):
    for j in range(kw):
      term = padded[:, i : i + height, j : j + width, :] * kernel[i, j, 0]
      out = term if out is None else out + term
  return out


def _pad(x: jax.Array, padding: Padding) -> jax.Array:
  # lax.pad takes negative amounts (crops), which the input gradient's padding can be
  config = ((0, 0, 0), *((lo, hi, 0) for lo, hi in padding), (0, 0, 0))
  return jax.lax.pad(x, jnp.zeros((), x.dtype), config)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _cpu_depthwise_conv(x: jax.Array, kernel: jax.Array, padding: tuple) -> jax.Array:
  return _shifted_sum(_pad(x, padding), kernel)


def _forward(x, kernel, padding):
  padded = _pad(x, padding)
  return _shifted_sum(padded, kernel), (padded, kernel)


def _backward(padding, residuals, grad):
  padded, kernel = residuals
  kh, kw = kernel.shape[:2]
  # The input's gradient is the same convolution of the output's gradient with the kernel flipped.
  flipped_padding = ((kh - 1 - padding[0][0], kh - 1 - padding[0][1]), (kw - 1 - padding[1][0], kw - 1 - padding[1][1]))
  grad_x = _shifted_sum(_pad(grad, flipped_padding), kernel[::-1, ::-1])
  # The kernel's gradient: k*k sums over (batch, height, width). One variadic reduce computes them in a single
  # pass over the input and the gradient, where k*k separate reductions would each read both again.
  height, width = grad.shape[1:3]
  products = tuple(
    (padded[:, i : i + height, j : j + width, :] * grad).astype(jnp.float32) for i in range(kh) for j in range(kw)
  )
  zeros = (jnp.zeros((), jnp.float32),) * len(products)
  sums = jax.lax.reduce(products, zeros, lambda a, b: tuple(u + v for u, v in zip(a, b)), (0, 1, 2))
  grad_kernel = jnp.stack(sums).reshape(kernel.shape).astype(kernel.dtype)
  return grad_x, grad_kernel


_cpu_depthwise_conv.defvjp(_forward, _backward)


def cpu_depthwise_conv(x: jax.Array, kernel: jax.Array, padding: Padding) -> jax.Array:
  """reference_depthwise_conv as a sum of k*k shifted copies of the input, each scaled per channel: XLA:CPU fuses
  them into one loop, where its grouped convolution runs a generic, much slower one. Its gradient is written out
  (reverse mode only): the input's is the same form, the kernel's one variadic reduction."""
  return _cpu_depthwise_conv(x, kernel, tuple(tuple(int(p) for p in pair) for pair in padding))


def depthwise_conv(x: jax.Array, kernel: jax.Array, padding: Padding) -> jax.Array:
  """lax's grouped convolution (reference_depthwise_conv), or cpu_depthwise_conv's form while the CPU kernels are on.
  Both are plain jax: forward and reverse mode work either way."""
  if switch.cpu_kernels_enabled():
    return cpu_depthwise_conv(x, kernel, padding)
  return reference_depthwise_conv(x, kernel, padding)
