"""COCO box evaluation (AP, AP50, AP75, APs/m/l, AR@1/10/100) of a split's detections with pycocotools.

The detector works on a canvas (each image resized by `scale` and padded); COCO scores boxes in the original image.
Detections are mapped back (divided by the example's scale, clipped to its original size) and their contiguous
labels turned into COCO category ids. The ground truth is either the split's COCO instances JSON, read exactly as
written (iscrowd regions, segmentation areas), or rebuilt from the boxes the eval batches carry (iscrowd 0, box
areas): give the JSON where there is one, as COCO's published numbers use it.

Arrays are host numpy arrays holding every example of the split: the eval batches concatenated along the first
axis and, with several processes, gathered from all of them (process_allgather) before the call, which then runs
on one host. Padded examples (batch "mask" 0) and detection rows past "count" are dropped, so the padding the eval
loop adds to fill its last batch on every process never counts.
"""

import contextlib
import io
import json
import os
from typing import Any, Mapping, NamedTuple, Optional, Sequence, Union

import numpy as np
from pycocotools import coco, cocoeval

# COCOeval.stats, in its order.
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
GroundTruth = Union[None, str, os.PathLike, Mapping[str, Any]]


class CocoEvaluation(NamedTuple):
  """metrics: {name in METRICS: value}; COCO's -1 where a metric has no ground truth to score (e.g. APs on a split
  without small objects). summary: the table pycocotools prints, for the log."""

  metrics: dict[str, float]
  summary: str


def evaluate(
  detections: Mapping[str, np.ndarray],
  batch: Mapping[str, np.ndarray],
  category_ids: Sequence[int],
  ground_truth: GroundTruth = None,
) -> CocoEvaluation:
  """COCO box metrics of a split's detections.

  Args:
    detections: the postprocess's {"boxes": [N, K, 4] x1, y1, x2, y2 canvas pixels, "scores": [N, K],
      "labels": [N, K] contiguous class ids, "count": [N] valid rows (the rest is padding)}.
    batch: the eval batches' {"image_id": [N], "scale": [N] canvas pixels per original pixel, "orig_size": [N, 2]
      original (height, width), "mask": [N] 1 real example, 0 padding}, plus "boxes" [N, M, 4] canvas pixels,
      "labels" [N, M] and "box_mask" [N, M] when the ground truth comes from the batches.
    category_ids: the COCO category id of each contiguous class, category_ids[label].
    ground_truth: a COCO instances JSON (a path, or the loaded dict) holding the split's images; None rebuilds the
      ground truth from the batch's boxes. With a JSON, only the images in the batch are scored (a split may be a
      subset of the file), over the categories in category_ids.

  Returns:
    CocoEvaluation(metrics, summary). No detections at all score 0 (not an error).

  Raises:
    ValueError: arrays missing or of mismatched shapes, labels outside category_ids, an image id twice among the
      real examples, or images and categories the JSON does not hold.
  """
  category_ids = _check_categories(category_ids)
  real = _real_examples(batch, detections)
  if ground_truth is None:
    dataset = ground_truth_dataset(batch, category_ids)
  else:
    dataset = _load_json(ground_truth)
    _check_json_covers(dataset, batch["image_id"][real], category_ids)
  records = detection_records(detections, batch, category_ids)
  with contextlib.redirect_stdout(io.StringIO()) as printed:
    truth = _coco(dataset)
    found = _coco({"images": dataset.get("images", []), "categories": dataset["categories"], "annotations": records})
    evaluation = cocoeval.COCOeval(truth, found, iouType="bbox")
    evaluation.params.imgIds = sorted(int(i) for i in batch["image_id"][real])
    evaluation.params.catIds = sorted(category_ids)
    evaluation.evaluate()
    evaluation.accumulate()
    printed.truncate(0)  # keep only the table summarize() prints
    printed.seek(0)
    evaluation.summarize()
  metrics = {name: float(value) for name, value in zip(METRICS, evaluation.stats)}
  return CocoEvaluation(metrics, printed.getvalue().rstrip())


