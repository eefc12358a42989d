"""3x3 stride-1 convolution by Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray 2016, "Fast Algorithms for
Convolutional Neural Networks"), the CPU kernel of ResNet's 3x3 convolutions (chosen in kernels/conv.py).

Each 2x2 block of outputs is computed from a 4x4 tile of the input: the tile and the kernel are transformed
(B^T d B, G g G^T), multiplied elementwise and summed over input channels, and transformed back (A^T m A). Over
all tiles that is 16 independent matrix products [tiles, C] @ [C, K]: 2.25x fewer multiplications than the
direct convolution, run by the matrix-product kernel XLA:CPU runs fastest, while XLA:CPU's own convolution runs
ResNet's 3x3 shapes well below its matrix-product speed. The gradient is Winograd too: the input's is the
convolution of dy with the kernel turned 180 degrees, the kernel's is the transformed input contracted with the
transformed dy. float32 results differ from the direct convolution by ~1e-6 relative
(rounding in the transforms, summation order).
F(4x4, 3x3) would do 4x fewer multiplications, but its float32 error (~1e-5, 2e-6 with the points 0, +-1, 2,
-1/2) puts a full ResNet-50's logits more than 1e-4 from PyTorch's.

It applies to float32 inputs that are not sharded over explicit mesh axes (supports); other backends (cuDNN,
XLA:TPU pick their own algorithms) have no need of it.
"""

import jax
import jax.numpy as jnp
import numpy as np

_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def direct_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """The same convolution by lax.conv: stride 1, one pixel of zero padding."""
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_DIMENSIONS)


# The transforms act along one spatial axis at a time, on lists of that axis' taps.


def _input_taps(d):
  """B^T over 4 input taps."""
  d0, d1, d2, d3 = d
  return [d0 - d2, d1 + d2, d2 - d1, d1 - d3]


def _output_taps(m):
  """A^T over 4 products: 2 outputs."""
  m0, m1, m2, m3 = m
  return [m0 + m1 + m2, m1 - m2 - m3]


def _output_taps_adjoint(y):
  """A over 2 output taps: the gradient of _output_taps."""
  y0, y1 = y
  return [y0, y0 + y1, y0 - y1, -y1]


def _tile_counts(height: int, width: int) -> tuple[int, int]:
  return -(-height // 2), -(-width // 2)


# G maps 3 kernel taps to 4; over both axes G g G^T is kron(G, G) [16, 9] applied to the 9 taps. As one small
# matrix product (its entries 0, 1/4, 1/2, 1 multiply exactly) it runs at memory speed, where 16 elementwise
# fusions and their stack made ResNet-50 inference measurably slower.
_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float32)
_KERNEL_TRANSFORM = np.kron(_G, _G)


def transform_kernel(kernel: jax.Array, turned: bool = False) -> jax.Array:
  """[3, 3, C, K] -> [16, C, K]: G g G^T for every input/output channel pair; with turned, of the kernel turned
  180 degrees (its 9 taps read in reverse, no copy)."""
  matrix = _KERNEL_TRANSFORM[:, ::-1] if turned else _KERNEL_TRANSFORM
  return jnp.einsum(
    "tj,jck->tck",
    matrix.astype(kernel.dtype),
    kernel.reshape((9,) + kernel.shape[2:]),
    precision=jax.lax.Precision.HIGHEST,
  )


def transform_kernel_adjoint(du: jax.Array) -> jax.Array:
  """[16, C, K] -> [3, 3, C, K]: the gradient of transform_kernel."""
  dkernel = jnp.einsum("tj,tck->jck", _KERNEL_TRANSFORM.astype(du.dtype), du, precision=jax.lax.Precision.HIGHEST)
  return dkernel.reshape((3, 3) + du.shape[1:])


