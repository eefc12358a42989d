"""Anchors and FPN feature sizes: the definitions, and torchvision's AnchorGenerator on the same canvases."""

import numpy as np
import pytest

from lvm_jax.tasks.detection import anchors as anchor_ops
from tests.tasks.detection import load_fixture

CANVASES = [(100, 100), (72, 136)]  # sides that are not multiples of 128


@pytest.fixture(scope="module")
def torchvision_anchors():
  return load_fixture("anchors")


@pytest.mark.parametrize("canvas", CANVASES)
def test_feature_sizes_match_torchvision_resnet_fpn(torchvision_anchors, canvas):
  tag = f"{canvas[0]}x{canvas[1]}"
  for model in ("retinanet", "fcos"):
    np.testing.assert_array_equal(anchor_ops.feature_sizes(canvas), torchvision_anchors[f"{model}_feature_sizes_{tag}"])


@pytest.mark.parametrize("canvas", CANVASES)
@pytest.mark.parametrize(
  "model, make", [("retinanet", anchor_ops.retinanet_anchors), ("fcos", anchor_ops.fcos_anchors)]
)
def test_anchors_equal_torchvision(torchvision_anchors, canvas, model, make):
  tag = f"{canvas[0]}x{canvas[1]}"
  ours = make(canvas)
  assert len(ours) == 5
  for level, level_anchors in enumerate(ours):
    assert level_anchors.dtype == np.float32
    np.testing.assert_array_equal(level_anchors, torchvision_anchors[f"{model}_{tag}_level{level}"])


def test_feature_sizes_halve_rounding_up():
  assert anchor_ops.feature_sizes((800, 1216)) == ((100, 152), (50, 76), (25, 38), (13, 19), (7, 10))
  assert anchor_ops.feature_sizes((1, 1)) == ((1, 1),) * 5


def test_strides_are_integer_division_as_torchvision():
  assert anchor_ops.level_strides((512, 640), anchor_ops.feature_sizes((512, 640))) == tuple(
    (s, s) for s in (8, 16, 32, 64, 128)
  )
  # 100 -> 13, 7, 4, 2, 1 feature rows: strides 100 // 13 = 7, 14, 25, 50, 100
  assert anchor_ops.level_strides((100, 100), anchor_ops.feature_sizes((100, 100))) == tuple(
    (s, s) for s in (7, 14, 25, 50, 100)
  )


def test_retinanet_anchor_layout_from_the_definition():
  """9 anchors a location (ratio-major, then size), centred at (x * 8, y * 8), sizes s * 2**(k/3) truncated."""
  level0 = anchor_ops.retinanet_anchors((256, 128))[0]
  assert level0.shape == (32 * 16 * 9, 4)
  sizes = np.array([32, 40, 50])
  ratios = np.array([0.5, 1.0, 2.0])
  widths = (sizes[None, :] / np.sqrt(ratios)[:, None]).reshape(-1)
  heights = (sizes[None, :] * np.sqrt(ratios)[:, None]).reshape(-1)
  grid = level0.reshape(32, 16, 9, 4)
  y, x = 5, 11
  centres = (grid[y, x, :, :2] + grid[y, x, :, 2:]) / 2
  np.testing.assert_array_equal(centres, np.tile([[x * 8, y * 8]], (9, 1)))
  # corners are rounded separately, so each side is within 1 pixel of the exact size
  np.testing.assert_allclose(grid[y, x, :, 2] - grid[y, x, :, 0], widths, atol=1.0)
  np.testing.assert_allclose(grid[y, x, :, 3] - grid[y, x, :, 1], heights, atol=1.0)
  np.testing.assert_array_equal(grid[0, 0, 3], [-16, -16, 16, 16])  # ratio 1, size 32 at the origin
  assert anchor_ops.RETINANET_SIZES[1] == (64, 80, 101)


def test_fcos_anchor_is_one_stride_square_a_location():
  levels = anchor_ops.fcos_anchors((256, 256))
  for level, (size, level_anchors) in enumerate(zip((8, 16, 32, 64, 128), levels)):
    side = 256 // 2 ** (level + 3)
    assert level_anchors.shape == (side * side, 4)
    np.testing.assert_array_equal(level_anchors[side + 1], [size - size / 2, size - size / 2, size * 1.5, size * 1.5])


def test_anchors_per_location_and_custom_feature_sizes():
  assert anchor_ops.anchors_per_location(anchor_ops.RETINANET_SIZES, anchor_ops.RETINANET_ASPECT_RATIOS) == 9
  assert anchor_ops.anchors_per_location(anchor_ops.FCOS_SIZES, anchor_ops.FCOS_ASPECT_RATIOS) == 1
  custom = anchor_ops.fcos_anchors((64, 64), feature_hw=[(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)])
  assert [len(a) for a in custom] == [64, 16, 4, 1, 1]


def test_bad_inputs_are_named():
  with pytest.raises(ValueError, match="canvas_hw"):
    anchor_ops.feature_sizes((100,))
  with pytest.raises(ValueError, match="2 feature map sizes for 5 levels"):
    anchor_ops.retinanet_anchors((64, 64), feature_hw=[(8, 8), (4, 4)])
  outputs = {"cls_logits": [np.zeros((1, 7, 3))] * 5}
  with pytest.raises(ValueError, match=r"outputs\['cls_logits'\]\[0\] has shape"):
    anchor_ops.check_level_outputs(outputs, "cls_logits", anchor_ops.fcos_anchors((64, 64)))
  with pytest.raises(ValueError, match="lack 'centerness'"):
    anchor_ops.check_level_outputs(outputs, "centerness", anchor_ops.fcos_anchors((64, 64)))
