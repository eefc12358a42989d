"""Sources: one split of a dataset as encoded image bytes and int64 labels, cut into per-process shards.

A source knows `num_examples` (the whole split), `class_names` (index order) and, for a process, its shard:
`dataset(process_index, process_count)` yields {"image": tf.string encoded JPEG/PNG, "label": tf.int64} in a
fixed order, and `shard_size(...)` says how many; a source of files also offers `references` and `load`, so the
training pipeline shuffles file paths rather than image bytes. Shards are disjoint and together are the whole
split. A source never shuffles, decodes or repeats: the pipeline does.

make_source(kind, **kwargs) builds one: "tfds" (any TFDS dataset, below), "folder" (image folders,
lvm_jax/data/folders.py) or "digits" (scikit-learn's 8x8 digits as a TFDS dataset prepared offline on first
use, lvm_jax/data/digits.py; the same TfdsSource reads it).

Detection sources (DetectionSource, below) yield boxes instead of one label: "coco_folder" (an instances JSON
and its images, lvm_jax/data/coco_folder.py), "digits_detection" (the built-in detection set, generated
offline on first use, lvm_jax/data/digits_detection.py) and "tfds_detection" (TFDS coco and kitti,
lvm_jax/data/tfds_detection.py).
"""

import abc
import difflib
import inspect
import json
import os
from typing import Callable, Optional

from lvm_jax.tf_host import tf  # first: a missing TensorFlow is tf_host's one-line error, not TFDS's

import tensorflow_datasets as tfds

from lvm_jax.data import digits

# Datasets lvm_jax builds itself, offline and in seconds: prepared on first use whatever `download` says.
_BUILT_IN_BUILDERS = {"digits": digits.prepared_builder}


class Source(abc.ABC):
  """One split: `num_examples`, `class_names`, and per-process shards of encoded examples."""

  num_examples: int
  class_names: list[str]

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @abc.abstractmethod
  def dataset(self, process_index: int = 0, process_count: int = 1) -> tf.data.Dataset:
    """This process's shard, {"image": tf.string, "label": tf.int64}, always in the same order."""

  @abc.abstractmethod
  def shard_size(self, process_index: int = 0, process_count: int = 1) -> int:
    """How many examples dataset(process_index, process_count) yields."""

  # A source that can read one example on its own (a file) lets the training pipeline shuffle light records
  # instead of encoded images: `references` yields them in dataset()'s order and `load` (a tf function of one
  # record) turns each into dataset()'s example. None: the pipeline shuffles dataset()'s examples themselves.
  load: Optional[Callable[[dict], dict]] = None

  def references(self, process_index: int = 0, process_count: int = 1) -> tf.data.Dataset:
    """What the training pipeline shuffles: records that `load` makes into dataset()'s examples, same order."""
    return self.dataset(process_index, process_count)

  def save_class_names(self, path: str) -> None:
    """Writes class_names as a JSON list (index i is the name of label i), for runs and predict to keep."""
    write_class_names(self.class_names, path)


class DetectionSource(Source):
  """One split of a detection dataset: every example is an image with its objects' boxes.

  dataset() yields {"image": tf.string encoded bytes, "boxes": float32 [n, 4] (x1, y1, x2, y2) in the original
  image's pixels, "labels": int64 [n] in 0..num_classes-1, "image_id": int64}; n may be 0 (an image without
  objects). Crowd regions are not among the boxes (they are no training targets) but stay in the ground truth.
  `category_ids[i]` is the COCO category id of class i, what COCO evaluation reports detections of class i as.
  """

  category_ids: list[int]

  @abc.abstractmethod
  def coco_ground_truth(self) -> dict:
    """The whole split's ground truth as a COCO instances dict ("images" with id/width/height, "annotations"
    with id/image_id/category_id/bbox [x, y, w, h]/area/iscrowd, "categories" with id/name): the images
    dataset() yields and exactly the objects it yields, plus crowd regions. pycocotools reads it as
    `coco = COCO(); coco.dataset = gt; coco.createIndex()`."""


def write_class_names(class_names, path: str) -> None:
  """`class_names` as a JSON list at `path` (a local path or gs://), index i the name of label i."""
  with tf.io.gfile.GFile(os.fspath(path), "w") as f:
    json.dump(list(class_names), f, indent=0, ensure_ascii=False)


def load_class_names(path: str) -> list[str]:
  """The list write_class_names wrote."""
  with tf.io.gfile.GFile(os.fspath(path)) as f:
    names = json.load(f)
  if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
    raise ValueError(f"{path} should hold a JSON list of class names (as save_class_names writes).")
  return names


def check_shard(process_index: int, process_count: int) -> None:
  if not (isinstance(process_count, int) and process_count >= 1):
    raise ValueError(f"process_count must be a positive int, got {process_count!r}.")
  if not (isinstance(process_index, int) and 0 <= process_index < process_count):
    raise ValueError(f"process_index must be an int in [0, {process_count}), got {process_index!r}.")


