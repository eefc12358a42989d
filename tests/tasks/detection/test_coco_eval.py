"""COCO evaluation on small cases whose AP is known by hand.

COCO's AP interpolates precision at 101 recall points (0, 0.01, ..., 1), averaged over the IoU thresholds
0.5, 0.55, ..., 0.95 (AP) or at one of them (AP50, AP75), over the categories that have ground truth.
"""

import json

import numpy as np
import pytest

from lvm_jax.tasks.detection import coco_eval

CATEGORIES = [1, 3, 7]  # COCO ids of the contiguous classes 0, 1, 2


def split(gt_boxes, gt_labels, *, scale=1.0, orig_size=(200, 300), image_ids=None, max_boxes=4):
  """Eval-batch arrays of one image per row of gt_boxes (lists of original-pixel boxes), on a canvas scaled by
  `scale`, padded to max_boxes, plus one padded example (mask 0) whose arrays are garbage."""
  n = len(gt_boxes)
  boxes = np.zeros((n + 1, max_boxes, 4), np.float32)
  labels = np.zeros((n + 1, max_boxes), np.int32)
  box_mask = np.zeros((n + 1, max_boxes), np.int32)
  for i, (image_boxes, image_labels) in enumerate(zip(gt_boxes, gt_labels)):
    boxes[i, : len(image_boxes)] = np.asarray(image_boxes, np.float32).reshape(-1, 4) * scale
    labels[i, : len(image_labels)] = image_labels
    box_mask[i, : len(image_labels)] = 1
  boxes[n], box_mask[n] = [[5, 5, 50, 50]] * max_boxes, 1  # padding: would be missed objects if counted
  # Padding rows past a real image's boxes hold a box too: counted, it would be a missed object.
  boxes[0, -1], labels[0, -1] = [10, 10, 60, 60], 0
  return {
    "image_id": np.asarray(image_ids or range(100, 100 + n), np.int64).tolist() + [0],
    "scale": np.full(n + 1, scale, np.float32),
    "orig_size": np.tile(np.asarray(orig_size, np.int32), (n + 1, 1)),
    "mask": np.asarray([1] * n + [0], np.int32),
    "boxes": boxes,
    "labels": labels,
    "box_mask": box_mask,
  }


def found(rows, *, scale=1.0, k=5):
  """Detections of one image per entry of rows: lists of (original-pixel box, score, label), each on the canvas
  (times scale), padded to k rows with confident garbage past count, plus the padded example's garbage."""
  n = len(rows)
  boxes = np.tile(np.asarray([0, 0, 300, 200], np.float32), (n + 1, k, 1))
  scores = np.full((n + 1, k), 0.99, np.float32)
  labels = np.zeros((n + 1, k), np.int32)
  count = np.zeros(n + 1, np.int32)
  for i, dets in enumerate(rows):
    for j, (box, score, label) in enumerate(dets):
      boxes[i, j], scores[i, j], labels[i, j] = np.asarray(box, np.float32) * scale, score, label
    count[i] = len(dets)
  count[n] = k  # the padded example claims all its rows: still ignored (mask 0)
  return {"boxes": boxes, "scores": scores, "labels": labels, "count": count}


def metrics(detections, batch, **kwargs):
  batch = {**batch, "image_id": np.asarray(batch["image_id"], np.int64)}
  return coco_eval.evaluate(detections, batch, CATEGORIES, **kwargs).metrics


BOX_A, BOX_B = [10, 20, 110, 120], [150, 40, 250, 190]  # 100x100 and 100x150: "large" objects (> 96^2)


def test_perfect_detections_score_one():
  batch = split([[BOX_A, BOX_B], [BOX_B]], [[0, 2], [1]])
  result = metrics(found([[(BOX_A, 0.9, 0), (BOX_B, 0.8, 2)], [(BOX_B, 0.7, 1)]]), batch)
  assert set(result) == set(coco_eval.METRICS)
  for name in ("AP", "AP50", "AP75", "APl", "AR1", "AR10", "AR100", "ARl"):
    assert result[name] == pytest.approx(1.0), name
  assert result["APs"] == result["APm"] == -1.0  # no small or medium objects: COCO's "undefined"


def test_one_of_two_objects_found():
  # Recall reaches 0.5 at precision 1 and no further: 51 of the 101 recall points (0 ... 0.5) have precision 1.
  batch = split([[BOX_A], [BOX_B]], [[0], [0]])
  result = metrics(found([[(BOX_A, 0.9, 0)], []]), batch)
  assert result["AP"] == result["AP50"] == result["AP75"] == pytest.approx(51 / 101)
  assert result["AR100"] == pytest.approx(0.5)


