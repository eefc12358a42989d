"""TFDS coco/2017 and kitti as detection sources, on the real TFDS builders prepared from data the tests write.

TFDS 4.9.10's wheel ships no dummy data for either builder (its fake_examples stay in its repository), so:
  - coco/2017 is prepared by TFDS's own builder code from a tiny COCO tree written here (its instances JSONs with
    COCO's 80 categories, and JPEGs); only the download is replaced, by the local folders;
  - kitti's builder decodes its archives with OpenCV, which is not installed, so its two generator methods are
    replaced by one yielding records as the real ones do, boxes made by the builder's own _build_bounding_box
    (which measures y from the bottom edge). TFDS then encodes, writes and reads them with kitti's real features.
"""

import json
from unittest import mock

import numpy as np
import pytest

import tensorflow_datasets as tfds
from tensorflow_datasets.datasets.kitti import kitti_dataset_builder

from lvm_jax.data import digits, sources, tfds_detection
from lvm_jax.tf_host import tf

# Per image of coco/2017 "validation": (image id, height, width, [(category id, [x, y, w, h], iscrowd)]).
COCO_VAL = [
  (139, 30, 40, [(1, [2, 3, 10, 8], 0), (90, [20, 10, 15, 12], 0), (3, [0, 0, 40, 30], 1)]),
  (285, 50, 20, [(88, [5, 6, 7, 8], 0), (2, [3, 3, 0, 5], 0)]),  # the second has no width
  (632, 24, 24, []),
]


def _write_jpeg(path, height, width, rects=()):
  image = np.zeros((height, width, 3), np.uint8)
  for x, y, w, h in rects:
    image[y : y + h, x : x + w] = 255
  tf.io.write_file(str(path), tf.io.encode_jpeg(image, quality=100))


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("coco_raw")
  categories = [{"id": cid, "name": name, "supercategory": "x"} for cid, name in tfds_detection.COCO_CATEGORIES]
  (root / "annotations" / "annotations").mkdir(parents=True)
  for split, rows in [("train2017", COCO_VAL[:1]), ("val2017", COCO_VAL), ("test2017", COCO_VAL[2:])]:
    (root / "images" / split).mkdir(parents=True)
    images, annotations = [], []
    for image_id, height, width, objects in rows:
      _write_jpeg(root / "images" / split / f"{image_id:012d}.jpg", height, width, [o[1] for o in objects if not o[2]])
      images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "height": height, "width": width})
      for category_id, bbox, crowd in objects:
        area = bbox[2] * bbox[3] + 0.5  # COCO's area is the segment's, not the box's: keep it apart
        annotations.append(
          {
            "id": len(annotations) + 1,
            "image_id": image_id,
            "category_id": category_id,
            "bbox": bbox,
            "area": area,
            "iscrowd": crowd,
          }
        )
    kind = "image_info" if split == "test2017" else "instances"
    payload = {"images": images, "categories": categories}
    if kind == "instances":
      payload["annotations"] = annotations
    (root / "annotations" / "annotations" / f"{kind}_{split}.json").write_text(json.dumps(payload))

  def local(self, urls):
    return {key: str(root / ("images" if key.endswith("_images") else "annotations")) for key in urls}

  data_dir = tmp_path_factory.mktemp("tfds_coco")
  with mock.patch.object(tfds.download.DownloadManager, "download_and_extract", local), digits._quiet_tfds():
    tfds.builder("coco/2017", data_dir=str(data_dir)).download_and_prepare()
  return str(data_dir)


# kitti records: (file name, height, width, [(type, (left, top, right, bottom) in pixels)]).
KITTI_TRAIN = [
  ("000007.png", 20, 30, [("Car", (3, 2, 9, 12)), ("Cyclist", (10, 0, 30, 20))]),
  ("000012.png", 16, 40, [("Pedestrian", (0, 4, 5, 16))]),
  ("000031.png", 18, 18, []),
]


@pytest.fixture(scope="module")
def kitti_dir(tmp_path_factory):
  def split_generators(self, dl_manager):
    return [tfds.core.SplitGenerator(name=name, gen_kwargs={"split": name}) for name in ("train", "validation")]

  def generate_examples(self, split):
    rows = KITTI_TRAIN if split == "train" else KITTI_TRAIN[:1]
    for file_name, height, width, objects in rows:
      image = np.zeros((height, width, 3), np.uint8)
      records = []
      for kind, (left, top, right, bottom) in objects:
        raw = kitti_dataset_builder.RawBoundingBox(top=top, bottom=bottom, left=left, right=right)
        bbox = kitti_dataset_builder._build_bounding_box(raw, height, width)
        records.append(
          {
            "type": kind,
            "truncated": 0.0,
            "occluded": 0,
            "alpha": 0.0,
            "bbox": bbox,
            "dimensions": [1.0, 1.0, 1.0],
            "location": [0.0, 0.0, 0.0],
            "rotation_y": 0.0,
          }
        )
      yield file_name, {"image": image, "image/file_name": file_name, "objects": records}

  data_dir = tmp_path_factory.mktemp("tfds_kitti")
  builder = tfds.builder("kitti", data_dir=str(data_dir))
  cls = type(builder)
  with (
    mock.patch.object(cls, "_split_generators", split_generators),
    mock.patch.object(cls, "_generate_examples", generate_examples),
    digits._quiet_tfds(),
  ):
    builder.download_and_prepare()
  return str(data_dir)


def _by_id(source, *shard):
  return {int(ex["image_id"]): ex for ex in source.dataset(*shard).as_numpy_iterator()}


