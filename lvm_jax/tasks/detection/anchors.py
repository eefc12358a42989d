"""Static anchors for the FPN levels of a fixed canvas, in torchvision's AnchorGenerator order and coordinates.

Anchors are NumPy arrays computed once from the canvas size (they are constants of the jitted step). Per level,
rows are ordered as the heads flatten their outputs: locations row-major (y, then x), then the anchors of a
location (aspect ratio major, then size).

torchvision's conventions, reproduced on purpose:
  - an anchor is centred at (x * stride_x, y * stride_y), the top-left corner of its cell, not the cell's centre;
  - its half sizes are rounded to integers (round half to even), so a 40-pixel anchor of ratio 0.5 is 56 x 28;
  - the stride of a level is canvas_size // feature_size (integer division, per axis). On a canvas whose sides are
    multiples of 2**7 that is 8, 16, ..., 128; otherwise the coarse levels get other strides (a 100 x 100 canvas
    has feature maps 13, 7, 4, 2, 1 and strides 7, 14, 25, 50, 100), and torchvision's anchors follow them. So
    do these, which keeps converted torchvision weights exact on any canvas.
"""

from typing import Optional, Sequence

import numpy as np

LEVELS = (3, 4, 5, 6, 7)  # P3..P7

# torchvision's RetinaNet: three sizes an octave apart per level (int() truncates 40.3 to 40, as torchvision does).
RETINANET_SIZES = tuple((s, int(s * 2 ** (1.0 / 3)), int(s * 2 ** (2.0 / 3))) for s in (32, 64, 128, 256, 512))
RETINANET_ASPECT_RATIOS = (0.5, 1.0, 2.0)  # height / width
# torchvision's FCOS: one square "anchor" a location whose size is the level's nominal stride; only its centre
# (the FCOS point) and its size (which sets the level's scale range in matching) are used.
FCOS_SIZES = ((8,), (16,), (32,), (64,), (128,))
FCOS_ASPECT_RATIOS = (1.0,)


def _check_hw(hw: Sequence[int], name: str) -> tuple[int, int]:
  if len(hw) != 2 or any(int(n) != n or n < 1 for n in hw):
    raise ValueError(f"{name} must be (height, width) positive integers, got {hw!r}.")
  return int(hw[0]), int(hw[1])