def ground_truth_dataset(batch: Mapping[str, np.ndarray], category_ids: Sequence[int]) -> dict:
  """A COCO instances dataset (images, annotations, categories) from the boxes the eval batches carry.

  Boxes are mapped from canvas to original pixels (divided by the example's scale); each annotation gets iscrowd 0
  and its box's area, as COCO has no segmentation here. Padded examples and boxes (box_mask 0) are dropped.
  """
  category_ids = _check_categories(category_ids)
  real = _real_examples(batch)
  boxes, labels, box_mask = _arrays(batch, "boxes", "labels", "box_mask")
  n = len(batch["image_id"])
  if boxes.ndim != 3 or boxes.shape[::2] != (n, 4) or not labels.shape == box_mask.shape == boxes.shape[:2]:
    raise ValueError(
      f"Ground-truth boxes {boxes.shape}, labels {labels.shape} and box_mask {box_mask.shape} must be "
      f"[N, M, 4], [N, M], [N, M] for the batch's N={n} examples."
    )
  images, annotations = [], []
  for i in np.flatnonzero(real):
    image_id, (height, width) = int(batch["image_id"][i]), batch["orig_size"][i]
    images.append({"id": image_id, "height": int(height), "width": int(width)})
    valid = box_mask[i] > 0
    ids = _category_ids(labels[i][valid], category_ids, "ground-truth labels")
    for box, category in zip(boxes[i][valid] / float(batch["scale"][i]), ids):
      x, y, w, h = _xywh(box)
      annotations.append(
        {
          "id": len(annotations) + 1,  # COCOeval marks matches by id, 0 meaning unmatched: ids start at 1
          "image_id": image_id,
          "category_id": category,
          "bbox": [x, y, w, h],
          "area": w * h,
          "iscrowd": 0,
        }
      )
  return {"images": images, "annotations": annotations, "categories": [{"id": c} for c in category_ids]}


def detection_records(
  detections: Mapping[str, np.ndarray], batch: Mapping[str, np.ndarray], category_ids: Sequence[int]
) -> list[dict]:
  """COCO result records ({"image_id", "category_id", "bbox": [x, y, w, h] original pixels, "score"}, plus the
  "id", "area" and "iscrowd" that COCOeval reads) of the real examples' valid detections: canvas boxes divided by
  the example's scale and clipped to its original size."""
  category_ids = _check_categories(category_ids)
  real = _real_examples(batch, detections)
  boxes, scores, labels, count = _arrays(detections, "boxes", "scores", "labels", "count")
  records = []
  for i in np.flatnonzero(real):
    k = int(count[i])
    if not 0 <= k <= boxes.shape[1]:
      raise ValueError(f"Detections count={k} of example {i} is outside 0..{boxes.shape[1]} (rows per example).")
    height, width = (float(s) for s in batch["orig_size"][i])
    original = boxes[i, :k].astype(np.float64) / float(batch["scale"][i])
    original = np.clip(original, 0.0, [width, height, width, height])
    ids = _category_ids(labels[i, :k], category_ids, "detection labels")
    for box, score, category in zip(original, scores[i, :k], ids):
      x, y, w, h = _xywh(box)
      records.append(
        {
          "id": len(records) + 1,
          "image_id": int(batch["image_id"][i]),
          "category_id": category,
          "bbox": [x, y, w, h],
          "score": float(score),
          "area": w * h,
          "iscrowd": 0,
        }
      )
  return records


def _xywh(box: np.ndarray) -> tuple[float, float, float, float]:
  x1, y1, x2, y2 = (float(v) for v in box)
  return x1, y1, x2 - x1, y2 - y1


