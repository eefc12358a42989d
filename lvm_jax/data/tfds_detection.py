"""TFDS detection datasets as detection sources: `coco` (2014, 2017) and `kitti`.

TFDS stores boxes as fractions of the image, [ymin, xmin, ymax, xmax], and labels as contiguous ClassLabels; a
source here turns them into pixels of the original image (its size read from the encoded image's header, so
images stay encoded) as (x1, y1, x2, y2). KITTI's TFDS boxes are measured from the image's bottom edge (its
builder flips them), so their y axis is flipped back. COCO's 80 labels map back to their COCO category ids
through the fixed table below (TFDS orders the labels as COCO's categories, by id); KITTI's 8 classes (its
DontCare regions are not in TFDS) get ids 1..8. Crowd regions are kept out of the boxes and in the ground truth;
boxes with no area are dropped from both.
"""

import dataclasses
from typing import Callable, Optional

from lvm_jax.data import sources
from lvm_jax.tf_host import tf

import tensorflow_datasets as tfds

# COCO 2014/2017 detection categories: (id, name), in id order (ids 12, 26, 29, 30, 45, 66, 68, 69, 71, 83 unused).
COCO_CATEGORIES = (
  (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"), (7, "train"),
  (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"), (13, "stop sign"),
  (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"), (18, "dog"), (19, "horse"), (20, "sheep"),
  (21, "cow"), (22, "elephant"), (23, "bear"), (24, "zebra"), (25, "giraffe"), (27, "backpack"),
  (28, "umbrella"), (31, "handbag"), (32, "tie"), (33, "suitcase"), (34, "frisbee"), (35, "skis"),
  (36, "snowboard"), (37, "sports ball"), (38, "kite"), (39, "baseball bat"), (40, "baseball glove"),
  (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"), (44, "bottle"), (46, "wine glass"), (47, "cup"),
  (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"), (52, "banana"), (53, "apple"), (54, "sandwich"),
  (55, "orange"), (56, "broccoli"), (57, "carrot"), (58, "hot dog"), (59, "pizza"), (60, "donut"), (61, "cake"),
  (62, "chair"), (63, "couch"), (64, "potted plant"), (65, "bed"), (67, "dining table"), (70, "toilet"),
  (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"), (76, "keyboard"), (77, "cell phone"),
  (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"), (82, "refrigerator"), (84, "book"),
  (85, "clock"), (86, "vase"), (87, "scissors"), (88, "teddy bear"), (89, "hair drier"), (90, "toothbrush"),
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Where one TFDS detection dataset keeps what a detection example needs."""

  label_key: str  # the ClassLabel inside "objects"
  crowd_key: Optional[str]  # a bool inside "objects" marking crowd regions, if any
  area_key: Optional[str]  # the objects' own area (COCO: the segment's), else the box's is used
  y_from_bottom: bool  # boxes measured from the bottom edge
  image_id: Callable[[dict], tf.Tensor]


def _id_from_file_name(example):
  """KITTI's "000123.png" -> 123."""
  digits = tf.strings.regex_replace(example["image/file_name"], r"[^0-9]", "")
  return tf.strings.to_number(digits, tf.int64)


LAYOUTS = {
  "coco": _Layout("label", "is_crowd", "area", False, lambda example: tf.cast(example["image/id"], tf.int64)),
  "kitti": _Layout("type", None, None, True, _id_from_file_name),
}


def encoded_image_size(data: tf.Tensor) -> tf.Tensor:
  """(height, width) int32 of an encoded JPEG or PNG, read from its header without decoding it."""

  def png_size():
    # PNG: the 8-byte signature, then the IHDR chunk's length and type, then width and height (big-endian).
    is_png = tf.equal(tf.strings.substr(data, 0, 8), tf.constant(b"\x89PNG\r\n\x1a\n"))
    check = tf.debugging.Assert(is_png, ["encoded image is neither JPEG nor PNG"])
    with tf.control_dependencies([check]):
      header = tf.cast(tf.io.decode_raw(tf.strings.substr(data, 16, 8), tf.uint8), tf.int32)
    width = header[0] * 2**24 + header[1] * 2**16 + header[2] * 2**8 + header[3]
    height = header[4] * 2**24 + header[5] * 2**16 + header[6] * 2**8 + header[7]
    return tf.stack([height, width])

  return tf.cond(tf.io.is_jpeg(data), lambda: tf.image.extract_jpeg_shape(data)[:2], png_size)


def _objects(example: dict, layout: _Layout) -> dict:
  """An example's objects in pixels: "boxes" x1y1x2y2, "labels", "crowd", "areas", "valid" (has area)."""
  size = tf.cast(encoded_image_size(example["image"]), tf.float32)
  objects = example["objects"]
  ymin, xmin, ymax, xmax = tf.unstack(tf.reshape(tf.cast(objects["bbox"], tf.float32), [-1, 4]), axis=1)
  if layout.y_from_bottom:
    ymin, ymax = 1.0 - ymax, 1.0 - ymin
  boxes = tf.stack([xmin * size[1], ymin * size[0], xmax * size[1], ymax * size[0]], axis=1)
  box_area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  labels = tf.cast(objects[layout.label_key], tf.int64)
  crowd = tf.cast(objects[layout.crowd_key], tf.bool) if layout.crowd_key else tf.zeros_like(labels, tf.bool)
  areas = tf.cast(objects[layout.area_key], tf.float32) if layout.area_key else box_area
  valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
  return {"boxes": boxes, "labels": labels, "crowd": crowd, "areas": areas, "valid": valid, "size": size}


class TfdsDetectionSource(sources.DetectionSource):
  """A split of TFDS `coco` (its 2014 or 2017 detection config) or `kitti`, as a detection source.

  name: "coco/2017", "coco/2014" or "kitti" (with a version if needed, "kitti:3.3.0"). split: a TFDS split
    expression ("train", "validation[:500]"). data_dir, download, manual_dir: as for sources.TfdsSource.
  """

  def __init__(
    self,
    name: str,
    split: str,
    *,
    data_dir: Optional[str] = None,
    download: bool = False,
    manual_dir: Optional[str] = None,
  ):
    base = name.split(":")[0].split("/")[0] if isinstance(name, str) else name
    if base not in LAYOUTS:
      raise ValueError(f"tfds_detection reads TFDS {' and '.join(LAYOUTS)}, not {name!r}.")
    self.name, self.split, self.layout = name, split, LAYOUTS[base]
    self.builder = sources._prepared_builder(name, data_dir, download, manual_dir)
    self.num_examples = sources._split_info(self.builder, name, split).num_examples
    features = self.builder.info.features
    if "objects" not in features:
      raise ValueError(f"TFDS {name!r} has no 'objects' feature (boxes); for COCO use a detection config: coco/2017.")
    self.class_names = list(features["objects"][self.layout.label_key].names)
    if base == "coco":
      expected = [category_name for _, category_name in COCO_CATEGORIES]
      if self.class_names != expected:
        raise ValueError(
          f"TFDS {name!r} labels {self.class_names[:5]}... are not COCO's 80 categories in id order, so they cannot "
          "be mapped to COCO category ids."
        )
      self.category_ids = [category_id for category_id, _ in COCO_CATEGORIES]
    else:
      self.category_ids = list(range(1, len(self.class_names) + 1))
    self._ground_truth = None

  def shard_size(self, process_index: int = 0, process_count: int = 1) -> int:
    shard = sources.tfds_shard_split(self.split, process_index, process_count)
    return self.builder.info.splits[shard].num_examples

  def _records(self, split: str) -> tf.data.Dataset:
    return self.builder.as_dataset(
      split=split,
      decoders={"image": tfds.decode.SkipDecoding()},
      shuffle_files=False,  # a fixed order (see sources.TfdsSource)
      read_config=tfds.ReadConfig(try_autocache=False),
    )

  def dataset(self, process_index: int = 0, process_count: int = 1) -> tf.data.Dataset:
    layout = self.layout

    def convert(example):
      objects = _objects(example, layout)
      keep = objects["valid"] & ~objects["crowd"]
      return {
        "image": example["image"],
        "boxes": tf.boolean_mask(objects["boxes"], keep),
        "labels": tf.boolean_mask(objects["labels"], keep),
        "image_id": layout.image_id(example),
      }

    if self.shard_size(process_index, process_count) == 0:  # TFDS refuses to read an empty slice
      return tf.data.Dataset.from_tensor_slices(
        {
          "image": tf.constant([], tf.string),
          "boxes": tf.zeros([0, 0, 4], tf.float32),
          "labels": tf.zeros([0, 0], tf.int64),
          "image_id": tf.constant([], tf.int64),
        }
      )
    records = self._records(sources.tfds_shard_split(self.split, process_index, process_count))
    return records.map(convert, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  def coco_ground_truth(self) -> dict:
    """The split's ground truth (read once: a pass over the split that reads image headers, not pixels)."""
    if self._ground_truth is None:
      self._ground_truth = self._read_ground_truth()
    return self._ground_truth

  def _read_ground_truth(self) -> dict:
    layout = self.layout

    def select(example):
      objects = _objects(example, layout)
      valid, size = objects.pop("valid"), objects.pop("size")
      per_object = {k: tf.boolean_mask(v, valid) for k, v in objects.items()}
      return {"image_id": layout.image_id(example), "size": size, **per_object}

    images, annotations = [], []
    for row in self._records(self.split).map(select, num_parallel_calls=tf.data.AUTOTUNE).as_numpy_iterator():
      image_id = int(row["image_id"])
      height, width = (int(v) for v in row["size"])
      images.append({"id": image_id, "width": width, "height": height})
      for (x1, y1, x2, y2), label, crowd, area in zip(
        row["boxes"].tolist(), row["labels"].tolist(), row["crowd"].tolist(), row["areas"].tolist()
      ):
        annotations.append(
          {
            "id": len(annotations) + 1,
            "image_id": image_id,
            "category_id": self.category_ids[label],
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "area": float(area),
            "iscrowd": int(crowd),
          }
        )
    categories = [{"id": cid, "name": name} for cid, name in zip(self.category_ids, self.class_names)]
    return {"images": images, "annotations": annotations, "categories": categories}
