"""Fixed-size greedy NMS against a NumPy reference and torchvision.ops.nms / batched_nms."""

import functools

import jax
import numpy as np
import pytest

from lvm_jax.tasks.detection import nms as nms_ops
from tests.tasks.detection import load_fixture, np_greedy_nms, random_boxes


@pytest.fixture(scope="module")
def torchvision_nms():
  return load_fixture("nms")


@functools.partial(jax.jit, static_argnames=("iou_threshold", "max_output"))
def jit_nms(boxes, scores, valid, iou_threshold, max_output):
  return nms_ops.nms(boxes, scores, valid, iou_threshold, max_output)


@functools.partial(jax.jit, static_argnames=("iou_threshold", "max_output"))
def jit_batched_nms(boxes, scores, classes, valid, iou_threshold, max_output):
  return nms_ops.batched_nms(boxes, scores, classes, valid, iou_threshold, max_output)


def kept(keep, count):
  keep, count = np.asarray(keep), int(count)
  assert (keep[count:] == -1).all() and (keep[:count] >= 0).all()
  return keep[:count]


def test_random_boxes_match_numpy_reference():
  rng = np.random.default_rng(0)
  boxes = random_boxes(rng, 200, (100, 100), 5, 40)
  scores = rng.uniform(size=200).astype(np.float32)
  valid = rng.uniform(size=200) < 0.8
  for threshold in (0.3, 0.5, 0.7):
    expected = np_greedy_nms(boxes, scores, threshold, valid=valid)
    assert 10 < len(expected) < valid.sum()  # suppression happens, and not of everything
    np.testing.assert_array_equal(kept(*jit_nms(boxes, scores, valid, threshold, 200)), expected)


def test_max_output_truncates_the_full_result():
  rng = np.random.default_rng(1)
  boxes = random_boxes(rng, 100, (80, 80), 5, 30)
  scores = rng.uniform(size=100).astype(np.float32)
  expected = np_greedy_nms(boxes, scores, 0.5)
  keep, count = jit_nms(boxes, scores, None, 0.5, 7)
  assert keep.shape == (7,) and int(count) == 7
  np.testing.assert_array_equal(keep, expected[:7])


def test_equal_scores_keep_lower_index_first():
  # Boxes 0..3 identical with equal scores: only the lowest index survives; box 4 (disjoint) also ties.
  boxes = np.array([[0, 0, 10, 10]] * 4 + [[50, 50, 60, 60], [1, 1, 11, 11]], np.float32)
  scores = np.array([0.5, 0.5, 0.5, 0.5, 0.5, 0.9], np.float32)
  keep = kept(*jit_nms(boxes, scores, None, 0.5, 6))
  np.testing.assert_array_equal(keep, [5, 4])  # 5 (best) suppresses 0..3 (IoU 0.68); then 4
  scores[5] = 0.1
  np.testing.assert_array_equal(kept(*jit_nms(boxes, scores, None, 0.5, 6)), [0, 4])
  rng = np.random.default_rng(2)
  boxes = random_boxes(rng, 120, (60, 60), 5, 30)
  scores = rng.choice(np.float32([0.2, 0.5, 0.8]), size=120)
  np.testing.assert_array_equal(kept(*jit_nms(boxes, scores, None, 0.4, 120)), np_greedy_nms(boxes, scores, 0.4))


def test_empty_and_all_invalid_inputs_keep_nothing():
  keep, count = nms_ops.nms(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), None, 0.5, 4)
  np.testing.assert_array_equal(keep, [-1] * 4)
  assert int(count) == 0
  boxes = random_boxes(np.random.default_rng(3), 10, (50, 50), 5, 20)
  keep, count = jit_nms(boxes, np.ones(10, np.float32), np.zeros(10, bool), 0.5, 4)
  np.testing.assert_array_equal(keep, [-1] * 4)
  assert int(count) == 0


def test_invalid_boxes_never_suppress():
  boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10]], np.float32)
  keep = kept(*jit_nms(boxes, np.array([0.9, 0.1], np.float32), np.array([False, True]), 0.5, 2))
  np.testing.assert_array_equal(keep, [1])


def test_class_wise_matches_numpy_reference():
  rng = np.random.default_rng(4)
  boxes = random_boxes(rng, 300, (100, 100), 5, 40)
  scores = rng.uniform(size=300).astype(np.float32)
  classes = rng.integers(0, 3, size=300).astype(np.int32)
  expected = np_greedy_nms(boxes, scores, 0.5, classes=classes)
  assert len(expected) > len(np_greedy_nms(boxes, scores, 0.5))  # classes do keep more boxes
  np.testing.assert_array_equal(kept(*jit_batched_nms(boxes, scores, classes, None, 0.5, 300)), expected)
  # two identical boxes of different classes both survive
  same = np.array([[0, 0, 10, 10]] * 2, np.float32)
  keep = kept(*jit_batched_nms(same, np.array([0.9, 0.8], np.float32), np.array([0, 1]), None, 0.5, 2))
  np.testing.assert_array_equal(keep, [0, 1])


@pytest.mark.parametrize("threshold", ["0.5", "0.3"])
def test_nms_matches_torchvision(torchvision_nms, threshold):
  f = torchvision_nms
  np.testing.assert_array_equal(
    kept(*jit_nms(f["boxes"], f["scores"], None, float(threshold), 600)), f[f"nms_{threshold}"]
  )


def test_batched_nms_matches_torchvision(torchvision_nms):
  f = torchvision_nms
  keep = kept(*jit_batched_nms(f["boxes"], f["scores"], f["classes"], None, 0.5, 600))
  np.testing.assert_array_equal(keep, f["batched_nms_0.5"])
  keep = kept(*jit_batched_nms(f["large_boxes"], f["large_scores"], f["large_classes"], None, 0.6, 1500))
  np.testing.assert_array_equal(keep, f["large_batched_nms_0.6"])


def test_equal_scores_match_torchvision(torchvision_nms):
  f = torchvision_nms
  np.testing.assert_array_equal(kept(*jit_nms(f["tie_boxes"], f["tie_scores"], None, 0.5, 40)), f["tie_nms_0.5"])


def test_vmaps_over_images():
  rng = np.random.default_rng(5)
  boxes = random_boxes(rng, 2 * 50, (60, 60), 5, 30).reshape(2, 50, 4)
  scores = rng.uniform(size=(2, 50)).astype(np.float32)
  keep, count = jax.jit(jax.vmap(lambda b, s: nms_ops.nms(b, s, None, 0.5, 50)))(boxes, scores)
  for i in range(2):
    np.testing.assert_array_equal(kept(keep[i], count[i]), np_greedy_nms(boxes[i], scores[i], 0.5))


def test_bad_shapes_are_named():
  with pytest.raises(ValueError, match=r"scores must be \[5\]"):
    nms_ops.nms(np.zeros((5, 4), np.float32), np.zeros((4,), np.float32), None, 0.5, 3)
  with pytest.raises(ValueError, match="max_output"):
    nms_ops.nms(np.zeros((5, 4), np.float32), np.zeros((5,), np.float32), None, 0.5, 0)
