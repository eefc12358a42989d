"""Focal, RetinaNet and FCOS losses: NumPy references from the definitions and torchvision's compute_loss."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvm_jax.tasks.detection import anchors as anchor_ops
from lvm_jax.tasks.detection import losses
from tests.tasks.detection import (
  load_fixture,
  np_box_iou,
  np_decode_deltas,
  np_decode_ltrb,
  np_fcos_match,
  np_focal_loss,
  np_giou_loss,
  np_matcher,
  random_boxes,
)

NUM_CLASSES = 3


def level_outputs(fixture, keys, levels=5):
  return {key: [fixture[f"{key}_{level}"] for level in range(levels)] for key in keys}


def random_outputs(rng, anchors, keys, batch):
  widths = {"cls_logits": NUM_CLASSES, "box_regression": 4, "centerness": 1}
  outputs = {}
  for key in keys:
    if key == "box_regression" and "centerness" in keys:  # FCOS: non-negative distances (after the head's ReLU)
      outputs[key] = [rng.uniform(0.2, 3, size=(batch, len(a), 4)).astype(np.float32) for a in anchors]
    else:
      scale = 0.3 if key == "box_regression" else 1.5
      outputs[key] = [rng.normal(-1, scale, size=(batch, len(a), widths[key])).astype(np.float32) for a in anchors]
  return outputs


def random_targets(rng, counts, max_boxes, canvas):
  batch = len(counts)
  boxes = random_boxes(rng, batch * max_boxes, canvas, 10, canvas[0]).reshape(batch, max_boxes, 4)
  labels = rng.integers(0, NUM_CLASSES, size=(batch, max_boxes)).astype(np.int32)
  box_mask = (np.arange(max_boxes)[None] < np.asarray(counts)[:, None]).astype(np.float32)
  return boxes, labels, box_mask


def np_encode_deltas(gt, anchors):
  aw, ah = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
  gw, gh = gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]
  return np.stack(
    [
      (gt[:, 0] + gw / 2 - anchors[:, 0] - aw / 2) / aw,
      (gt[:, 1] + gh / 2 - anchors[:, 1] - ah / 2) / ah,
      np.log(gw / aw),
      np.log(gh / ah),
    ],
    axis=1,
  )


def np_retinanet_loss(outputs, anchors, boxes, labels, box_mask, box_loss):
  """Per image: focal over non-ignored anchors, box loss over foreground, each / max(1, foreground); then the mean."""
  anchors = np.concatenate(anchors).astype(np.float64)
  cls = np.concatenate(outputs["cls_logits"], axis=1)
  reg = np.concatenate(outputs["box_regression"], axis=1).astype(np.float64)
  classification, regression = [], []
  for i in range(len(boxes)):
    gt, gt_labels = boxes[i][box_mask[i] > 0].astype(np.float64), labels[i][box_mask[i] > 0]
    matches = np_matcher(np_box_iou(gt, anchors))
    fg = matches >= 0
    targets = np.zeros_like(cls[i])
    targets[np.flatnonzero(fg), gt_labels[matches[fg]]] = 1
    focal = np_focal_loss(cls[i], targets).sum(axis=1)
    norm = max(1, fg.sum())
    classification.append(focal[matches != -2].sum() / norm)
    if box_loss == "l1":
      per_anchor = np.abs(reg[i][fg] - np_encode_deltas(gt[matches[fg]], anchors[fg])).sum()
    else:
      per_anchor = np_giou_loss(np_decode_deltas(reg[i][fg], anchors[fg]), gt[matches[fg]]).sum()
    regression.append(per_anchor / norm)
  return {"classification": np.mean(classification), "bbox_regression": np.mean(regression)}


def np_fcos_loss(outputs, anchors, boxes, labels, box_mask):
  """Focal over everything, GIoU and centerness BCE over foreground, all / max(1, the batch's foreground)."""
  counts = [len(a) for a in anchors]
  anchors = np.concatenate(anchors).astype(np.float64)
  cls = np.concatenate(outputs["cls_logits"], axis=1)
  reg = np.concatenate(outputs["box_regression"], axis=1).astype(np.float64)
  ctr = np.concatenate(outputs["centerness"], axis=1)[..., 0].astype(np.float64)
  total = {"classification": 0.0, "bbox_regression": 0.0, "bbox_ctrness": 0.0}
  num_fg = 0
  for i in range(len(boxes)):
    gt, gt_labels = boxes[i][box_mask[i] > 0].astype(np.float64), labels[i][box_mask[i] > 0]
    matches = np_fcos_match(anchors, counts, gt)
    fg = matches >= 0
    num_fg += fg.sum()
    targets = np.zeros_like(cls[i])
    targets[np.flatnonzero(fg), gt_labels[matches[fg]]] = 1
    total["classification"] += np_focal_loss(cls[i], targets).sum()
    matched_gt = gt[matches[fg]]
    total["bbox_regression"] += np_giou_loss(np_decode_ltrb(reg[i][fg], anchors[fg]), matched_gt).sum()
    cx, cy = (anchors[fg, 0] + anchors[fg, 2]) / 2, (anchors[fg, 1] + anchors[fg, 3]) / 2
    left, right = cx - matched_gt[:, 0], matched_gt[:, 2] - cx
    top, bottom = cy - matched_gt[:, 1], matched_gt[:, 3] - cy
    centerness = np.sqrt(
      np.minimum(left, right) / np.maximum(left, right) * np.minimum(top, bottom) / np.maximum(top, bottom)
    )
    p = 1 / (1 + np.exp(-ctr[i][fg]))
    total["bbox_ctrness"] += -(centerness * np.log(p) + (1 - centerness) * np.log(1 - p)).sum()
  return {key: value / max(1, num_fg) for key, value in total.items()}


@functools.partial(jax.jit, static_argnames=("anchors_key", "box_loss"))
def jit_retinanet_loss(outputs, boxes, labels, box_mask, anchors_key, box_loss):
  return losses.retinanet_loss(outputs, ANCHORS[anchors_key], boxes, labels, box_mask, box_loss=box_loss)


@functools.partial(jax.jit, static_argnames=("anchors_key",))
def jit_fcos_loss(outputs, boxes, labels, box_mask, anchors_key):
  return losses.fcos_loss(outputs, ANCHORS[anchors_key], boxes, labels, box_mask)


# Anchors are static: the jitted wrappers above take them by name.
ANCHORS = {
  "retinanet_64x96": anchor_ops.retinanet_anchors((64, 96)),
  "fcos_128x128": anchor_ops.fcos_anchors((128, 128)),
}


def assert_losses_close(ours, expected, rtol):
  assert set(ours) == set(expected)
  for key in expected:
    np.testing.assert_allclose(float(ours[key]), float(expected[key]), rtol=rtol, err_msg=key)


def test_sigmoid_focal_loss_matches_definition_and_torchvision():
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 4, size=(50, 3)).astype(np.float32)
  targets = (rng.uniform(size=(50, 3)) < 0.3).astype(np.float32)
  np.testing.assert_allclose(
    losses.sigmoid_focal_loss(logits, targets), np_focal_loss(logits, targets), rtol=1e-5, atol=1e-7
  )
  fixture = load_fixture("boxes")
  np.testing.assert_allclose(
    losses.sigmoid_focal_loss(fixture["logits"], fixture["targets"]),
    fixture["sigmoid_focal_loss"],
    rtol=1e-5,
    atol=1e-7,
  )
  with pytest.raises(ValueError, match="alpha"):
    losses.sigmoid_focal_loss(logits, targets, alpha=2.0)


