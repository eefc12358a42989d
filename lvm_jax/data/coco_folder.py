"""A COCO-format folder as a detection source: an instances JSON and the folder of the images it names.

Categories become contiguous labels in order of their COCO id (class_names[i] is the category with the i-th
smallest id, category_ids[i] its id, kept for COCO evaluation). Crowd regions (iscrowd=1) are no training
targets; they stay in the ground truth for evaluation, where COCO ignores detections on them. Images are
ordered by id, and process i of n reads images i::n; images without annotations are kept (negatives).

Bad input never crashes a run or shifts a label: an annotation whose category is unknown, whose image id is
not in "images", whose bbox is not four finite numbers, or whose box has no area once clipped to its image is
dropped, as is an image whose file is missing (with its annotations); one warning names the JSON and counts
what was dropped, and `dropped` keeps the counts. A missing or unreadable JSON, or one that lacks "images",
"annotations" or "categories" or the fields COCO requires of them, is an error naming the file.
"""

import json
import math
import os
import posixpath
import warnings
from typing import Optional

import numpy as np

from lvm_jax.data import folders, sources
from lvm_jax.tf_host import tf

_LISTED_IN_WARNING = 5


class CocoFolderSource(sources.DetectionSource):
  """The images of a COCO instances JSON with their boxes (see the module docstring).

  annotations: the instances JSON (e.g. annotations/instances_val2017.json), local or gs://.
  images: the folder the images' file_name entries are relative to (e.g. val2017/).
  """

  def __init__(self, annotations: str, images: str):
    self.annotations_path, self.images_dir = os.fspath(annotations), os.fspath(images)
    data = _read_json(self.annotations_path)
    categories = sorted(_categories(data, self.annotations_path), key=lambda c: c["id"])
    self.category_ids = [c["id"] for c in categories]
    self.class_names = [str(c["name"]) for c in categories]
    self.dropped: dict[str, int] = {}  # why -> how many (annotations, or images for "image file missing")
    images = _images(data, self.annotations_path)
    present = _existing_files(self.images_dir, [image["file_name"] for image in images])
    missing = [image for image in images if image["file_name"] not in present]
    if missing:
      self.dropped["image file missing"] = len(missing)
    self.images = [image for image in images if image["file_name"] in present]  # sorted by id
    self._objects = self._clean_annotations(data, {image["id"] for image in missing})
    self.num_examples = len(self.images)
    if self.dropped:
      warnings.warn(_dropped_message(self.annotations_path, self.images_dir, self.dropped, missing), stacklevel=2)

  def _clean_annotations(self, data: dict, images_without_file: set) -> dict:
    """image id -> {"boxes" [n, 4] x1y1x2y2 clipped to the image, "labels", "crowd", "areas"}, in JSON order."""
    annotations = data["annotations"]
    if not isinstance(annotations, list):
      raise ValueError(f"{self.annotations_path}: 'annotations' must be a list, got {type(annotations).__name__}.")
    sizes = {image["id"]: (image["width"], image["height"]) for image in self.images}
    label_of = {cid: label for label, cid in enumerate(self.category_ids)}
    rows = {image_id: [] for image_id in sizes}
    for index, annotation in enumerate(annotations):
      if not isinstance(annotation, dict):
        raise ValueError(f"{self.annotations_path}: annotation {index} is not a JSON object.")
      why = None
      image_id, box = annotation.get("image_id"), _box(annotation.get("bbox"))
      if image_id in images_without_file:
        continue  # counted with its image
      if image_id not in sizes:
        why = "unknown image id"
      elif annotation.get("category_id") not in label_of:
        why = "unknown category id"
      elif box is None:
        why = "bbox not 4 finite numbers"
      else:
        width, height = sizes[image_id]
        box = [min(max(v, 0.0), limit) for v, limit in zip(box, (width, height, width, height))]
        if box[2] <= box[0] or box[3] <= box[1]:
          why = "no area inside the image"
      if why:
        self.dropped[why] = self.dropped.get(why, 0) + 1
        continue
      area = annotation.get("area")
      area = float(area) if _finite(area) else (box[2] - box[0]) * (box[3] - box[1])
      crowd = bool(annotation.get("iscrowd", 0))
      rows[image_id].append((box, label_of[annotation["category_id"]], crowd, area))
    return {image_id: _stack(r) for image_id, r in rows.items()}

  def shard_size(self, process_index: int = 0, process_count: int = 1) -> int:
    sources.check_shard(process_index, process_count)
    return len(range(process_index, self.num_examples, process_count))

  def references(self, process_index: int = 0, process_count: int = 1) -> tf.data.Dataset:
    """{"path", "boxes", "labels", "image_id"} of this shard's images (no crowd boxes): what training shuffles."""
    sources.check_shard(process_index, process_count)
    images = self.images[process_index::process_count]
    targets = [self._objects[image["id"]] for image in images]
    keep = [~t["crowd"] for t in targets]
    boxes = np.concatenate([t["boxes"][k] for t, k in zip(targets, keep)] + [np.zeros([0, 4], np.float32)])
    labels = np.concatenate([t["labels"][k] for t, k in zip(targets, keep)] + [np.zeros([0], np.int64)])
    counts = [int(k.sum()) for k in keep]
    refs = tf.data.Dataset.from_tensor_slices(
      {
        "path": tf.constant([tf.io.gfile.join(self.images_dir, image["file_name"]) for image in images], tf.string),
        "boxes": tf.RaggedTensor.from_row_lengths(tf.constant(boxes, tf.float32), tf.constant(counts, tf.int64)),
        "labels": tf.RaggedTensor.from_row_lengths(tf.constant(labels, tf.int64), tf.constant(counts, tf.int64)),
        "image_id": tf.constant([image["id"] for image in images], tf.int64),
      }
    )
    # Plain tensors from here on (a slice of a ragged tensor keeps a ragged spec, which batching would keep).
    return refs.map(lambda r: {**r, "boxes": tf.ensure_shape(r["boxes"], [None, 4])})

  # A reference becomes its file's bytes as "image" (other keys, such as rng, kept), as for an image folder.
  load = staticmethod(folders.FolderSource.load)

  def dataset(self, process_index: int = 0, process_count: int = 1) -> tf.data.Dataset:
    return self.references(process_index, process_count).map(
      self.load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )

  def coco_ground_truth(self) -> dict:
    annotations = []
    for image in self.images:
      t = self._objects[image["id"]]
      for box, label, crowd, area in zip(t["boxes"], t["labels"], t["crowd"], t["areas"]):
        x1, y1, x2, y2 = (float(v) for v in box)
        annotations.append(
          {
            "id": len(annotations) + 1,  # renumbered: pycocotools indexes by id, and JSON ids may repeat
            "image_id": image["id"],
            "category_id": self.category_ids[label],
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "area": float(area),
            "iscrowd": int(crowd),
          }
        )
    return {
      "images": [{k: image[k] for k in ("id", "width", "height", "file_name")} for image in self.images],
      "annotations": annotations,
      "categories": [{"id": cid, "name": name} for cid, name in zip(self.category_ids, self.class_names)],
    }


