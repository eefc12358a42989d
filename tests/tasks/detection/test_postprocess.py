"""Detection postprocessing against torchvision's postprocess_detections and a NumPy reference."""

import functools

import jax
import numpy as np
import pytest

from lvm_jax.tasks.detection import anchors as anchor_ops
from lvm_jax.tasks.detection import postprocess
from tests.tasks.detection import load_fixture, np_decode_deltas, np_decode_ltrb, np_greedy_nms

RETINANET_CANVAS, FCOS_CANVAS = (96, 128), (160, 192)
ANCHORS = {"retinanet": anchor_ops.retinanet_anchors(RETINANET_CANVAS), "fcos": anchor_ops.fcos_anchors(FCOS_CANVAS)}
KEYS = {"retinanet": ("cls_logits", "box_regression"), "fcos": ("cls_logits", "box_regression", "centerness")}


@functools.partial(jax.jit, static_argnames=("head", "settings"))
def detect(outputs, image_hw, head, settings=()):
  fn = postprocess.retinanet_detections if head == "retinanet" else postprocess.fcos_detections
  return fn(outputs, ANCHORS[head], image_hw, **dict(settings))


def np_scores(outputs, head):
  sigmoid = lambda x: 1 / (1 + np.exp(-np.asarray(x, np.float64)))
  if head == "retinanet":
    return [sigmoid(c) for c in outputs["cls_logits"]]
  return [np.sqrt(sigmoid(c) * sigmoid(t)) for c, t in zip(outputs["cls_logits"], outputs["centerness"])]


def np_detections(outputs, head, image_hw, score_threshold, topk, nms_threshold, detections):
  """Per image: per level the scores above the threshold, best `topk` of them, decoded and clipped boxes; then
  class-wise greedy NMS over all levels, the best `detections` kept."""
  decode = np_decode_deltas if head == "retinanet" else np_decode_ltrb
  scores = np_scores(outputs, head)
  results = []
  for i, (h, w) in enumerate(image_hw):
    image = {"boxes": [], "scores": [], "labels": []}
    for level, level_anchors in enumerate(ANCHORS[head]):
      flat = scores[level][i].reshape(-1)
      candidates = np.flatnonzero(flat > score_threshold)
      candidates = sorted(candidates, key=lambda k: (-flat[k], k))[:topk]
      anchor_idx, labels = np.divmod(np.asarray(candidates, int), flat.size // len(level_anchors))
      boxes = decode(outputs["box_regression"][level][i][anchor_idx].astype(np.float64), level_anchors[anchor_idx])
      boxes = np.clip(boxes, 0, [w, h, w, h])
      image["boxes"].append(boxes.reshape(-1, 4))
      image["scores"].append(flat[candidates])
      image["labels"].append(labels)
    image = {key: np.concatenate(value) for key, value in image.items()}
    keep = np_greedy_nms(image["boxes"], image["scores"], nms_threshold, classes=image["labels"])[:detections]
    results.append({key: value[keep] for key, value in image.items()})
  return results


def random_outputs(rng, head, batch, classes):
  outputs = {"cls_logits": [rng.normal(-2, 1.5, size=(batch, len(a), classes)) for a in ANCHORS[head]]}
  if head == "retinanet":
    outputs["box_regression"] = [rng.normal(0, 0.3, size=(batch, len(a), 4)) for a in ANCHORS[head]]
  else:
    outputs["box_regression"] = [rng.uniform(0.1, 3, size=(batch, len(a), 4)) for a in ANCHORS[head]]
    outputs["centerness"] = [rng.normal(0, 1.5, size=(batch, len(a), 1)) for a in ANCHORS[head]]
  return jax.tree.map(lambda x: x.astype(np.float32), outputs)


def assert_padded_result(result, batch, k):
  assert result["boxes"].shape == (batch, k, 4) and result["scores"].shape == (batch, k)
  assert result["labels"].dtype == np.int32 and result["count"].shape == (batch,)
  for i, count in enumerate(np.asarray(result["count"])):
    assert (np.asarray(result["labels"][i, count:]) == -1).all()
    assert (np.asarray(result["boxes"][i, count:]) == 0).all() and (np.asarray(result["scores"][i, count:]) == 0).all()
    assert (np.diff(np.asarray(result["scores"][i, :count])) <= 0).all()  # by decreasing score


@pytest.mark.parametrize("head", ["retinanet", "fcos"])
def test_matches_torchvision(head):
  f = load_fixture(f"{head}_postprocess")
  outputs = {key: [f[f"{key}_{level}"] for level in range(5)] for key in KEYS[head]}
  result = detect(outputs, f["image_hw"], head)
  k = 300 if head == "retinanet" else 100
  assert_padded_result(result, 2, k)
  for i in range(2):
    count = int(result["count"][i])
    assert count == len(f[f"scores_{i}"]) > 20
    np.testing.assert_array_equal(result["labels"][i, :count], f[f"labels_{i}"])
    np.testing.assert_allclose(result["scores"][i, :count], f[f"scores_{i}"], rtol=1e-5)
    np.testing.assert_allclose(result["boxes"][i, :count], f[f"boxes_{i}"], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("head", ["retinanet", "fcos"])
def test_matches_numpy_reference(head):
  """On the fixture's inputs (same compiled step): topk (P3) and detections_per_img both bind, and the two images
  clip to different sizes."""
  f = load_fixture(f"{head}_postprocess")
  outputs = {key: [f[f"{key}_{level}"] for level in range(5)] for key in KEYS[head]}
  result = detect(outputs, f["image_hw"], head)
  settings = (0.05, 1000, 0.5, 300) if head == "retinanet" else (0.2, 1000, 0.6, 100)
  expected = np_detections(outputs, head, f["image_hw"], *settings)
  for i in range(2):
    count = int(result["count"][i])
    assert count == len(expected[i]["scores"]) == settings[3]
    np.testing.assert_array_equal(result["labels"][i, :count], expected[i]["labels"])
    np.testing.assert_allclose(result["scores"][i, :count], expected[i]["scores"], rtol=1e-5)
    np.testing.assert_allclose(result["boxes"][i, :count], expected[i]["boxes"], rtol=1e-5, atol=1e-4)
  level0_scores = np_scores(outputs, head)[0][0]
  assert (level0_scores > settings[0]).sum() > settings[1]  # the per-level top-k binds
  for i, (h, w) in enumerate(f["image_hw"]):  # clipped to each image's own size, which some boxes reach
    boxes = np.asarray(result["boxes"][i])
    assert boxes[:, 0::2].max() == w and boxes[:, 1::2].max() == h


def test_nothing_above_threshold_gives_no_detections():
  outputs = random_outputs(np.random.default_rng(2), "retinanet", batch=2, classes=5)
  outputs["cls_logits"] = [c - 20 for c in outputs["cls_logits"]]
  result = detect(outputs, np.array([RETINANET_CANVAS] * 2, np.int32), "retinanet")  # as the fixture: no recompile
  np.testing.assert_array_equal(result["count"], [0, 0])
  assert_padded_result(result, 2, 300)


def test_bad_inputs_are_named():
  outputs = random_outputs(np.random.default_rng(3), "fcos", batch=2, classes=3)
  with pytest.raises(ValueError, match="image_hw must be"):
    postprocess.fcos_detections(outputs, ANCHORS["fcos"], np.zeros((3, 2)))
  del outputs["centerness"]
  with pytest.raises(ValueError, match="lack 'centerness'"):
    postprocess.fcos_detections(outputs, ANCHORS["fcos"], FCOS_CANVAS)
