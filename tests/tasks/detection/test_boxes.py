"""Box geometry and coders against NumPy references and torchvision's own results."""

import numpy as np
import pytest

from lvm_jax.tasks.detection import boxes as box_ops
from tests.tasks.detection import (
  load_fixture,
  np_area,
  np_box_iou,
  np_decode_deltas,
  np_decode_ltrb,
  np_giou_loss,
  random_boxes,
)


@pytest.fixture(scope="module")
def torchvision_boxes():
  return load_fixture("boxes")


def np_generalized_box_iou(boxes1, boxes2):
  """IoU - (enclosing area - union) / enclosing area, pair by pair."""
  giou = np.zeros((len(boxes1), len(boxes2)))
  for i, a in enumerate(boxes1):
    for j, b in enumerate(boxes2):
      inter = max(min(a[2], b[2]) - max(a[0], b[0]), 0) * max(min(a[3], b[3]) - max(a[1], b[1]), 0)
      union = np_area(a) + np_area(b) - inter
      enclosing = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
      giou[i, j] = inter / union - (enclosing - union) / enclosing
  return giou


def test_area_iou_giou_match_numpy_definitions():
  rng = np.random.default_rng(0)
  boxes1 = random_boxes(rng, 9, (50, 60), 2, 30).astype(np.float64)
  boxes2 = random_boxes(rng, 5, (50, 60), 2, 30).astype(np.float64)
  boxes2[0] = boxes1[0]
  np.testing.assert_allclose(box_ops.box_area(boxes1.astype(np.float32)), np_area(boxes1), rtol=1e-6)
  iou = np.asarray(box_ops.box_iou(boxes1.astype(np.float32), boxes2.astype(np.float32)))
  assert iou.shape == (9, 5)
  np.testing.assert_allclose(iou, np_box_iou(boxes1, boxes2), atol=1e-6)
  assert iou[0, 0] == pytest.approx(1.0)
  assert (iou == 0).any() and ((iou > 0) & (iou < 1)).any()  # disjoint and partial pairs are both exercised
  giou = np.asarray(box_ops.generalized_box_iou(boxes1.astype(np.float32), boxes2.astype(np.float32)))
  np.testing.assert_allclose(giou, np_generalized_box_iou(boxes1, boxes2), atol=1e-6)
  assert (giou < 0).any()


def test_giou_loss_matches_numpy_definition_and_is_zero_for_equal_boxes():
  rng = np.random.default_rng(1)
  boxes1 = random_boxes(rng, 20, (50, 60), 2, 30)
  boxes2 = random_boxes(rng, 20, (50, 60), 2, 30)
  boxes2[0] = boxes1[0]
  loss = np.asarray(box_ops.generalized_box_iou_loss(boxes1, boxes2))
  np.testing.assert_allclose(loss, np_giou_loss(boxes1.astype(np.float64), boxes2.astype(np.float64)), atol=1e-6)
  assert loss[0] == pytest.approx(0.0, abs=1e-6)
  assert (loss > 1).any()  # some disjoint pairs: GIoU < 0


def test_batched_leading_dims():
  rng = np.random.default_rng(2)
  boxes1 = random_boxes(rng, 12, (50, 60), 2, 30).reshape(2, 6, 4)
  boxes2 = random_boxes(rng, 8, (50, 60), 2, 30).reshape(2, 4, 4)
  iou = np.asarray(box_ops.box_iou(boxes1, boxes2))
  assert iou.shape == (2, 6, 4)
  np.testing.assert_allclose(iou[1], np_box_iou(boxes1[1], boxes2[1]), atol=1e-6)


def test_delta_coder_round_trip_and_numpy_decode():
  rng = np.random.default_rng(3)
  anchors = random_boxes(rng, 30, (80, 80), 8, 40)
  gt = random_boxes(rng, 30, (80, 80), 4, 60)
  deltas = np.asarray(box_ops.encode_deltas(gt, anchors))
  # the definition: centre offset over the anchor's size, log of the size ratio
  aw = anchors[:, 2] - anchors[:, 0]
  np.testing.assert_allclose(deltas[:, 2], np.log((gt[:, 2] - gt[:, 0]) / aw), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(box_ops.decode_deltas(deltas, anchors), gt, atol=1e-4)
  wild = rng.normal(0, 3, size=(30, 4)).astype(np.float32)
  np.testing.assert_allclose(box_ops.decode_deltas(wild, anchors), np_decode_deltas(wild, anchors), rtol=1e-5)


def test_delta_decode_clamps_exp_at_log_1000_over_16():
  anchor = np.array([[0, 0, 10, 10]], np.float32)
  huge = np.array([[0, 0, 50.0, 50.0]], np.float32)
  decoded = np.asarray(box_ops.decode_deltas(huge, anchor))
  np.testing.assert_allclose(decoded[0, 2] - decoded[0, 0], 10 * 1000 / 16, rtol=1e-5)


def test_ltrb_coder_round_trip_and_numpy_decode():
  rng = np.random.default_rng(4)
  anchors = random_boxes(rng, 30, (80, 80), 8, 40)
  distances = rng.uniform(0, 3, size=(30, 4)).astype(np.float32)
  boxes = np.asarray(box_ops.decode_ltrb(distances, anchors))
  np.testing.assert_allclose(boxes, np_decode_ltrb(distances, anchors), rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(box_ops.encode_ltrb(boxes, anchors), distances, atol=1e-5)


def test_clip_boxes_to_image():
  boxes = np.array([[-5, -3, 120, 40], [10, 60, 30, 200]], np.float32)
  clipped = np.asarray(box_ops.clip_boxes_to_image(boxes, (50, 100)))
  np.testing.assert_array_equal(clipped, [[0, 0, 100, 40], [10, 50, 30, 50]])


@pytest.mark.parametrize(
  "name, compute",
  [
    ("box_area", lambda f: box_ops.box_area(f["boxes1"])),
    ("box_iou", lambda f: box_ops.box_iou(f["boxes1"], f["boxes2"])),
    ("generalized_box_iou", lambda f: box_ops.generalized_box_iou(f["boxes1"], f["boxes2"])),
    ("generalized_box_iou_loss", lambda f: box_ops.generalized_box_iou_loss(f["boxes1"], f["boxes2"])),
    ("encode_deltas", lambda f: box_ops.encode_deltas(f["boxes1"], f["anchors"])),
    ("decode_deltas", lambda f: box_ops.decode_deltas(f["deltas"], f["anchors"])),
    ("encode_ltrb", lambda f: box_ops.encode_ltrb(f["boxes1"], f["anchors"])),
    ("decode_ltrb", lambda f: box_ops.decode_ltrb(f["distances"], f["anchors"])),
    ("clip_boxes_to_image", lambda f: box_ops.clip_boxes_to_image(f["unclipped"], (50, 70))),
  ],
)
def test_matches_torchvision(torchvision_boxes, name, compute):
  np.testing.assert_allclose(compute(torchvision_boxes), torchvision_boxes[name], rtol=1e-5, atol=1e-5)


def test_bad_box_shape_is_named():
  with pytest.raises(ValueError, match="boxes1 must be"):
    box_ops.box_iou(np.zeros((3, 5), np.float32), np.zeros((2, 4), np.float32))
  with pytest.raises(ValueError, match="same shape"):
    box_ops.generalized_box_iou_loss(np.zeros((3, 4), np.float32), np.zeros((2, 4), np.float32))