def feature_sizes(canvas_hw: Sequence[int], levels: Sequence[int] = LEVELS) -> tuple[tuple[int, int], ...]:
  """(height, width) of each FPN level for a canvas, as the ResNet + FPN models compute them.

  Every stride-2 step (the stem conv, the max pool, each stage's first block, and the 3x3 stride-2 padding-1
  convs that make P6 and P7) maps n to ceil(n / 2), so level l is the canvas side halved l times, rounding up.
  Backbones that downsample differently (a ViT's patch grid) pass their own sizes to the anchor functions.
  """
  height, width = _check_hw(canvas_hw, "canvas_hw")
  sizes = []
  for level in levels:
    h, w = height, width
    for _ in range(level):
      h, w = -(-h // 2), -(-w // 2)
    sizes.append((h, w))
  return tuple(sizes)


def level_strides(canvas_hw: Sequence[int], feature_hw: Sequence[Sequence[int]]) -> tuple[tuple[int, int], ...]:
  """(stride_y, stride_x) of each level as torchvision derives them: canvas // feature size, per axis."""
  height, width = _check_hw(canvas_hw, "canvas_hw")
  return tuple((height // h, width // w) for h, w in (_check_hw(f, "feature_hw entry") for f in feature_hw))


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> np.ndarray:
  """The zero-centred anchors of one location, float32 [len(aspect_ratios) * len(sizes), 4], ratio-major.

  A ratio r = height / width scales a size s to width s / sqrt(r) and height s * sqrt(r); the corners (in
  float32, as torchvision) are rounded to integers.
  """
  scales = np.asarray(sizes, np.float32)
  h_ratios = np.sqrt(np.asarray(aspect_ratios, np.float32))
  w_ratios = np.float32(1) / h_ratios
  widths = (w_ratios[:, None] * scales[None, :]).reshape(-1)
  heights = (h_ratios[:, None] * scales[None, :]).reshape(-1)
  return np.round(np.stack([-widths, -heights, widths, heights], axis=1) / np.float32(2))


def grid_anchors(cell: np.ndarray, feature_hw: Sequence[int], stride_hw: Sequence[int]) -> np.ndarray:
  """`cell` anchors [A, 4] shifted to every location of a feature map -> float32 [h * w * A, 4]."""
  h, w = _check_hw(feature_hw, "feature_hw")
  stride_y, stride_x = stride_hw
  shift_y, shift_x = np.meshgrid(np.arange(h) * stride_y, np.arange(w) * stride_x, indexing="ij")
  shifts = np.stack([shift_x, shift_y, shift_x, shift_y], axis=-1).reshape(-1, 1, 4).astype(np.float32)
  return (shifts + cell[None]).reshape(-1, 4)


def make_anchors(
  canvas_hw: Sequence[int],
  sizes: Sequence[Sequence[float]],
  aspect_ratios: Sequence[float],
  feature_hw: Optional[Sequence[Sequence[int]]] = None,
) -> list[np.ndarray]:
  """Anchors of every level for a canvas: a list (P3 first) of float32 [h_l * w_l * A, 4] arrays.

  Args:
    canvas_hw: (height, width) of the model's input canvas.
    sizes: per level, the anchor sizes (side of the square of the same area) in pixels.
    aspect_ratios: height / width ratios, the same at every level.
    feature_hw: per level, the (height, width) of the feature map; default `feature_sizes(canvas_hw)`.
  """
  if feature_hw is None:
    feature_hw = feature_sizes(canvas_hw, LEVELS[: len(sizes)])
  if len(feature_hw) != len(sizes):
    raise ValueError(f"{len(feature_hw)} feature map sizes for {len(sizes)} levels of anchor sizes.")
  strides = level_strides(canvas_hw, feature_hw)
  return [
    grid_anchors(cell_anchors(level_sizes, aspect_ratios), hw, stride)
    for level_sizes, hw, stride in zip(sizes, feature_hw, strides)
  ]


def retinanet_anchors(
  canvas_hw: Sequence[int], feature_hw: Optional[Sequence[Sequence[int]]] = None
) -> list[np.ndarray]:
  """torchvision's RetinaNet anchors (9 a location: sizes 32..512 x 2**(0, 1/3, 2/3), ratios 0.5, 1, 2), per level."""
  return make_anchors(canvas_hw, RETINANET_SIZES, RETINANET_ASPECT_RATIOS, feature_hw)


def fcos_anchors(canvas_hw: Sequence[int], feature_hw: Optional[Sequence[Sequence[int]]] = None) -> list[np.ndarray]:
  """torchvision's FCOS anchors (one square of side 8, 16, ..., 128 a location), per level."""
  return make_anchors(canvas_hw, FCOS_SIZES, FCOS_ASPECT_RATIOS, feature_hw)


def anchors_per_location(sizes: Sequence[Sequence[float]], aspect_ratios: Sequence[float]) -> int:
  """How many anchors each location has (the head's A): 9 for RetinaNet, 1 for FCOS."""
  counts = {len(level_sizes) * len(aspect_ratios) for level_sizes in sizes}
  if len(counts) != 1:
    raise ValueError(f"anchor sizes {sizes} give levels different numbers of anchors a location.")
  return counts.pop()


def check_level_outputs(outputs: dict, key: str, anchors: Sequence[np.ndarray]) -> None:
  """Raises ValueError unless outputs[key] is a list of [B, N_l, K] arrays, one per level of `anchors` [N_l, 4]."""
  if key not in outputs:
    raise ValueError(f"model outputs lack {key!r}; they have {sorted(outputs)}.")
  if len(outputs[key]) != len(anchors):
    raise ValueError(f"outputs[{key!r}] has {len(outputs[key])} levels, the anchors {len(anchors)}.")
  for level, (out, level_anchors) in enumerate(zip(outputs[key], anchors)):
    if out.ndim != 3 or out.shape[1] != level_anchors.shape[0]:
      raise ValueError(
        f"outputs[{key!r}][{level}] has shape {tuple(out.shape)}; expected [B, {level_anchors.shape[0]}, K] "
        "(one row per anchor of that level, P3 first)."
      )
