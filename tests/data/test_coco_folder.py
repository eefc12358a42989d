"""A COCO-format folder as a detection source: labels by sorted category id, crowd regions, bad annotations dropped
with one warning, clear errors for a bad JSON, per-process shards, and the ground truth for COCO evaluation."""

import json
import warnings

import numpy as np
import pytest

from lvm_jax.data import coco_folder, sources
from lvm_jax.tf_host import tf

# Category ids out of order and not contiguous: "cat" (2) becomes label 0, "dog" (9) label 1.
CATEGORIES = [{"id": 9, "name": "dog"}, {"id": 2, "name": "cat"}]
SIZE = {"width": 40, "height": 30}


def _write_image(path, rects):
  """A black PNG with a white filled rectangle per COCO bbox [x, y, w, h] (integers)."""
  image = np.zeros((SIZE["height"], SIZE["width"], 3), np.uint8)
  for x, y, w, h in rects:
    image[y : y + h, x : x + w] = 255
  tf.io.write_file(str(path), tf.io.encode_png(image))


@pytest.fixture
def folder(tmp_path):
  """Images 1-5 (5 has no file), with good, crowd and bad annotations."""
  images_dir = tmp_path / "images"
  images_dir.mkdir()
  _write_image(images_dir / "a.png", [[2, 3, 10, 8], [20, 10, 15, 12]])
  _write_image(images_dir / "b.png", [[30, 20, 20, 20]])  # runs off the right and bottom edges
  _write_image(images_dir / "c.png", [])
  (images_dir / "sub").mkdir()
  _write_image(images_dir / "sub" / "d.png", [[0, 0, 5, 5]])
  annotations = [
    {"id": 1, "image_id": 1, "category_id": 9, "bbox": [2, 3, 10, 8], "area": 80, "iscrowd": 0},
    {"id": 2, "image_id": 1, "category_id": 2, "bbox": [20, 10, 15, 12], "area": 150.5, "iscrowd": 0},
    {"id": 3, "image_id": 2, "category_id": 2, "bbox": [30, 20, 20, 20], "iscrowd": 0},  # clipped to 10 x 10
    {"id": 4, "image_id": 4, "category_id": 9, "bbox": [0, 0, 5, 5], "iscrowd": 1},  # crowd
    {"id": 5, "image_id": 4, "category_id": 9, "bbox": [0, 0, 5, 5]},  # no iscrowd field: not crowd
    {"id": 6, "image_id": 1, "category_id": 5, "bbox": [1, 1, 4, 4]},  # unknown category
    {"id": 7, "image_id": 2, "category_id": 2, "bbox": [41, 5, 4, 4]},  # right of the image
    {"id": 8, "image_id": 2, "category_id": 9, "bbox": [5, 5, 0, 4]},  # zero width
    {"id": 9, "image_id": 2, "category_id": 9, "bbox": [5, 5, -3, 4]},  # negative width
    {"id": 10, "image_id": 77, "category_id": 9, "bbox": [5, 5, 3, 4]},  # unknown image
    {"id": 11, "image_id": 1, "category_id": 2, "bbox": [1, 2, 3]},  # malformed
    {"id": 12, "image_id": 5, "category_id": 2, "bbox": [1, 2, 3, 4]},  # its image file is missing
  ]
  images = [
    {"id": 4, "file_name": "sub/d.png", **SIZE},  # listed out of id order
    {"id": 1, "file_name": "a.png", **SIZE},
    {"id": 2, "file_name": "b.png", **SIZE},
    {"id": 3, "file_name": "c.png", **SIZE},
    {"id": 5, "file_name": "missing.png", **SIZE},
  ]
  path = tmp_path / "instances.json"
  path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
  return str(path), str(images_dir)


@pytest.fixture
def source(folder):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return sources.make_source("coco_folder", annotations=folder[0], images=folder[1])


def _examples(ds):
  return {int(ex["image_id"]): ex for ex in ds.as_numpy_iterator()}


def test_labels_are_categories_sorted_by_id(source):
  assert source.class_names == ["cat", "dog"] and source.category_ids == [2, 9] and source.num_classes == 2
  assert isinstance(source, sources.DetectionSource)


def test_examples_carry_pixel_boxes_and_contiguous_labels(source):
  examples = _examples(source.dataset())
  assert sorted(examples) == [1, 2, 3, 4] and source.num_examples == 4
  one = examples[1]
  np.testing.assert_array_equal(one["boxes"], [[2, 3, 12, 11], [20, 10, 35, 22]])
  np.testing.assert_array_equal(one["labels"], [1, 0])  # dog, cat: the unknown category 5 shifted nothing
  assert one["boxes"].dtype == np.float32 and one["labels"].dtype == np.int64
  np.testing.assert_array_equal(examples[2]["boxes"], [[30, 20, 40, 30]])  # clipped to the image
  assert examples[3]["boxes"].shape == (0, 4)  # a negative image is kept
  np.testing.assert_array_equal(examples[4]["boxes"], [[0, 0, 5, 5]])  # the crowd region is not a target


