"""Greedy non-maximum suppression on device, with a fixed-size output (jittable, static shapes).

Same result as torchvision.ops.nms / batched_nms truncated to `max_output`: candidates are visited by decreasing
score; each one not yet suppressed is kept and suppresses every later candidate whose IoU with it is strictly
greater than iou_threshold (class-wise: only candidates of its own class). Equal scores are visited in index order,
so the lower index is kept first (torchvision sorts stably on CPU, which gives the same order).

The loop runs once per kept box (at most max_output times), each step one [N] row of IoUs, so the cost is
O(max_output * N) with no N x N matrix; it stops early when no candidate is left.
"""

from typing import Optional

import jax
import jax.numpy as jnp

from lvm_jax.tasks.detection import boxes as box_ops


def _check_inputs(boxes, scores, classes, valid) -> None:
  if boxes.ndim != 2 or boxes.shape[-1] != 4:
    raise ValueError(f"boxes must be [N, 4], got shape {tuple(boxes.shape)}; vmap over images.")
  n = boxes.shape[0]
  for name, array in (("scores", scores), ("classes", classes), ("valid", valid)):
    if array is not None and array.shape != (n,):
      raise ValueError(f"{name} must be [{n}] to go with boxes [{n}, 4], got shape {tuple(array.shape)}.")


def _greedy_nms(boxes, scores, classes, valid, iou_threshold: float, max_output: int):
  if max_output < 1:
    raise ValueError(f"max_output must be >= 1, got {max_output}.")
  _check_inputs(boxes, scores, classes, valid)
  n = boxes.shape[0]
  empty_keep = jnp.full((max_output,), -1, jnp.int32)
  if n == 0:
    return empty_keep, jnp.int32(0)
  valid = jnp.ones((n,), bool) if valid is None else valid.astype(bool)
  # A stable sort on -score visits equal scores in index order; invalid candidates go last and are never kept.
  order = jnp.argsort(jnp.where(valid, -scores, jnp.inf), stable=True).astype(jnp.int32)
  boxes = boxes[order]
  areas = box_ops.box_area(boxes)
  sorted_classes = None if classes is None else classes[order]

  def has_room_and_candidates(state):
    count, remaining, _ = state
    return (count < max_output) & jnp.any(remaining)

  def keep_next(state):
    count, remaining, keep = state
    i = jnp.argmax(remaining)  # the first remaining candidate: the best score left
    box = boxes[i]
    inter_w = jnp.maximum(jnp.minimum(box[2], boxes[:, 2]) - jnp.maximum(box[0], boxes[:, 0]), 0)
    inter_h = jnp.maximum(jnp.minimum(box[3], boxes[:, 3]) - jnp.maximum(box[1], boxes[:, 1]), 0)
    inter = inter_w * inter_h
    suppress = inter / (areas[i] + areas - inter) > iou_threshold
    if sorted_classes is not None:
      suppress &= sorted_classes == sorted_classes[i]
    remaining = remaining & ~suppress
    remaining = remaining.at[i].set(False)
    return count + 1, remaining, keep.at[count].set(order[i])

  count, _, keep = jax.lax.while_loop(has_room_and_candidates, keep_next, (jnp.int32(0), valid[order], empty_keep))
  return keep, count


def nms(
  boxes: jax.Array,
  scores: jax.Array,
  valid: Optional[jax.Array],
  iou_threshold: float,
  max_output: int,
) -> tuple[jax.Array, jax.Array]:
  """Greedy NMS of one set of boxes.

  Args:
    boxes: [N, 4] (x1, y1, x2, y2).
    scores: [N].
    valid: bool [N], False for padding candidates (never kept, never suppress); None: all valid.
    iou_threshold: a candidate is suppressed by a kept box when their IoU is > this.
    max_output: static size of the result.

  Returns:
    (keep, count): keep int32 [max_output], the kept indices into boxes by decreasing score, padded with -1;
    count int32 scalar, how many are kept.
  """
  return _greedy_nms(boxes, scores, None, valid, iou_threshold, max_output)


def batched_nms(
  boxes: jax.Array,
  scores: jax.Array,
  classes: jax.Array,
  valid: Optional[jax.Array],
  iou_threshold: float,
  max_output: int,
) -> tuple[jax.Array, jax.Array]:
  """Class-wise greedy NMS (torchvision's batched_nms): boxes of different classes never suppress each other.

  Args and Returns as `nms`, plus classes: int [N], the class of each box. The kept indices of all classes come
  together, by decreasing score.
  """
  return _greedy_nms(boxes, scores, classes, valid, iou_threshold, max_output)
