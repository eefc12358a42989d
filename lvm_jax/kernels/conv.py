"""2-D convolution without bias (NHWC input, HWIO kernel, explicit padding) in the form XLA:CPU runs fastest."""

from typing import Sequence

import jax

from lvm_jax.kernels import switch, winograd
from lvm_jax.kernels.matmul import cpu_gradient_matmul

Padding = Sequence[tuple[int, int]]


def reference_conv(x: jax.Array, kernel: jax.Array, strides: Sequence[int], padding: Padding) -> jax.Array:
  return jax.lax.conv_general_dilated(
    x, kernel, tuple(strides), tuple(map(tuple, padding)), dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


def cpu_conv(x: jax.Array, kernel: jax.Array, strides: Sequence[int], padding: Padding) -> jax.Array:
  """reference_conv, computed per shape the way XLA:CPU runs it fastest:
  - 1x1 without padding: a matrix product over the channels at every stride-th position (XLA:CPU's convolution
    runs these shapes slower than its dot, and a strided one reads every input position);
  - 3x3, stride 1, one pixel of padding: Winograd F(2x2, 3x3) where it applies (winograd.supports);
  - otherwise the reference.
  """
  strides, padding = tuple(strides), tuple(map(tuple, padding))
  size = kernel.shape[:2]
  if size == (1, 1) and padding == ((0, 0), (0, 0)):
    return cpu_gradient_matmul(x[:, :: strides[0], :: strides[1]], kernel[0, 0])
  if size == (3, 3) and strides == (1, 1) and padding == ((1, 1), (1, 1)) and winograd.supports(x, kernel):
    return winograd.winograd_conv3x3(x, kernel)
  return reference_conv(x, kernel, strides, padding)


def conv(x: jax.Array, kernel: jax.Array, strides: Sequence[int], padding: Padding) -> jax.Array:
  """lax.conv (reference_conv), or cpu_conv's form for the shape while the CPU kernels are on."""
  if switch.cpu_kernels_enabled():
    return cpu_conv(x, kernel, strides, padding)
  return reference_conv(x, kernel, strides, padding)