def _arrays(tree: Mapping[str, Any], *keys: str) -> tuple[np.ndarray, ...]:
  missing = [k for k in keys if k not in tree]
  if missing:
    raise ValueError(f"COCO evaluation needs {', '.join(map(repr, missing))}; got keys {sorted(tree)}.")
  return tuple(np.asarray(tree[k]) for k in keys)


def _real_examples(batch: Mapping[str, np.ndarray], detections: Optional[Mapping[str, np.ndarray]] = None):
  """The boolean [N] of real examples (mask 1), after checking the per-example arrays line up."""
  image_id, scale, orig_size, mask = _arrays(batch, "image_id", "scale", "orig_size", "mask")
  n = len(image_id)
  if image_id.shape != (n,) or scale.shape != (n,) or orig_size.shape != (n, 2) or mask.shape != (n,):
    raise ValueError(
      f"Batch image_id {image_id.shape}, scale {scale.shape}, orig_size {orig_size.shape} and mask {mask.shape} "
      "must be [N], [N], [N, 2], [N]."
    )
  if detections is not None:
    boxes, scores, labels, count = _arrays(detections, "boxes", "scores", "labels", "count")
    k = boxes.shape[1:2]
    if boxes.shape != (n, *k, 4) or scores.shape != (n, *k) or labels.shape != (n, *k) or count.shape != (n,):
      raise ValueError(
        f"Detections boxes {boxes.shape}, scores {scores.shape}, labels {labels.shape} and count {count.shape} "
        f"must be [N, K, 4], [N, K], [N, K], [N] for the batch's N={n} examples."
      )
  real = mask > 0
  ids, counts = np.unique(image_id[real], return_counts=True)
  if (counts > 1).any():
    raise ValueError(
      f"Image ids {ids[counts > 1][:5].tolist()} appear more than once among the real examples (mask 1): each "
      "image must be evaluated once (are batches gathered twice, or padding marked real?)."
    )
  if real.any() and (scale[real] <= 0).any():
    raise ValueError(f"Batch scale must be positive for real examples, got {scale[real].min()}.")
  return real


def _check_categories(category_ids: Sequence[int]) -> list[int]:
  ids = [int(c) for c in category_ids]
  if not ids or len(set(ids)) != len(ids):
    raise ValueError(f"category_ids must be one distinct COCO id per class, got {list(category_ids)}.")
  return ids


def _category_ids(labels: np.ndarray, category_ids: list[int], what: str) -> list[int]:
  labels = labels.astype(np.int64)
  bad = labels[(labels < 0) | (labels >= len(category_ids))]
  if bad.size:
    raise ValueError(f"{what} {sorted(set(bad.tolist()))[:5]} are outside 0..{len(category_ids) - 1} (the classes).")
  return [category_ids[label] for label in labels]


def _load_json(ground_truth: GroundTruth) -> dict:
  if isinstance(ground_truth, Mapping):
    dataset = dict(ground_truth)
  else:
    with open(ground_truth) as f:
      dataset = json.load(f)
  missing = [k for k in ("images", "annotations", "categories") if k not in dataset]
  if missing:
    raise ValueError(f"COCO ground truth {str(ground_truth)[:200]!r} lacks {missing}: not an instances JSON.")
  return dataset


def _check_json_covers(dataset: dict, image_ids: np.ndarray, category_ids: list[int]) -> None:
  images = {int(image["id"]) for image in dataset["images"]}
  unknown = sorted(set(int(i) for i in image_ids) - images)
  if unknown:
    raise ValueError(f"Image ids {unknown[:5]} of the batch are not in the COCO ground-truth JSON's images.")
  categories = {int(c["id"]) for c in dataset["categories"]}
  unknown = sorted(set(category_ids) - categories)
  if unknown:
    raise ValueError(f"category_ids {unknown[:5]} are not in the COCO ground-truth JSON's categories.")


def _coco(dataset: dict) -> coco.COCO:
  """A pycocotools COCO index of an in-memory dataset (COCO() only reads files)."""
  index = coco.COCO()
  index.dataset = dataset
  index.createIndex()
  return index
