"""Depthwise 2-D convolution, stride 1 (NHWC input, [k, k, 1, C] kernel, explicit padding): ConvNeXt's 7x7."""

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


def cpu_depthwise_conv(x: jax.Array, kernel: jax.Array, padding: Padding) -> jax.Array:
  """reference_depthwise_conv as a sum of k*k shifted copies of the input, each scaled per channel: XLA:CPU fuses
  them into one loop, where its grouped convolution runs a generic, much slower one."""
  kh, kw = kernel.shape[:2]
  padded = jnp.pad(x, ((0, 0), *map(tuple, padding), (0, 0)))
  height, width = padded.shape[1] - kh + 1, padded.shape[2] - kw + 1
  out = None
  for i in range(kh):
    for j in range(kw):
      term = padded[:, i : i + height, j : j + width, :] * kernel[i, j, 0]
      out = term if out is None else out + term
  return out


def depthwise_conv(x: jax.Array, kernel: jax.Array, padding: Padding) -> jax.Array:
  """lax's grouped convolution (reference_depthwise_conv), or cpu_depthwise_conv's form while the CPU kernels are on.
  Both are plain jax: forward and reverse mode work either way."""
  if switch.cpu_kernels_enabled():
    return cpu_depthwise_conv(x, kernel, padding)
  return reference_depthwise_conv(x, kernel, padding)
