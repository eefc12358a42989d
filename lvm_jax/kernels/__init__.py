"""CPU kernels: gradients and algorithms that XLA:CPU runs faster than its generic lowering, behind one switch.

Each kernel is chosen in one function that holds the plain jax reference and the CPU form side by side:
  matmul           einsum                          | the kernel's gradient with the narrower operand transposed
  conv             lax.conv                        | 1x1 as a matrix product, 3x3 stride 1 by Winograd F(2x2, 3x3)
  depthwise_conv   lax.conv, one group a channel   | a fused sum of shifted, per-channel scaled copies
  max_pool_3x3s2   nn.max_pool                     | a gradient without select-and-scatter
  xla_attention    jax.nn.dot_product_attention    | head-major einsums with the softmax's division deferred
The CPU forms give the reference's results within float32 rounding; their custom gradients support reverse mode
only (jax.grad, jax.vjp). With the switch off the models are plain Flax/XLA, and jax.jvp works.

The switch, first that is set wins: a use_cpu_kernels(enabled) block; the environment variable
LVM_JAX_CPU_KERNELS=1 or 0; otherwise on exactly where jax's default backend is the CPU. The choice is taken when a
function is traced: a function already traced (jitted and called) keeps its choice for inputs of the same shapes,
under any jax.jit wrapper, until jax.clear_caches().
"""

from lvm_jax.kernels.attention import einsum_attention, jax_attention, xla_attention
from lvm_jax.kernels.conv import conv
from lvm_jax.kernels.depthwise import depthwise_conv
from lvm_jax.kernels.matmul import matmul
from lvm_jax.kernels.max_pool import max_pool_3x3s2
from lvm_jax.kernels.switch import ENV_VAR, cpu_kernels_enabled, use_cpu_kernels

__all__ = [
  "ENV_VAR",
  "conv",
  "cpu_kernels_enabled",
  "depthwise_conv",
  "einsum_attention",
  "jax_attention",
  "matmul",
  "max_pool_3x3s2",
  "use_cpu_kernels",
  "xla_attention",
]