@pytest.mark.parametrize("box_loss", ["l1", "giou"])
def test_retinanet_loss_matches_numpy_definition(box_loss):
  rng = np.random.default_rng(1)
  anchors = ANCHORS["retinanet_64x96"]
  outputs = random_outputs(rng, anchors, ("cls_logits", "box_regression"), batch=3)
  boxes, labels, box_mask = random_targets(rng, [4, 2, 0], 4, (64, 96))  # the fixture's shapes: one compile
  ours = jit_retinanet_loss(outputs, boxes, labels, box_mask, "retinanet_64x96", box_loss)
  expected = np_retinanet_loss(outputs, anchors, boxes, labels, box_mask, box_loss)
  assert expected["bbox_regression"] > 0
  assert_losses_close(ours, expected, rtol=1e-5)


@pytest.mark.parametrize("version, box_loss", [("v1", "l1"), ("v2", "giou")])
def test_retinanet_loss_matches_torchvision(version, box_loss):
  f = load_fixture("retinanet_loss")
  outputs = level_outputs(f, ("cls_logits", "box_regression"))
  ours = jit_retinanet_loss(outputs, f["boxes"], f["labels"], f["box_mask"], "retinanet_64x96", box_loss)
  expected = {key: f[f"{version}_{key}"] for key in ("classification", "bbox_regression")}
  assert_losses_close(ours, expected, rtol=1e-5)