def _dropped_message(path: str, images_dir: str, dropped: dict, missing: list) -> str:
  counts = []
  for why, n in dropped.items():
    what = "image" if why == "image file missing" else "annotation"
    counts.append(f"{n} {what}{'' if n == 1 else 's'} ({why})")
  message = f"{path}: dropped {', '.join(counts)}"
  if missing:
    message += f"; missing in {images_dir}: {', '.join(image['file_name'] for image in missing[:_LISTED_IN_WARNING])}"
    message += ", ..." if len(missing) > _LISTED_IN_WARNING else ""
  return message + ". The rest is used as is."


def _read_json(path: str) -> dict:
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(f"COCO annotations file {path} does not exist (expected an instances JSON).")
  try:
    with tf.io.gfile.GFile(path, "rb") as f:
      data = json.loads(f.read())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"COCO annotations file {path} is not valid JSON: {e}") from None
  if not isinstance(data, dict):
    raise ValueError(f"COCO annotations file {path} should hold a JSON object, got {type(data).__name__}.")
  absent = [key for key in ("images", "annotations", "categories") if key not in data]
  if absent:
    raise ValueError(
      f"COCO annotations file {path} has no {', '.join(map(repr, absent))}; an instances JSON holds "
      "'images', 'annotations' and 'categories'."
    )
  return data


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _finite(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _categories(data: dict, path: str) -> list:
  categories = data["categories"]
  if not isinstance(categories, list) or not categories:
    raise ValueError(f"{path}: 'categories' must be a non-empty list of {{'id', 'name'}} objects.")
  seen = set()
  for index, category in enumerate(categories):
    if not isinstance(category, dict) or not _is_int(category.get("id")) or "name" not in category:
      raise ValueError(f"{path}: category {index} ({category!r}) needs an int 'id' and a 'name'.")
    if category["id"] in seen:
      raise ValueError(f"{path}: category id {category['id']} appears twice in 'categories'.")
    seen.add(category["id"])
  return categories


def _images(data: dict, path: str) -> list:
  """The "images" entries, checked and sorted by id."""
  images = data["images"]
  if not isinstance(images, list):
    raise ValueError(f"{path}: 'images' must be a list, got {type(images).__name__}.")
  seen = set()
  for index, image in enumerate(images):
    ok = isinstance(image, dict) and _is_int(image.get("id")) and isinstance(image.get("file_name"), str)
    ok = ok and all(_is_int(image.get(k)) and image[k] > 0 for k in ("width", "height"))
    if not ok:
      raise ValueError(
        f"{path}: image {index} ({str(image)[:200]}) needs an int 'id', a 'file_name' and positive int "
        "'width' and 'height'."
      )
    if image["id"] in seen:
      raise ValueError(f"{path}: image id {image['id']} appears twice in 'images'.")
    seen.add(image["id"])
  return sorted(images, key=lambda image: image["id"])


def _box(bbox) -> Optional[list]:
  """COCO's [x, y, width, height] as [x1, y1, x2, y2], or None when it is not 4 finite numbers."""
  if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(_finite(v) for v in bbox):
    return None
  x, y, w, h = (float(v) for v in bbox)
  return [x, y, x + w, y + h]


def _stack(rows: list) -> dict:
  """One image's annotation rows as arrays."""
  return {
    "boxes": np.array([r[0] for r in rows], np.float32).reshape(-1, 4),
    "labels": np.array([r[1] for r in rows], np.int64),
    "crowd": np.array([r[2] for r in rows], bool),
    "areas": np.array([r[3] for r in rows], np.float64),
  }


def _existing_files(root: str, relative_paths: list) -> set:
  """The paths among `relative_paths` that exist under root: one listing per folder, not one stat per file."""
  if not tf.io.gfile.isdir(root):
    raise FileNotFoundError(f"COCO images folder {root} does not exist or is not a directory.")
  listed = {}
  present = set()
  for relative in relative_paths:
    folder, name = posixpath.split(relative)
    if folder not in listed:
      path = tf.io.gfile.join(root, folder) if folder else root
      listed[folder] = set(tf.io.gfile.listdir(path)) if tf.io.gfile.isdir(path) else set()
    if name in listed[folder]:
      present.add(relative)
  return present
