"""Tests of lvm_jax.tasks.detection, and the plain NumPy references they share, written from the definitions
(float32 where the decision depends on rounding, as torchvision computes in float32)."""

from pathlib import Path

import numpy as np

# References made by tests/fixtures/torchvision/make_detection_ops_fixtures.py (torchvision 0.29.1).
TORCHVISION_OPS = Path(__file__).resolve().parents[2] / "fixtures" / "torchvision" / "ops"


def load_fixture(name: str) -> dict:
  with np.load(TORCHVISION_OPS / f"{name}.npz") as data:
    return dict(data)


def np_area(boxes):
  return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def np_iou_one(box, boxes):
  """IoU of one box [4] with each of boxes [N, 4] (intersection over union of the areas); 0 / 0 (two disjoint
  empty boxes) is NaN, as in torchvision, and never exceeds a threshold."""
  w = np.maximum(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0)
  h = np.maximum(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0)
  inter = w * h
  with np.errstate(invalid="ignore", divide="ignore"):
    return inter / (np_area(box) + np_area(boxes) - inter)


def np_box_iou(boxes1, boxes2):
  return np.array([np_iou_one(b, boxes2) for b in boxes1]).reshape(len(boxes1), len(boxes2))


def np_greedy_nms(boxes, scores, iou_threshold, classes=None, valid=None):
  """Greedy NMS from its definition: visit by decreasing score (ties: lower index first), keep what is not
  suppressed, suppress later boxes (of the same class) with IoU > threshold. Returns the kept indices in order."""
  n = len(boxes)
  valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
  classes = np.zeros(n, int) if classes is None else np.asarray(classes)
  order = sorted((i for i in range(n) if valid[i]), key=lambda i: (-scores[i], i))
  suppressed = np.zeros(n, bool)
  keep = []
  for i in order:
    if suppressed[i]:
      continue
    keep.append(i)
    suppressed |= (np_iou_one(boxes[i], boxes) > iou_threshold) & (classes == classes[i])
  return np.asarray(keep, np.int64)


def np_decode_deltas(deltas, anchors, clip=np.log(1000.0 / 16)):
  """RetinaNet's box from (dx, dy, dw, dh) relative to an anchor: centre shifted by d * size, size * exp(d)."""
  w, h = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
  cx, cy = anchors[:, 0] + w / 2, anchors[:, 1] + h / 2
  px, py = cx + deltas[:, 0] * w, cy + deltas[:, 1] * h
  pw, ph = w * np.exp(np.minimum(deltas[:, 2], clip)), h * np.exp(np.minimum(deltas[:, 3], clip))
  return np.stack([px - pw / 2, py - ph / 2, px + pw / 2, py + ph / 2], axis=1)


def np_decode_ltrb(distances, anchors):
  """FCOS's box from (l, t, r, b) distances, in anchor sizes, from the anchor's centre."""
  w, h = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
  cx, cy = (anchors[:, 0] + anchors[:, 2]) / 2, (anchors[:, 1] + anchors[:, 3]) / 2
  d = distances * np.stack([w, h, w, h], axis=1)
  return np.stack([cx - d[:, 0], cy - d[:, 1], cx + d[:, 2], cy + d[:, 3]], axis=1)


def np_giou_loss(boxes1, boxes2):
  """1 - GIoU of matching pairs: 1 - (IoU - (enclosing area - union) / enclosing area)."""
  w = np.maximum(np.minimum(boxes1[:, 2], boxes2[:, 2]) - np.maximum(boxes1[:, 0], boxes2[:, 0]), 0)
  h = np.maximum(np.minimum(boxes1[:, 3], boxes2[:, 3]) - np.maximum(boxes1[:, 1], boxes2[:, 1]), 0)
  inter = w * h
  union = np_area(boxes1) + np_area(boxes2) - inter
  ew = np.maximum(boxes1[:, 2], boxes2[:, 2]) - np.minimum(boxes1[:, 0], boxes2[:, 0])
  eh = np.maximum(boxes1[:, 3], boxes2[:, 3]) - np.minimum(boxes1[:, 1], boxes2[:, 1])
  enclosing = ew * eh
  return 1 - (inter / union - (enclosing - union) / enclosing)


def np_focal_loss(logits, targets, alpha=0.25, gamma=2.0):
  """-alpha_t (1 - p_t)^gamma log(p_t), p = sigmoid(logits), in float64."""
  logits = np.asarray(logits, np.float64)
  p = 1 / (1 + np.exp(-logits))
  p_t = np.where(targets > 0, p, 1 - p)
  alpha_t = np.where(targets > 0, alpha, 1 - alpha)
  return -alpha_t * (1 - p_t) ** gamma * np.log(p_t)


def random_boxes(rng, n, canvas_hw, min_size, max_size):
  """n float32 boxes with sides in [min_size, max_size), top-left corner inside the canvas."""
  h, w = canvas_hw
  size = rng.uniform(min_size, max_size, size=(n, 2))
  x1 = rng.uniform(0, w - min_size, size=n)
  y1 = rng.uniform(0, h - min_size, size=n)
  return np.stack([x1, y1, x1 + size[:, 0], y1 + size[:, 1]], axis=1).astype(np.float32)


def np_matcher(iou, high=0.5, low=0.4, allow_low_quality=True):
  """The Matcher's rules on a [real gt, anchors] IoU matrix, gt by gt."""
  if iou.shape[0] == 0:
    return np.full(iou.shape[1], -1)
  best_gt, best_iou = iou.argmax(axis=0), iou.max(axis=0)
  matches = np.where(best_iou < low, -1, np.where(best_iou < high, -2, best_gt))
  if allow_low_quality:
    for row in iou:
      for anchor in np.flatnonzero(row == row.max()):
        matches[anchor] = best_gt[anchor]
  return matches


def np_fcos_match(anchors, anchors_per_level, gt, radius=1.5):
  """FCOS's assignment point by point: candidate gts, then the smallest area (lowest index on equal areas)."""
  level = np.repeat(np.arange(len(anchors_per_level)), anchors_per_level)
  matches = np.full(len(anchors), -1)
  for n, (a, lvl) in enumerate(zip(anchors, level)):
    size = a[2] - a[0]
    x, y = (a[0] + a[2]) / 2, (a[1] + a[3]) / 2
    lower = 0 if lvl == 0 else 4 * size
    upper = np.inf if lvl == len(anchors_per_level) - 1 else 8 * size
    candidates = []
    for g, box in enumerate(gt):
      distances = np.array([x - box[0], y - box[1], box[2] - x, box[3] - y])
      centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
      near = max(abs(x - centre[0]), abs(y - centre[1])) < radius * size
      if near and distances.min() > 0 and lower < distances.max() < upper:
        candidates.append((np_area(box), g))
    if candidates:
      matches[n] = min(candidates)[1]
  return matches
