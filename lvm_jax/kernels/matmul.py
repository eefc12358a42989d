"""x [..., in] @ kernel [in, out]: the product of every dense layer, projection and 1x1 convolution, with a CPU
gradient for the kernel."""

import jax
import jax.numpy as jnp

from lvm_jax.kernels import switch


def reference_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return jnp.einsum("...c,cd->...d", x, kernel)


@jax.custom_vjp
def cpu_gradient_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """reference_matmul, differentiated by _cpu_gradient_bwd (reverse mode only: jax.grad, jax.vjp)."""
  return reference_matmul(x, kernel)


def _cpu_gradient_fwd(x, kernel):
  return reference_matmul(x, kernel), (x, kernel)


def _cpu_gradient_bwd(residuals, dy):
  """The kernel's gradient x^T dy contracts both operands over their rows (batch x positions). XLA:CPU's dot
  runs that form slowly, so XLA has the producer of dy (a LayerNorm or BatchNorm backward) write it transposed,
  a strided loop that is slower still; transposing the narrower of x and dy as an op of its own costs less. The
  barrier keeps XLA from folding that transpose back into the dot."""
  x, kernel = residuals
  rows_x, rows_dy = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
  if rows_x.shape[1] <= rows_dy.shape[1]:
    dkernel = _transposed(rows_x) @ rows_dy
  else:
    dkernel = (_transposed(rows_dy) @ rows_x).T
  return jnp.einsum("...d,cd->...c", dy, kernel), dkernel


def _transposed(rows: jax.Array) -> jax.Array:
  # The first barrier has XLA write `rows` in its own order before the transpose reads it: fused into the transpose,
  # its producers (a LayerNorm, a depthwise convolution) would be recomputed in the transpose's strided order.
  return jax.lax.optimization_barrier(jax.lax.optimization_barrier(rows).T)


cpu_gradient_matmul.defvjp(_cpu_gradient_fwd, _cpu_gradient_bwd)


def matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x [..., in] @ kernel [in, out]; while the CPU kernels are on, with cpu_gradient_matmul's gradient."""
  if switch.cpu_kernels_enabled():
    return cpu_gradient_matmul(x, kernel)
  return reference_matmul(x, kernel)
