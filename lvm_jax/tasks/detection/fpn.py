"""Feature pyramid network (Lin et al. 2017) as torchvision builds it for RetinaNet and FCOS: P3..P5 from a
backbone's stride-8/16/32 maps (C3..C5) by 1x1 laterals, top-down nearest upsampling and 3x3 output convolutions,
then P6 and P7 by stride-2 3x3 convolutions (torchvision's LastLevelP6P7)."""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lvm_jax.models import layers

# torchvision's FPN init: kaiming_uniform_(a=1), i.e. U(+-sqrt(3 / fan_in)); biases 0.
_CONV_INIT = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")
EXTRA_SOURCES = ("p5", "c5")


def nearest_indices(size_in: int, size_out: int) -> np.ndarray:
  """The source row of each output row of torch's F.interpolate(mode="nearest", size=size_out): floor(i * scale)
  with scale = size_in / size_out in float32, as torch computes it."""
  scale = np.float32(size_in) / np.float32(size_out)
  rows = np.floor(np.arange(size_out, dtype=np.float32) * scale).astype(np.int64)
  return np.minimum(rows, size_in - 1)


def _resize_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
  rows = nearest_indices(x.shape[axis], size)
  factor = -(-size // x.shape[axis])
  if np.array_equal(rows, np.arange(size) // factor):
    # Each row repeated `factor` times (2x, and 2x less one row for an odd size): a broadcast, no gather.
    return jax.lax.slice_in_dim(jnp.repeat(x, factor, axis=axis), 0, size, axis=axis)
  return jnp.take(x, rows, axis=axis)


def upsample_nearest(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """NHWC `x` resized to `size` (height, width) by nearest neighbour, exactly as torch's F.interpolate(x,
  size=size, mode="nearest") picks rows and columns (odd sizes included)."""
  return _resize_axis(_resize_axis(x, 1, int(size[0])), 2, int(size[1]))


class FeaturePyramid(nn.Module):
  """P3..P7 (channels each) from [C3, C4, C5], NHWC.

  extra_from: what P6 is computed from, "p5" (torchvision's RetinaNet v1 and FCOS: LastLevelP6P7(256, 256)) or
  "c5" (RetinaNet v2: LastLevelP6P7(2048, 256)). P7 is the stride-2 conv of relu(P6).
  Parameters: lateral_<i> (1x1) and output_<i> (3x3) for C3..C5 (i = 0, 1, 2), p6 and p7; all with biases.
  """

  channels: int = 256
  extra_from: str = "p5"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[jax.Array]) -> list[jax.Array]:
    if self.extra_from not in EXTRA_SOURCES:
      raise ValueError(f"FeaturePyramid extra_from must be one of {EXTRA_SOURCES}, got {self.extra_from!r}.")
    if len(features) != 3:
      raise ValueError(f"FeaturePyramid takes the stride-8/16/32 maps [C3, C4, C5]; got {len(features)} maps.")

    def conv(size: int, strides: int, name: str) -> layers.Conv2d:
      return layers.Conv2d(
        self.channels,
        size,
        strides,
        kernel_init=_CONV_INIT,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=name,
      )

    top = len(features) - 1
    inner = conv(1, 1, f"lateral_{top}")(features[top])
    outputs = [conv(3, 1, f"output_{top}")(inner)]
    for i in range(top - 1, -1, -1):
      lateral = conv(1, 1, f"lateral_{i}")(features[i])
      inner = lateral + upsample_nearest(inner, lateral.shape[1:3])
      outputs.insert(0, conv(3, 1, f"output_{i}")(inner))
    p6 = conv(3, 2, "p6")(outputs[-1] if self.extra_from == "p5" else features[-1])
    p7 = conv(3, 2, "p7")(nn.relu(p6))
    outputs += [p6, p7]
    return [layers.constrain(p, ("batch", "height", "width", "conv_out")) for p in outputs]