def _close(name: str, choices) -> str:
  matches = difflib.get_close_matches(name, list(choices), n=5, cutoff=0.6)
  return f" Did you mean {', '.join(matches)}?" if matches else ""


class TfdsSource(Source):
  """A split of a TFDS dataset, read as encoded bytes (images are never decoded here).

  name: a TFDS name, with config and version if needed ("cifar10", "imagenet_v2/matched-frequency",
    "imagenet2012:5.1.0"). split: any TFDS split expression ("train", "train[:98%]", "train[:1000]+test").
  data_dir: where the prepared dataset lives (default: TFDS's, $TFDS_DATA_DIR or ~/tensorflow_datasets).
  download: prepare it there if it is not prepared yet (downloads; imagenet2012 also needs its archives put
    in `manual_dir` by hand). Built-in datasets ("digits") are always prepared on first use.
  image_key, label_key: the features to read. By default "image" / "label" when the dataset has such an
    Image / ClassLabel feature, else its only top-level Image / ClassLabel feature; name them otherwise.
  """

  def __init__(
    self,
    name: str,
    split: str,
    *,
    data_dir: Optional[str] = None,
    download: bool = False,
    manual_dir: Optional[str] = None,
    image_key: Optional[str] = None,
    label_key: Optional[str] = None,
  ):
    self.name, self.split = name, split
    self.builder = _prepared_builder(name, data_dir, download, manual_dir)
    self.num_examples = _split_info(self.builder, name, split).num_examples
    features = self.builder.info.features
    self.image_key = _pick_feature(name, features, image_key, "image", tfds.features.Image)
    self.label_key = _pick_feature(name, features, label_key, "label", tfds.features.ClassLabel)
    self.class_names = list(features[self.label_key].names)

  def _shard_split(self, process_index: int, process_count: int):
    return tfds_shard_split(self.split, process_index, process_count)

  def shard_size(self, process_index: int = 0, process_count: int = 1) -> int:
    return self.builder.info.splits[self._shard_split(process_index, process_count)].num_examples

  def dataset(self, process_index: int = 0, process_count: int = 1) -> tf.data.Dataset:
    image_key, label_key = self.image_key, self.label_key

    def select(example):
      return {"image": example[image_key], "label": tf.cast(example[label_key], tf.int64)}

    if self.shard_size(process_index, process_count) == 0:  # TFDS refuses to read an empty slice
      return tf.data.Dataset.from_tensor_slices(
        {"image": tf.constant([], tf.string), "label": tf.constant([], tf.int64)}
      )
    features = self.builder.info.features
    # Every top-level image stays encoded, not only ours: a dataset's masks (oxford_iiit_pet) are dropped
    # below, so decoding them would be wasted work.
    decoders = {
      key: tfds.decode.SkipDecoding() for key, feature in features.items() if isinstance(feature, tfds.features.Image)
    }
    ds = self.builder.as_dataset(
      split=self._shard_split(process_index, process_count),
      decoders=decoders,
      shuffle_files=False,  # with unshuffled files TFDS interleaves deterministically: a fixed order
      read_config=tfds.ReadConfig(try_autocache=False),
    )  # caching is the pipeline's choice, not ours
    return ds.map(select, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def tfds_shard_split(split: str, process_index: int, process_count: int) -> str:
  """The TFDS split expression of one process's shard of `split`."""
  check_shard(process_index, process_count)
  # The first (num_examples % process_count) shards get one example more; see tfds.even_splits.
  return tfds.even_splits(split, n=process_count)[process_index]


def _prepared_builder(name: str, data_dir: Optional[str], download: bool, manual_dir: Optional[str]):
  if not isinstance(name, str) or not name:
    raise ValueError(f"TFDS dataset name must be a non-empty string, got {name!r}.")
  base_name = name.split(":")[0].split("/")[0]
  if base_name in _BUILT_IN_BUILDERS:
    if name != base_name:
      raise ValueError(f"The built-in dataset {base_name!r} has no configs or other versions: use {base_name!r}.")
    return _BUILT_IN_BUILDERS[base_name](data_dir)
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError:
    known = list(tfds.list_builders(with_community_datasets=False)) + list(_BUILT_IN_BUILDERS)
    raise ValueError(
      f"Unknown TFDS dataset {name!r}.{_close(base_name, known)} (tfds.list_builders() lists the names TFDS knows.)"
    ) from None
  if builder.is_prepared():
    return builder
  if not download:
    raise FileNotFoundError(
      f"TFDS dataset {name!r} is not prepared in {builder.data_dir}. Prepare it once with "
      f"make_source('tfds', name={name!r}, split=..., data_dir=..., download=True) (or "
      f"tfds.builder({name!r}, data_dir=...).download_and_prepare()), or point data_dir at the directory that "
      f"holds it. Some datasets (imagenet2012) need their archives downloaded by hand into manual_dir first: "
      f"see https://www.tensorflow.org/datasets/catalog/{base_name}."
    )
  try:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  except ModuleNotFoundError as e:
    if e.name != "importlib_resources":
      raise
    # TFDS 4.9.10 imports this backport to find its checksums files but only requires it below Python 3.9.
    raise ModuleNotFoundError(
      f"Preparing {name!r} needs the importlib_resources package, which TFDS uses but "
      "does not install: pip install importlib_resources.",
      name=e.name,
    ) from e
  return builder


def _split_info(builder, name: str, split: str):
  try:
    return builder.info.splits[split]
  except (KeyError, ValueError, TypeError) as e:
    available = ", ".join(f"{s} ({info.num_examples} examples)" for s, info in builder.info.splits.items())
    raise ValueError(
      f"TFDS dataset {name!r} has no split {split!r}: {e} Its splits: {available}. Slices such "
      "as 'train[:98%]' or 'train[1000:]' are allowed."
    ) from None


def _pick_feature(name: str, features, key: Optional[str], default: str, kind: type) -> str:
  """The feature to read as `default` ("image"/"label"): the one named `key`, else `default`, else the only one
  of its kind."""
  of_kind = [k for k, f in features.items() if isinstance(f, kind)]
  if key is not None:
    if key not in features:
      raise ValueError(
        f"TFDS dataset {name!r} has no feature {key!r} ({default}_key).{_close(key, features)} "
        f"Its features: {', '.join(features)}."
      )
    if not isinstance(features[key], kind):
      raise ValueError(
        f"TFDS dataset {name!r}: feature {key!r} ({default}_key) is of type "
        f"{type(features[key]).__name__}, expected {kind.__name__}. "
        f"Its {kind.__name__} features: {', '.join(of_kind) or 'none'}."
      )
    return key
  if default in of_kind:
    return default
  if len(of_kind) == 1:
    return of_kind[0]
  raise ValueError(
    f"TFDS dataset {name!r}: cannot tell which feature is the {default}; name it with "
    f"{default}_key=... . Its top-level {kind.__name__} features: {', '.join(of_kind) or 'none'}; "
    f"all features: {', '.join(features)}."
  )


def digits_source(split: str, data_dir: Optional[str] = None) -> TfdsSource:
  """scikit-learn's 8x8 digits ("train": 1,437, "test": 360), prepared offline in data_dir on first use."""
  return TfdsSource("digits", split, data_dir=data_dir)


def _kinds() -> dict[str, Callable[..., Source]]:
  # Here, not at the top: these modules build on Source from this file.
  from lvm_jax.data import coco_folder, digits_detection, folders, tfds_detection

  return {
    "tfds": TfdsSource,
    "folder": folders.FolderSource,
    "digits": digits_source,
    "coco_folder": coco_folder.CocoFolderSource,
    "digits_detection": digits_detection.digits_detection_source,
    "tfds_detection": tfds_detection.TfdsDetectionSource,
  }


def make_source(kind: str, **kwargs) -> Source:
  """A source of one split by kind, with that kind's arguments (unknown or missing ones are a TypeError).

      make_source("tfds", name="cifar10", split="train[:98%]", data_dir=...)
      make_source("folder", root="/data/pets", split="train")
      make_source("digits", split="test")
      make_source("coco_folder", annotations="/data/coco/annotations/instances_val2017.json",
                  images="/data/coco/val2017")
      make_source("tfds_detection", name="kitti", split="validation")

  Args:
    kind: "tfds" (TfdsSource: name, split, data_dir, download, manual_dir, image_key, label_key), "folder"
      (folders.FolderSource: root, split, holdout_fraction, holdout_split, train_split, layout, strict,
      index_path) or "digits" (split, data_dir: the built-in digits set, prepared offline on first use); for
      detection "coco_folder" (coco_folder.CocoFolderSource: annotations, images), "digits_detection" (split,
      data_dir: the built-in detection set) or "tfds_detection" (tfds_detection.TfdsDetectionSource: name,
      split, data_dir, download, manual_dir).
    **kwargs: the arguments of that kind, as the classes above document them.

  Returns:
    The Source: its num_examples, class_names (index i is label i) and per-process shards of encoded examples
    ({"image": encoded image bytes, "label": int64}; a DetectionSource's carry "boxes", "labels" and
    "image_id" instead of "label") for lvm_jax.data.pipeline.
  """
  kinds = _kinds()
  if kind not in kinds:
    raise ValueError(f"Unknown source kind {kind!r}; expected one of {', '.join(kinds)}.{_close(str(kind), kinds)}")
  factory = kinds[kind]
  params = inspect.signature(factory).parameters
  unknown = [k for k in kwargs if k not in params]
  if unknown:
    hints = "".join(_close(k, params) for k in unknown)
    raise TypeError(
      f"make_source({kind!r}): unknown argument(s) {', '.join(unknown)}.{hints} It takes: {', '.join(params)}."
    )
  missing = [k for k, p in params.items() if p.default is inspect.Parameter.empty and k not in kwargs]
  if missing:
    raise TypeError(f"make_source({kind!r}) needs {', '.join(missing)}. It takes: {', '.join(params)}.")
  return factory(**kwargs)
