"""Head outputs -> a fixed number of detections per image, as torchvision's RetinaNet / FCOS
postprocess_detections (before its transform maps boxes back to the original image).

Per image and level: class scores for every (anchor, class) pair, those above score_threshold, the best
topk_candidates of them, their boxes decoded and clipped to the image; then all levels together through class-wise
NMS, keeping the best detections_per_img. Static shapes throughout, so it jits over a batch: the result has K =
detections_per_img rows per image, `count` of them real (by decreasing score), the rest zeros with label -1.
"""

from typing import Callable, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from lvm_jax.tasks.detection import anchors as anchor_ops
from lvm_jax.tasks.detection import boxes as box_ops
from lvm_jax.tasks.detection import nms as nms_ops


def _level_candidates(scores, regression, anchors, decode: Callable, image_hw, score_threshold, topk_candidates):
  """One image and level: scores [N_l, C] -> the top min(topk, N_l * C) (box, score, label, valid) candidates."""
  num_classes = scores.shape[-1]
  flat = scores.reshape(-1)  # anchor-major, class-minor: index = anchor * C + class
  above = flat > score_threshold
  top_scores, top_idxs = jax.lax.top_k(jnp.where(above, flat, -jnp.inf), min(topk_candidates, flat.shape[0]))
  anchor_idxs = top_idxs // num_classes
  boxes = box_ops.clip_boxes_to_image(decode(regression[anchor_idxs], anchors[anchor_idxs]), image_hw)
  return boxes, top_scores, (top_idxs % num_classes).astype(jnp.int32), above[top_idxs]


def _detect_image(level_scores, level_regression, anchors, decode, image_hw, settings):
  score_threshold, topk_candidates, nms_threshold, detections_per_img = settings
  candidates = [
    _level_candidates(s, r, a, decode, image_hw, score_threshold, topk_candidates)
    for s, r, a in zip(level_scores, level_regression, anchors)
  ]
  boxes, scores, labels, valid = (jnp.concatenate(parts, axis=0) for parts in zip(*candidates))
  keep, count = nms_ops.batched_nms(boxes, scores, labels, valid, nms_threshold, detections_per_img)
  kept = keep >= 0
  index = jnp.maximum(keep, 0)
  return {
    "boxes": jnp.where(kept[:, None], boxes[index], 0.0),
    "scores": jnp.where(kept, scores[index], 0.0),
    "labels": jnp.where(kept, labels[index], -1),
    "count": count,
  }


def _image_sizes(image_hw, batch: int) -> jax.Array:
  """(h, w) per image, float32 [B, 2], from one static (h, w) or a [B, 2] array."""
  sizes = jnp.asarray(image_hw, jnp.float32)
  if sizes.shape == (2,):
    return jnp.broadcast_to(sizes, (batch, 2))
  if sizes.shape != (batch, 2):
    raise ValueError(f"image_hw must be (height, width) or [B={batch}, 2], got shape {tuple(sizes.shape)}.")
  return sizes


def _detect(level_scores, outputs, anchors, decode, image_hw, settings) -> dict[str, jax.Array]:
  regression = [jnp.asarray(r, jnp.float32) for r in outputs["box_regression"]]
  anchors = [jnp.asarray(a, jnp.float32) for a in anchors]
  sizes = _image_sizes(image_hw, regression[0].shape[0])
  return jax.vmap(lambda s, r, hw: _detect_image(s, r, anchors, decode, hw, settings))(level_scores, regression, sizes)


ImageSize = Union[Sequence[int], jax.Array]


def retinanet_detections(
  outputs: dict,
  anchors: Sequence[np.ndarray],
  image_hw: ImageSize,
  score_threshold: float = 0.05,
  topk_candidates: int = 1000,
  nms_threshold: float = 0.5,
  detections_per_img: int = 300,
) -> dict[str, jax.Array]:
  """torchvision's RetinaNet.postprocess_detections: scores sigmoid(cls_logits), boxes from the deltas.

  Args:
    outputs: {"cls_logits": per level [B, N_l, C], "box_regression": per level [B, N_l, 4]}.
    anchors: per level [N_l, 4] (anchors.retinanet_anchors).
    image_hw: where boxes are clipped: the canvas (height, width), or a [B, 2] array of each image's size on the
      canvas (torchvision clips to the resized image, not its padding).
    score_threshold, topk_candidates, nms_threshold, detections_per_img: torchvision's defaults.

  Returns:
    {"boxes": float32 [B, K, 4], "scores": float32 [B, K], "labels": int32 [B, K], "count": int32 [B]}, K =
    detections_per_img; rows at and past count are zeros with label -1.
  """
  for key in ("cls_logits", "box_regression"):
    anchor_ops.check_level_outputs(outputs, key, anchors)
  scores = [jax.nn.sigmoid(jnp.asarray(c, jnp.float32)) for c in outputs["cls_logits"]]
  settings = (score_threshold, topk_candidates, nms_threshold, detections_per_img)
  return _detect(scores, outputs, anchors, box_ops.decode_deltas, image_hw, settings)


def fcos_detections(
  outputs: dict,
  anchors: Sequence[np.ndarray],
  image_hw: ImageSize,
  score_threshold: float = 0.2,
  topk_candidates: int = 1000,
  nms_threshold: float = 0.6,
  detections_per_img: int = 100,
) -> dict[str, jax.Array]:
  """torchvision's FCOS.postprocess_detections: scores sqrt(sigmoid(cls_logits) * sigmoid(centerness)), boxes
  from the LTRB distances. Args and Returns as retinanet_detections, with outputs also holding "centerness" (per
  level [B, N_l, 1] logits) and anchors from anchors.fcos_anchors."""
  for key in ("cls_logits", "box_regression", "centerness"):
    anchor_ops.check_level_outputs(outputs, key, anchors)
  scores = [
    jnp.sqrt(jax.nn.sigmoid(jnp.asarray(c, jnp.float32)) * jax.nn.sigmoid(jnp.asarray(t, jnp.float32)))
    for c, t in zip(outputs["cls_logits"], outputs["centerness"])
  ]
  settings = (score_threshold, topk_candidates, nms_threshold, detections_per_img)
  return _detect(scores, outputs, anchors, box_ops.decode_ltrb, image_hw, settings)
