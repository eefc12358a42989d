"""Training losses of RetinaNet and FCOS, normalised exactly as torchvision's compute_loss normalises them.

Inputs are the model outputs per FPN level (the detection package's convention), the static anchors per level, and
the padded ground truth of the batch: boxes [B, M, 4], labels int [B, M] (0..C-1), box_mask [B, M] (1 for real
boxes). Matching runs here, on device; padded boxes change nothing. Every function is jittable with static shapes.
"""

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lvm_jax.tasks.detection import anchors as anchor_ops
from lvm_jax.tasks.detection import boxes as box_ops
from lvm_jax.tasks.detection import matching


def sigmoid_focal_loss(logits: jax.Array, targets: jax.Array, alpha: float = 0.25, gamma: float = 2.0) -> jax.Array:
  """Elementwise focal loss (Lin et al. 2017) of logits against 0/1 targets, torchvision's sigmoid_focal_loss
  with reduction="none": alpha_t * (1 - p_t)**gamma * BCE; alpha < 0 turns the alpha weighting off."""
  if not (0 <= alpha <= 1 or alpha == -1):
    raise ValueError(f"alpha must be in [0, 1] or -1 (no weighting), got {alpha}.")
  p = jax.nn.sigmoid(logits)
  bce = _bce_with_logits(logits, targets)
  p_t = p * targets + (1 - p) * (1 - targets)
  loss = bce * (1 - p_t) ** gamma
  if alpha >= 0:
    loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
  return loss


def _bce_with_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Elementwise binary cross-entropy of sigmoid(logits), in the overflow-free form torch uses."""
  return jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))


def _concat_levels(outputs: dict, key: str, anchors: Sequence[np.ndarray]) -> jax.Array:
  """Level outputs [B, N_l, K] -> float32 [B, N, K], checked against the anchors of each level."""
  anchor_ops.check_level_outputs(outputs, key, anchors)
  return jnp.concatenate([jnp.asarray(out, jnp.float32) for out in outputs[key]], axis=1)


def _check_targets(boxes: jax.Array, labels: jax.Array, box_mask: jax.Array, batch: int) -> None:
  if boxes.ndim != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != batch:
    raise ValueError(f"boxes must be [B={batch}, M, 4], got shape {tuple(boxes.shape)}.")
  for name, array in (("labels", labels), ("box_mask", box_mask)):
    if array.shape != boxes.shape[:2]:
      raise ValueError(f"{name} must be [B, M] = {tuple(boxes.shape[:2])}, got shape {tuple(array.shape)}.")


def _gather_gt(gt: jax.Array, matched_idxs: jax.Array) -> jax.Array:
  """gt [B, M, ...] at each anchor's matched index [B, N] (negative codes read row 0; callers mask them)."""
  return jax.vmap(lambda g, i: g[jnp.maximum(i, 0)])(gt, matched_idxs)


def _one_hot_foreground(labels, matched_idxs, foreground, num_classes: int) -> jax.Array:
  """Classification targets [B, N, C]: 1 at the matched gt's label of foreground anchors, 0 elsewhere."""
  matched_labels = _gather_gt(labels.astype(jnp.int32), matched_idxs)
  return jax.nn.one_hot(matched_labels, num_classes, dtype=jnp.float32) * foreground[..., None]


def retinanet_loss(
  outputs: dict,
  anchors: Sequence[np.ndarray],
  boxes: jax.Array,
  labels: jax.Array,
  box_mask: jax.Array,
  box_loss: str = "l1",
  fg_iou_threshold: float = 0.5,
  bg_iou_threshold: float = 0.4,
) -> dict[str, jax.Array]:
  """RetinaNet's losses as torchvision's RetinaNet.compute_loss (v1: box_loss="l1"; v2: box_loss="giou").

  Anchors are matched by IoU (matching.match_by_iou, low-quality matches kept). Per image, classification is the
  focal loss summed over all anchors but the ignored ones (IoU between the thresholds) and all classes, over
  max(1, that image's foreground anchors); box regression sums over foreground anchors either the L1 distance of
  the predicted deltas to the encoded gt ("l1") or the GIoU loss of the decoded boxes ("giou"), over the same
  max(1, foreground). Both are then averaged over the images.

  Args:
    outputs: {"cls_logits": per level [B, N_l, C], "box_regression": per level [B, N_l, 4]} (RetinaNet deltas).
    anchors: per level [N_l, 4] (anchors.retinanet_anchors).
    boxes, labels, box_mask: the padded ground truth, [B, M, 4], [B, M], [B, M].
    box_loss: "l1" or "giou".

  Returns:
    {"classification": scalar, "bbox_regression": scalar} (torchvision's names).
  """
  if box_loss not in ("l1", "giou"):
    raise ValueError(f"box_loss must be 'l1' (RetinaNet v1) or 'giou' (v2), got {box_loss!r}.")
  cls_logits = _concat_levels(outputs, "cls_logits", anchors)
  regression = _concat_levels(outputs, "box_regression", anchors)
  _check_targets(boxes, labels, box_mask, cls_logits.shape[0])
  all_anchors = jnp.asarray(np.concatenate(anchors, axis=0), jnp.float32)
  boxes = boxes.astype(jnp.float32)
  matched = jax.vmap(lambda b, m: matching.match_by_iou(all_anchors, b, m, fg_iou_threshold, bg_iou_threshold))(
    boxes, box_mask
  )
  foreground = (matched >= 0).astype(jnp.float32)  # [B, N]
  per_image_normaliser = jnp.maximum(1.0, foreground.sum(axis=1))  # [B]

  targets = _one_hot_foreground(labels, matched, foreground, cls_logits.shape[-1])
  not_ignored = (matched != matching.BETWEEN_THRESHOLDS).astype(jnp.float32)
  focal = sigmoid_focal_loss(cls_logits, targets).sum(axis=2) * not_ignored
  classification = jnp.mean(focal.sum(axis=1) / per_image_normaliser)

  # Background anchors get their own anchor as gt, so their (masked) targets stay finite and their gradients 0.
  matched_boxes = jnp.where(foreground[..., None] > 0, _gather_gt(boxes, matched), all_anchors)
  if box_loss == "l1":
    per_anchor = jnp.abs(regression - box_ops.encode_deltas(matched_boxes, all_anchors)).sum(axis=2)
  else:
    per_anchor = box_ops.generalized_box_iou_loss(box_ops.decode_deltas(regression, all_anchors), matched_boxes)
  regression_loss = jnp.mean((per_anchor * foreground).sum(axis=1) / per_image_normaliser)
  return {"classification": classification, "bbox_regression": regression_loss}