def test_a_false_positive_ranked_first_halves_precision():
  # Scores: a miss (0.9) then a hit (0.8): precision at recall 1 is 1/2, interpolated over all 101 points.
  batch = split([[BOX_A]], [[0]])
  result = metrics(found([[([200, 100, 280, 190], 0.9, 0), (BOX_A, 0.8, 0)]]), batch)
  assert result["AP"] == pytest.approx(0.5)
  assert result["AR1"] == 0.0 and result["AR10"] == pytest.approx(1.0)  # AR1 keeps only the (wrong) top box


def test_right_box_with_the_wrong_class_scores_zero():
  batch = split([[BOX_A]], [[0]])
  result = metrics(found([[(BOX_A, 0.9, 1)]]), batch)
  # Class 0's object is missed; class 1 has no ground truth, so its false positive is not scored at all.
  assert result["AP"] == result["AR100"] == 0.0


@pytest.mark.parametrize(
  "width,ap50,ap75,ap",
  [
    (49, 0.0, 0.0, 0.0),  # IoU 0.49: below every threshold
    (51, 1.0, 0.0, 0.1),  # IoU 0.51: matched at 0.5 only, 1 of the 10 thresholds
    (74, 1.0, 0.0, 0.5),  # IoU 0.74: 0.5 ... 0.70, 5 thresholds
    (76, 1.0, 1.0, 0.6),  # IoU 0.76: 0.5 ... 0.75, 6 thresholds
  ],
)
def test_iou_thresholds(width, ap50, ap75, ap):
  # A 100x100 object and a detection sharing its left part: IoU = width / 100.
  truth = [0, 0, 100, 100]
  result = metrics(found([[([0, 0, width, 100], 0.9, 2)]]), split([[truth]], [[2]]))
  assert (result["AP50"], result["AP75"], result["AP"]) == pytest.approx((ap50, ap75, ap))


def test_canvas_boxes_map_back_to_original_pixels_and_are_clipped():
  # The canvas is the original scaled by 2.5. The detection overhangs the image's right edge (x2 = 330 > 300):
  # clipped to the image it is the object's box exactly; unclipped its IoU would be 100 / 130 < 0.8.
  truth = [200, 50, 300, 150]
  batch = split([[truth]], [[0]], scale=2.5, orig_size=(200, 300))
  detections = found([[([200, 50, 330, 150], 0.9, 0)]], scale=2.5)
  (record,) = coco_eval.detection_records(detections, batch, CATEGORIES)
  assert record["bbox"] == pytest.approx([200, 50, 100, 100]) and record["image_id"] == 100
  assert record["category_id"] == 1 and record["area"] == pytest.approx(10000)
  (annotation,) = coco_eval.ground_truth_dataset(batch, CATEGORIES)["annotations"][:1]
  assert annotation["bbox"] == pytest.approx([200, 50, 100, 100], abs=1e-4)
  assert metrics(detections, batch)["AP"] == pytest.approx(1.0)


def test_padding_is_ignored():
  batch = split([[BOX_A]], [[0]])
  detections = found([[(BOX_A, 0.5, 0)]])
  # The helpers fill everything past count, the padded example and past box_mask with confident garbage.
  assert len(coco_eval.detection_records(detections, batch, CATEGORIES)) == 1
  dataset = coco_eval.ground_truth_dataset(batch, CATEGORIES)
  assert len(dataset["annotations"]) == 1 and [image["id"] for image in dataset["images"]] == [100]
  assert metrics(detections, batch)["AP"] == pytest.approx(1.0)


def test_categories_without_ground_truth_are_left_out_of_the_mean():
  # Class 0 is found perfectly, class 2 half; class 1 has no object and a detection: not part of the mean.
  batch = split([[BOX_A], [BOX_B, BOX_A]], [[0], [2, 2]])
  detections = found([[(BOX_A, 0.9, 0), (BOX_B, 0.3, 1)], [(BOX_B, 0.8, 2)]])
  assert metrics(detections, batch)["AP"] == pytest.approx((1.0 + 51 / 101) / 2)


def test_no_detections_score_zero():
  batch = split([[BOX_A], [BOX_B]], [[0], [1]])
  result = coco_eval.evaluate(found([[], []]), {**batch, "image_id": np.asarray(batch["image_id"])}, CATEGORIES)
  assert result.metrics["AP"] == result.metrics["AP50"] == result.metrics["AR100"] == 0.0
  assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 0.000" in result.summary