def test_coco_boxes_in_pixels_labels_and_category_ids(coco_dir):
  source = sources.make_source("tfds_detection", name="coco/2017", split="validation", data_dir=coco_dir)
  assert isinstance(source, sources.DetectionSource)
  assert source.num_examples == 3 and source.num_classes == 80
  assert source.class_names[0] == "person" and source.class_names[-1] == "toothbrush"
  assert source.category_ids[:12] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13] and source.category_ids[-1] == 90
  examples = _by_id(source)
  assert sorted(examples) == [139, 285, 632]
  first = examples[139]
  # No crowd region; a box in pixels (x1, y1, x2, y2); label i is the i-th category by id.
  np.testing.assert_allclose(first["boxes"], [[2, 3, 12, 11], [20, 10, 35, 22]], atol=1e-4)
  assert [source.category_ids[label] for label in first["labels"]] == [1, 90]
  assert first["labels"].dtype == np.int64 and first["boxes"].dtype == np.float32
  # The box with no width is dropped; the image keeps its other box.
  np.testing.assert_allclose(examples[285]["boxes"], [[5, 6, 12, 14]], atol=1e-4)
  assert source.class_names[examples[285]["labels"][0]] == "teddy bear"
  assert examples[632]["boxes"].shape == (0, 4)
  image = tf.io.decode_jpeg(first["image"]).numpy()  # still encoded: the source never decodes
  assert image.shape == (30, 40, 3) and image[3:11, 2:12].min() > 200


def test_coco_ground_truth_keeps_crowd_and_coco_areas(coco_dir):
  source = tfds_detection.TfdsDetectionSource("coco/2017", "validation", data_dir=coco_dir)
  gt = source.coco_ground_truth()
  assert sorted((image["id"], image["height"], image["width"]) for image in gt["images"]) == [
    (139, 30, 40),
    (285, 50, 20),
    (632, 24, 24),
  ]
  rows = sorted(
    (a["image_id"], a["category_id"], tuple(np.round(a["bbox"], 3)), a["area"], a["iscrowd"]) for a in gt["annotations"]
  )
  # TFDS stores COCO's area as an int64 (80.5 -> 80).
  assert rows == [
    (139, 1, (2, 3, 10, 8), 80.0, 0),
    (139, 3, (0, 0, 40, 30), 1200.0, 1),
    (139, 90, (20, 10, 15, 12), 180.0, 0),
    (285, 88, (5, 6, 7, 8), 56.0, 0),
  ]
  assert gt["categories"][79] == {"id": 90, "name": "toothbrush"}
  assert source.coco_ground_truth() is gt  # read once


def test_coco_shards_split_the_examples(coco_dir):
  source = tfds_detection.TfdsDetectionSource("coco/2017", "validation", data_dir=coco_dir)
  shards = [sorted(_by_id(source, i, 2)) for i in range(2)]
  assert sorted(shards[0] + shards[1]) == [139, 285, 632] and not set(shards[0]) & set(shards[1])
  assert [source.shard_size(i, 2) for i in range(2)] == [len(s) for s in shards]
  assert _by_id(source, 3, 4) == {} and source.shard_size(3, 4) == 0  # an empty shard reads as empty


def test_kitti_boxes_measured_from_the_top_and_ids_from_file_names(kitti_dir):
  source = sources.make_source("tfds_detection", name="kitti", split="train", data_dir=kitti_dir)
  assert source.class_names == ["Car", "Van", "Truck", "Pedestrian", "Person_sitting", "Cyclist", "Tram", "Misc"]
  assert source.category_ids == list(range(1, 9))
  examples = _by_id(source)
  assert sorted(examples) == [7, 12, 31]
  np.testing.assert_allclose(examples[7]["boxes"], [[3, 2, 9, 12], [10, 0, 30, 20]], atol=1e-4)
  assert [source.class_names[i] for i in examples[7]["labels"]] == ["Car", "Cyclist"]
  np.testing.assert_allclose(examples[12]["boxes"], [[0, 4, 5, 16]], atol=1e-4)
  assert examples[31]["boxes"].shape == (0, 4)
  assert examples[12]["image"][:4] == b"\x89PNG"  # kitti stores PNGs: sizes come from their header
  gt = source.coco_ground_truth()
  assert sorted((i["id"], i["height"], i["width"]) for i in gt["images"]) == [(7, 20, 30), (12, 16, 40), (31, 18, 18)]
  boxes = sorted((a["image_id"], a["category_id"], tuple(np.round(a["bbox"], 3)), a["area"]) for a in gt["annotations"])
  assert boxes == [(7, 1, (3, 2, 6, 10), 60.0), (7, 6, (10, 0, 20, 20), 400.0), (12, 4, (0, 4, 5, 12), 60.0)]


def test_encoded_image_size_reads_jpeg_and_png_headers():
  image = np.zeros((37, 301, 3), np.uint8)
  for data in (tf.io.encode_png(image), tf.io.encode_jpeg(image)):
    assert tfds_detection.encoded_image_size(data).numpy().tolist() == [37, 301]
  with pytest.raises(tf.errors.InvalidArgumentError, match="neither JPEG nor PNG"):
    tfds_detection.encoded_image_size(tf.constant(b"GIF89a" + bytes(40)))


def test_other_datasets_are_refused_by_name():
  with pytest.raises(ValueError, match=r"tfds_detection reads TFDS coco and kitti, not 'voc/2007'"):
    tfds_detection.TfdsDetectionSource("voc/2007", "train")