def _centerness_target(ltrb: jax.Array) -> jax.Array:
  """FCOS's centerness sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)) of [..., 4] distances."""
  left_right = ltrb[..., 0::2]
  top_bottom = ltrb[..., 1::2]
  return jnp.sqrt(
    (left_right.min(axis=-1) / left_right.max(axis=-1)) * (top_bottom.min(axis=-1) / top_bottom.max(axis=-1))
  )


def fcos_loss(
  outputs: dict,
  anchors: Sequence[np.ndarray],
  boxes: jax.Array,
  labels: jax.Array,
  box_mask: jax.Array,
  center_sampling_radius: float = 1.5,
) -> dict[str, jax.Array]:
  """FCOS's losses as torchvision's FCOS.compute_loss, each over max(1, the batch's foreground anchors).

  Points are matched by matching.match_fcos. Classification: the focal loss summed over every anchor and class.
  Box regression: GIoU loss of the decoded boxes (FCOS's LTRB coder) of foreground anchors. Centerness: binary
  cross-entropy of the centerness logits against the gt centerness of foreground anchors.

  Args:
    outputs: {"cls_logits": per level [B, N_l, C], "box_regression": per level [B, N_l, 4] (the head's
      non-negative LTRB output, after its ReLU), "centerness": per level [B, N_l, 1] (logits)}.
    anchors: per level [N_l, 4] (anchors.fcos_anchors).
    boxes, labels, box_mask: the padded ground truth, [B, M, 4], [B, M], [B, M].
    center_sampling_radius: for matching, in anchor sizes.

  Returns:
    {"classification", "bbox_regression", "bbox_ctrness"}: scalars (torchvision's names).
  """
  cls_logits = _concat_levels(outputs, "cls_logits", anchors)
  regression = _concat_levels(outputs, "box_regression", anchors)
  centerness = _concat_levels(outputs, "centerness", anchors)[..., 0]
  _check_targets(boxes, labels, box_mask, cls_logits.shape[0])
  all_anchors = jnp.asarray(np.concatenate(anchors, axis=0), jnp.float32)
  anchors_per_level = [a.shape[0] for a in anchors]
  boxes = boxes.astype(jnp.float32)
  matched = jax.vmap(lambda b, m: matching.match_fcos(all_anchors, anchors_per_level, b, m, center_sampling_radius))(
    boxes, box_mask
  )
  foreground = (matched >= 0).astype(jnp.float32)  # [B, N]
  normaliser = jnp.maximum(1.0, foreground.sum())

  targets = _one_hot_foreground(labels, matched, foreground, cls_logits.shape[-1])
  classification = sigmoid_focal_loss(cls_logits, targets).sum() / normaliser

  # Background anchors get their own anchor as gt, so their (masked) targets stay finite and their gradients 0.
  matched_boxes = jnp.where(foreground[..., None] > 0, _gather_gt(boxes, matched), all_anchors)
  giou = box_ops.generalized_box_iou_loss(box_ops.decode_ltrb(regression, all_anchors), matched_boxes)
  bbox_regression = (giou * foreground).sum() / normaliser

  # A foreground point lies strictly inside its box, so its four distances are positive and the target finite.
  centerness_target = jnp.where(
    foreground > 0, _centerness_target(box_ops.encode_ltrb(matched_boxes, all_anchors)), 0.0
  )
  bbox_ctrness = (_bce_with_logits(centerness, centerness_target) * foreground).sum() / normaliser
  return {"classification": classification, "bbox_regression": bbox_regression, "bbox_ctrness": bbox_ctrness}