def test_summary_is_the_pycocotools_table_and_nothing_is_printed(capsys):
  batch = split([[BOX_A]], [[0]])
  result = coco_eval.evaluate(
    found([[(BOX_A, 0.9, 0)]]), {**batch, "image_id": np.asarray(batch["image_id"])}, [1, 3, 7]
  )
  assert capsys.readouterr().out == ""
  lines = result.summary.splitlines()
  assert len(lines) == 12 and lines[0].endswith("= 1.000") and "index" not in result.summary


def coco_json(batch, extra_images=(), extra_annotations=()):
  """The instances JSON a source would ship for the batch's real examples (original pixels)."""
  dataset = coco_eval.ground_truth_dataset(batch, CATEGORIES)
  dataset["images"] += list(extra_images)
  dataset["annotations"] += list(extra_annotations)
  dataset["categories"] = [{"id": c, "name": f"class {c}"} for c in CATEGORIES]
  return json.loads(json.dumps(dataset))  # plain JSON types, as read from a file


def test_json_route_gives_the_numbers_of_the_array_route(tmp_path):
  batch = split([[BOX_A, BOX_B], [BOX_B], [[30, 30, 60, 50]]], [[0, 2], [1], [0]], scale=0.5)
  detections = found(
    [
      [(BOX_A, 0.9, 0), ([150, 40, 230, 190], 0.6, 2), ([10, 20, 100, 120], 0.5, 0)],
      [(BOX_B, 0.4, 0), ([160, 50, 250, 190], 0.3, 1)],
      [([30, 30, 55, 50], 0.8, 0)],
    ],
    scale=0.5,
  )
  from_arrays = metrics(detections, batch)
  assert 0.3 < from_arrays["AP"] < 0.95  # a case with something to get wrong
  path = tmp_path / "instances.json"
  path.write_text(json.dumps(coco_json(batch)))
  assert metrics(detections, batch, ground_truth=path) == from_arrays
  assert metrics(detections, batch, ground_truth=coco_json(batch)) == from_arrays


def test_json_route_scores_only_the_batch_images_and_honours_crowd_regions():
  batch = split([[BOX_A]], [[0]])
  # A crowd region of class 0 where the detector also fires (ranked first): COCO ignores that detection.
  crowd = {"id": 99, "image_id": 100, "category_id": 1, "bbox": [150, 40, 100, 150], "area": 9000.0, "iscrowd": 1}
  # An image of the file the split does not hold, with an object nobody looked for: not scored.
  other_image = {"id": 555, "height": 200, "width": 300}
  other_object = {"id": 98, "image_id": 555, "category_id": 1, "bbox": [0, 0, 50, 50], "area": 2500.0, "iscrowd": 0}
  dataset = coco_json(batch, [other_image], [crowd, other_object])
  detections = found([[(BOX_B, 0.95, 0), (BOX_A, 0.9, 0)]])
  assert metrics(detections, batch, ground_truth=dataset)["AP"] == pytest.approx(1.0)
  assert metrics(detections, batch)["AP"] == pytest.approx(0.5)  # without the JSON, the crowd hit is a miss


def test_bad_inputs_are_clear_errors():
  batch = split([[BOX_A], [BOX_B]], [[0], [1]])
  batch["image_id"] = np.asarray(batch["image_id"])
  detections = found([[(BOX_A, 0.9, 0)], []])
  with pytest.raises(ValueError, match=r"detection labels \[5\] are outside 0..2"):
    coco_eval.evaluate({**detections, "labels": np.full_like(detections["labels"], 5)}, batch, CATEGORIES)
  with pytest.raises(ValueError, match=r"Image ids \[100\] appear more than once"):
    coco_eval.evaluate(detections, {**batch, "image_id": np.asarray([100, 100, 0])}, CATEGORIES)
  with pytest.raises(ValueError, match="needs 'box_mask'"):
    coco_eval.evaluate(detections, {k: v for k, v in batch.items() if k != "box_mask"}, CATEGORIES)
  with pytest.raises(ValueError, match="Detections boxes .* must be"):
    coco_eval.evaluate({**detections, "scores": detections["scores"][:, :2]}, batch, CATEGORIES)
  with pytest.raises(ValueError, match=r"Image ids \[101\] of the batch are not in"):
    coco_eval.evaluate(detections, batch, CATEGORIES, ground_truth=coco_json(split([[BOX_A]], [[0]])))
  with pytest.raises(ValueError, match="one distinct COCO id per class"):
    coco_eval.evaluate(detections, batch, [1, 1, 3])
