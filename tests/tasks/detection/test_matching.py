"""Anchor matching on padded ground truth: NumPy references from the definitions, and torchvision's results."""

import jax
import numpy as np
import pytest

from lvm_jax.tasks.detection import anchors as anchor_ops
from lvm_jax.tasks.detection import matching
from tests.tasks.detection import load_fixture, np_box_iou, np_fcos_match, np_matcher, random_boxes


def pad(gt, rng, extra):
  """gt plus `extra` random padding rows (random boxes, not zeros), and its box_mask."""
  padding = random_boxes(rng, extra, (100, 100), 10, 60)
  return np.concatenate([gt, padding]), np.r_[np.ones(len(gt)), np.zeros(extra)].astype(np.float32)


@pytest.fixture(scope="module")
def retinanet_anchors_100():
  return np.concatenate(anchor_ops.retinanet_anchors((100, 100)))


def test_iou_matching_matches_numpy_reference_with_padding(retinanet_anchors_100):
  rng = np.random.default_rng(0)
  anchors = retinanet_anchors_100
  gt = random_boxes(rng, 7, (100, 100), 6, 70)
  padded, mask = pad(gt, rng, 5)
  iou = np_box_iou(gt, anchors).astype(np.float32)
  for allow in (True, False):
    expected = np_matcher(iou, allow_low_quality=allow)
    ours = np.asarray(jax.jit(matching.match_by_iou, static_argnums=(3, 4, 5))(anchors, padded, mask, 0.5, 0.4, allow))
    assert ours.dtype == np.int32
    np.testing.assert_array_equal(ours, expected)
  codes = set(np.unique(expected))
  # every code occurs; gts whose best anchors prefer another gt (argmax) may end up with none, as in torchvision
  assert {-2, -1}.issubset(codes) and len(codes - {-2, -1}) >= 3


def test_low_quality_matches_keep_every_tied_anchor(retinanet_anchors_100):
  # A 20-pixel box centred half-way between the P3 locations x = 0 and x = 7: its best IoU (inside a 32-pixel
  # anchor, 400 / 1024 < 0.4) is shared by the anchors at both; low-quality matching keeps all of them.
  gt = np.array([[3.5 - 10, 11, 3.5 + 10, 31]], np.float32)
  matches = np.asarray(matching.match_by_iou(retinanet_anchors_100, gt, np.ones(1)))
  matched = np.flatnonzero(matches == 0)
  assert len(matched) >= 2
  centres_x = (retinanet_anchors_100[matched, 0] + retinanet_anchors_100[matched, 2]) / 2
  assert {0.0, 7.0}.issubset(set(centres_x))
  strict = np.asarray(matching.match_by_iou(retinanet_anchors_100, gt, np.ones(1), allow_low_quality_matches=False))
  assert (strict != 0).all()


def test_no_real_boxes_match_nothing(retinanet_anchors_100):
  rng = np.random.default_rng(1)
  gt = random_boxes(rng, 4, (100, 100), 20, 60)
  matches = np.asarray(jax.jit(matching.match_by_iou)(retinanet_anchors_100, gt, np.zeros(4)))
  np.testing.assert_array_equal(matches, -1)
  fcos = anchor_ops.fcos_anchors((100, 100))
  match_fcos = jax.jit(matching.match_fcos, static_argnums=1)
  matches = np.asarray(match_fcos(np.concatenate(fcos), tuple(len(a) for a in fcos), gt, np.zeros(4)))
  np.testing.assert_array_equal(matches, -1)


def test_iou_matching_matches_torchvision(retinanet_anchors_100):
  fixture = load_fixture("matcher")
  gt = fixture["gt_boxes"]
  np.testing.assert_array_equal(
    matching.match_by_iou(retinanet_anchors_100, gt, np.ones(len(gt))), fixture["matches_low_quality"]
  )
  np.testing.assert_array_equal(
    matching.match_by_iou(retinanet_anchors_100, gt, np.ones(len(gt)), allow_low_quality_matches=False),
    fixture["matches_strict"],
  )


def test_fcos_matching_matches_numpy_reference_with_padding():
  rng = np.random.default_rng(2)
  levels = anchor_ops.fcos_anchors((256, 256))
  anchors, counts = np.concatenate(levels), tuple(len(a) for a in levels)
  gt = random_boxes(rng, 16, (256, 256), 8, 320)
  expected = np_fcos_match(anchors, counts, gt)
  padded, mask = pad(gt, rng, 4)
  ours = np.asarray(jax.jit(matching.match_fcos, static_argnums=1)(anchors, counts, padded, mask))
  assert ours.dtype == np.int32
  np.testing.assert_array_equal(ours, expected)
  level = np.repeat(np.arange(5), counts)
  assert len(np.unique(level[expected >= 0])) >= 3  # several levels' scale ranges are exercised


def test_fcos_matching_matches_torchvision():
  fixture = load_fixture("fcos_loss")
  levels = anchor_ops.fcos_anchors((128, 128))
  anchors, counts = np.concatenate(levels), [len(a) for a in levels]
  match = jax.jit(jax.vmap(lambda b, m: matching.match_fcos(anchors, counts, b, m)))
  np.testing.assert_array_equal(match(fixture["boxes"], fixture["box_mask"]), fixture["matched_idxs"])


def test_fcos_area_ties_follow_torchvisions_float32_priority():
  # Areas 1600 and 1598 give 1e8 - area equal in float32 (spacing 8), so the lower index wins though larger.
  levels = anchor_ops.fcos_anchors((64, 64))
  anchors, counts = np.concatenate(levels), [len(a) for a in levels]
  gt = np.array([[0, 0, 40, 40], [0.05, 0, 40, 40]], np.float32)
  point = np.flatnonzero((anchors[:, 0] == 12) & (anchors[:, 1] == 12) & (anchors[:, 2] == 20))[0]  # centre (16, 16)
  assert matching.match_fcos(anchors, counts, gt, np.ones(2))[point] == 0
  gt[1, 0] = 2.0  # area 1520: clearly smaller, wins
  assert matching.match_fcos(anchors, counts, gt, np.ones(2))[point] == 1


def test_bad_inputs_are_named(retinanet_anchors_100):
  with pytest.raises(ValueError, match="box_mask shape"):
    matching.match_by_iou(retinanet_anchors_100, np.zeros((3, 4), np.float32), np.ones(2))
  with pytest.raises(ValueError, match="vmap over a batch"):
    matching.match_by_iou(retinanet_anchors_100, np.zeros((2, 3, 4), np.float32), np.ones((2, 3)))
  with pytest.raises(ValueError, match="anchors_per_level"):
    matching.match_fcos(retinanet_anchors_100, [5, 5], np.zeros((3, 4), np.float32), np.ones(3))