def test_boxes_bound_the_pixels_they_annotate(source):
  """COCO's [x, y, w, h] covers pixel columns x .. x + w - 1: the box (x, y, x + w, y + h) bounds them exactly."""
  for example in source.dataset().as_numpy_iterator():
    image = tf.io.decode_png(example["image"]).numpy()[..., 0] > 0
    for x1, y1, x2, y2 in example["boxes"].astype(int):
      assert image[y1:y2, x1:x2].all()
    # ... and nothing else is white: each box is tight, and the crowd-only pixels of image 4 are also its box's.
    assert image.sum() == sum(int((b[2] - b[0]) * (b[3] - b[1])) for b in example["boxes"])


def test_bad_annotations_are_dropped_with_one_warning_that_counts_them(folder):
  with pytest.warns(UserWarning) as caught:
    source = coco_folder.CocoFolderSource(annotations=folder[0], images=folder[1])
  assert len(caught) == 1
  message = str(caught[0].message)
  assert folder[0] in message and "missing.png" in message
  assert source.dropped == {
    "image file missing": 1,
    "unknown category id": 1,
    "no area inside the image": 3,
    "unknown image id": 1,
    "bbox not 4 finite numbers": 1,
  }
  for why, count in source.dropped.items():
    assert f"{count} " in message and why in message


def test_a_clean_folder_gives_no_warning(tmp_path):
  _write_image(tmp_path / "x.png", [[1, 1, 4, 4]])
  (tmp_path / "i.json").write_text(
    json.dumps(
      {
        "images": [{"id": 7, "file_name": "x.png", **SIZE}],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 2, "bbox": [1, 1, 4, 4]}],
        "categories": CATEGORIES,
      }
    )
  )
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    source = coco_folder.CocoFolderSource(annotations=str(tmp_path / "i.json"), images=str(tmp_path))
  assert source.dropped == {} and source.num_examples == 1


def test_ground_truth_keeps_crowd_regions_and_the_cleaned_boxes(source):
  gt = source.coco_ground_truth()
  assert [image["id"] for image in gt["images"]] == [1, 2, 3, 4]
  assert gt["images"][0] == {"id": 1, "width": 40, "height": 30, "file_name": "a.png"}
  assert gt["categories"] == [{"id": 2, "name": "cat"}, {"id": 9, "name": "dog"}]
  rows = [(a["image_id"], a["category_id"], a["bbox"], a["area"], a["iscrowd"]) for a in gt["annotations"]]
  assert rows == [
    (1, 9, [2, 3, 10, 8], 80.0, 0),
    (1, 2, [20, 10, 15, 12], 150.5, 0),  # the JSON's area is kept (COCO's is the segment's)
    (2, 2, [30, 20, 10, 10], 100.0, 0),  # clipped; no area given: the box's
    (4, 9, [0, 0, 5, 5], 25.0, 1),
    (4, 9, [0, 0, 5, 5], 25.0, 0),
  ]
  assert len({a["id"] for a in gt["annotations"]}) == len(rows)


def test_shards_are_disjoint_and_cover_the_split(source):
  ids = [sorted(_examples(source.dataset(i, 2))) for i in range(2)]
  assert ids == [[1, 3], [2, 4]]
  assert [source.shard_size(i, 2) for i in range(2)] == [2, 2] and source.shard_size(0, 3) == 2
  refs = next(source.references(1, 2).as_numpy_iterator())
  assert refs["path"].decode().endswith("b.png") and refs["image_id"] == 2


def _json(tmp_path, payload, name="bad.json"):
  path = tmp_path / name
  path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
  return str(path)


def test_missing_or_corrupt_json_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"annotations file .*nope\.json does not exist"):
    coco_folder.CocoFolderSource(annotations=str(tmp_path / "nope.json"), images=str(tmp_path))
  truncated = _json(tmp_path, '{"images": [{"id": 1,')
  with pytest.raises(ValueError, match=r"bad\.json is not valid JSON"):
    coco_folder.CocoFolderSource(annotations=truncated, images=str(tmp_path))
  no_categories = _json(tmp_path, {"images": [], "annotations": []})
  with pytest.raises(ValueError, match=r"bad\.json has no 'categories'"):
    coco_folder.CocoFolderSource(annotations=no_categories, images=str(tmp_path))


@pytest.mark.parametrize(
  "payload,message",
  [
    ({"images": [{"id": 1, "file_name": "a.png"}]}, r"image 0 .*positive int 'width' and 'height'"),
    ({"images": [{"id": 1, "file_name": "a.png", **SIZE}] * 2}, "image id 1 appears twice"),
    ({"categories": [{"id": "x", "name": "a"}]}, r"category 0 .*needs an int 'id'"),
    ({"categories": CATEGORIES + [{"id": 9, "name": "again"}]}, "category id 9 appears twice"),
    ({"annotations": {}}, "'annotations' must be a list"),
  ],
)
def test_malformed_entries_are_errors_naming_the_file(tmp_path, payload, message):
  data = {"images": [], "annotations": [], "categories": CATEGORIES, **payload}
  with pytest.raises(ValueError, match=rf"bad\.json: {message}"):
    coco_folder.CocoFolderSource(annotations=_json(tmp_path, data), images=str(tmp_path))


def test_missing_images_folder_is_a_clear_error(tmp_path):
  path = _json(tmp_path, {"images": [], "annotations": [], "categories": CATEGORIES})
  with pytest.raises(FileNotFoundError, match=r"images folder .*absent does not exist"):
    coco_folder.CocoFolderSource(annotations=path, images=str(tmp_path / "absent"))