def transform_input(x: jax.Array) -> jax.Array:
  """[N, H, W, C] -> [16, N * ceil(H/2) * ceil(W/2), C]: B^T d B of every 4x4 tile of the zero-padded input,
  tile (i, j) reading padded rows 2i..2i+3 and columns 2j..2j+3 (odd sizes get one more row/column of zeros)."""
  n, height, width, c = x.shape
  tiles_h, tiles_w = _tile_counts(height, width)
  padded = jnp.pad(x, ((0, 0), (1, 2 * tiles_h + 1 - height), (1, 2 * tiles_w + 1 - width), (0, 0)))
  # Two 4-way stacks (rows, then columns): XLA:CPU runs them as fused loops, one 16-way stack as a slow concat.
  rows = jnp.stack(_input_taps([padded[:, i : i + 2 * tiles_h : 2] for i in range(4)]))
  tiles = jnp.stack(_input_taps([rows[:, :, :, j : j + 2 * tiles_w : 2] for j in range(4)]), axis=1)
  return tiles.reshape(16, n * tiles_h * tiles_w, c)


def transform_output(products: jax.Array, n: int, height: int, width: int) -> jax.Array:
  """[16, tiles, K] -> [N, H, W, K]: A^T m A of every tile, each giving a 2x2 block of outputs."""
  tiles_h, tiles_w = _tile_counts(height, width)
  k = products.shape[-1]
  products = products.reshape(4, 4, n, tiles_h, tiles_w, k)
  rows = _output_taps([products[a] for a in range(4)])
  blocks = jnp.stack([jnp.stack(_output_taps([row[b] for b in range(4)]), axis=3) for row in rows], axis=2)
  return blocks.reshape(n, 2 * tiles_h, 2 * tiles_w, k)[:, :height, :width]


def transform_output_adjoint(dy: jax.Array) -> jax.Array:
  """[N, H, W, K] -> [16, tiles, K]: the gradient of transform_output."""
  n, height, width, k = dy.shape
  tiles_h, tiles_w = _tile_counts(height, width)
  dy = jnp.pad(dy, ((0, 0), (0, 2 * tiles_h - height), (0, 2 * tiles_w - width), (0, 0)))
  dy = dy.reshape(n, tiles_h, 2, tiles_w, 2, k)
  rows = _output_taps_adjoint([dy[:, :, 0], dy[:, :, 1]])
  dm = jnp.stack([jnp.stack(_output_taps_adjoint([row[:, :, :, 0], row[:, :, :, 1]])) for row in rows])
  return dm.reshape(16, n * tiles_h * tiles_w, k)


def _correlate(x: jax.Array, u: jax.Array, u_axes: str) -> jax.Array:
  """The Winograd convolution of x with the transformed kernel u, [16, in, out] ("io") or [16, out, in] ("oi")."""
  n, height, width, _ = x.shape
  products = jnp.einsum(f"tpi,t{u_axes}->tpo", transform_input(x), u)
  return transform_output(products, n, height, width)


@jax.custom_vjp
def _winograd(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return _correlate(x, transform_kernel(kernel), "io")


def _winograd_fwd(x, kernel):
  # The input is kept, not its transform: that is 4x the input's size and cheap to redo.
  return _winograd(x, kernel), (x, kernel)


def _winograd_bwd(residuals, dy):
  x, kernel = residuals
  # dx correlates dy with the kernel turned 180 degrees and its channels swapped (read as [16, out, in]).
  dx = _correlate(dy, transform_kernel(kernel, turned=True), "oi")
  du = jnp.einsum("tpc,tpk->tck", transform_input(x), transform_output_adjoint(dy))
  return dx, transform_kernel_adjoint(du)


_winograd.defvjp(_winograd_fwd, _winograd_bwd)


def supports(x: jax.Array, kernel: jax.Array) -> bool:
  """Whether winograd_conv3x3 takes these operands: float32, and not sharded over explicit mesh axes (whose types
  carry the sharding, which the tile reshapes would have to name)."""
  explicitly_sharded = any(axis is not None for axis in jax.typeof(x).sharding.spec)
  return x.dtype == kernel.dtype == jnp.float32 and not explicitly_sharded


def winograd_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """direct_conv3x3 computed by F(2x2, 3x3), forward and backward (reverse mode: jax.grad/jax.vjp, not jax.jvp).

  NHWC input, HWIO kernel.
  """
  if kernel.ndim != 4 or kernel.shape[:2] != (3, 3) or x.ndim != 4 or x.shape[-1] != kernel.shape[2]:
    raise ValueError(
      f"winograd_conv3x3 needs an [N, H, W, C] input and a [3, 3, C, K] kernel, got shapes {x.shape} "
      f"and {kernel.shape}."
    )
  return _winograd(x, kernel)