def test_fcos_loss_matches_numpy_definition():
  rng = np.random.default_rng(2)
  anchors = ANCHORS["fcos_128x128"]
  outputs = random_outputs(rng, anchors, ("cls_logits", "box_regression", "centerness"), batch=3)
  boxes, labels, box_mask = random_targets(rng, [5, 3, 0], 6, (128, 128))  # the fixture's shapes: one compile
  ours = jit_fcos_loss(outputs, boxes, labels, box_mask, "fcos_128x128")
  expected = np_fcos_loss(outputs, anchors, boxes, labels, box_mask)
  assert expected["bbox_regression"] > 0
  assert_losses_close(ours, expected, rtol=1e-5)


def test_fcos_loss_matches_torchvision():
  f = load_fixture("fcos_loss")
  outputs = level_outputs(f, ("cls_logits", "box_regression", "centerness"))
  ours = jit_fcos_loss(outputs, f["boxes"], f["labels"], f["box_mask"], "fcos_128x128")
  assert_losses_close(ours, {key: f[key] for key in ("classification", "bbox_regression", "bbox_ctrness")}, 1e-5)


@pytest.mark.parametrize("head", ["retinanet", "fcos"])
def test_padding_changes_nothing_gradients_are_finite_and_shapes_static(head):
  """Gradients are finite and reach every output; the contents of padding rows change neither losses nor
  gradients; other box counts reuse the compiled step."""
  f = load_fixture(f"{head}_loss")
  keys = ("cls_logits", "box_regression") + (("centerness",) if head == "fcos" else ())
  outputs = level_outputs(f, keys)
  anchors = ANCHORS["retinanet_64x96" if head == "retinanet" else "fcos_128x128"]
  traces = []

  def total(outs, boxes, labels, box_mask):
    traces.append(1)
    if head == "retinanet":
      parts = losses.retinanet_loss(outs, anchors, boxes, labels, box_mask, box_loss="giou")
    else:
      parts = losses.fcos_loss(outs, anchors, boxes, labels, box_mask)
    return sum(parts.values()), parts

  step = jax.jit(jax.value_and_grad(total, has_aux=True))
  (_, parts), grads = step(outputs, f["boxes"], f["labels"], f["box_mask"])
  for key, levels in grads.items():
    assert all(bool(jnp.isfinite(g).all()) for g in levels), key
    assert any(float(jnp.abs(g).max()) > 0 for g in levels), key

  # Other contents in the padding rows (same shapes: the compiled step is reused) change nothing.
  padding = f["box_mask"] == 0
  rng = np.random.default_rng(3)
  other_boxes = random_boxes(rng, f["boxes"].size // 4, (64, 64), 10, 60).reshape(f["boxes"].shape)
  other_labels = rng.integers(0, NUM_CLASSES, size=f["labels"].shape).astype(np.int32)
  (_, repadded), repadded_grads = step(
    outputs,
    np.where(padding[..., None], other_boxes, f["boxes"]),
    np.where(padding, other_labels, f["labels"]),
    f["box_mask"],
  )
  assert padding.sum() >= 5
  for key in parts:
    np.testing.assert_allclose(float(repadded[key]), float(parts[key]), rtol=1e-6, err_msg=key)
  for ours, reference in zip(jax.tree.leaves(repadded_grads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-12)

  # Other box counts, none at all included, reuse it too.
  (_, empty), _ = step(outputs, f["boxes"], f["labels"], np.zeros_like(f["box_mask"]))
  assert float(empty["bbox_regression"]) == 0 and float(empty["classification"]) > 0
  assert len(traces) == 1


def test_bad_inputs_are_named():
  f = load_fixture("retinanet_loss")
  outputs = level_outputs(f, ("cls_logits", "box_regression"))
  anchors = ANCHORS["retinanet_64x96"]
  with pytest.raises(ValueError, match="box_loss"):
    losses.retinanet_loss(outputs, anchors, f["boxes"], f["labels"], f["box_mask"], box_loss="smooth_l1")
  with pytest.raises(ValueError, match="labels must be"):
    losses.retinanet_loss(outputs, anchors, f["boxes"], f["labels"][:, :2], f["box_mask"])
  with pytest.raises(ValueError, match="lack 'centerness'"):
    losses.fcos_loss(outputs, anchors, f["boxes"], f["labels"], f["box_mask"])
