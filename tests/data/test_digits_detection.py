"""The built-in detection set: exact boxes, disjoint digits, deterministic files, a safe first preparation, and its
train / eval batches through lvm_jax.data.pipeline on 1 and 2 (simulated) processes."""

import itertools
import json
import os
import threading

import numpy as np
import pytest
from sklearn.datasets import load_digits

from lvm_jax.data import digits, digits_detection, pipeline, sources
from lvm_jax.tf_host import tf

TRAIN_PP = "det_decode|det_scale_jitter(128, 0.75, 1.25)|det_pad_boxes(6)"
EVAL_PP = "det_decode|det_resize_pad(128)|det_pad_boxes(6)"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("digits_detection"))
  digits_detection.prepare(path)
  return path


@pytest.fixture(scope="module")
def train(data_dir):
  return sources.make_source("digits_detection", split="train", data_dir=data_dir)


@pytest.fixture(scope="module")
def test(data_dir):
  return sources.make_source("digits_detection", split="test", data_dir=data_dir)


def _instances(data_dir, split):
  with open(
    os.path.join(data_dir, "digits_detection", digits_detection.VERSION, "annotations", f"instances_{split}.json")
  ) as f:
    return json.load(f)


def test_sources_have_the_documented_sizes_and_classes(train, test):
  assert (train.num_examples, test.num_examples) == (2000, 300)
  assert train.class_names == [str(d) for d in range(10)] and train.category_ids == list(range(1, 11))
  assert train.dropped == {} and test.dropped == {}


def test_boxes_are_the_tight_bounds_of_each_digits_pixels():
  sizes = []
  for image, boxes, labels, sklearn_index, owners in digits_detection.render_split("test", 40):
    assert image.shape == (128, 128, 3) and image.dtype == np.uint8
    assert 1 <= len(boxes) <= 4 and len(labels) == len(boxes) == len(sklearn_index)
    for k, box in enumerate(boxes):
      rows, cols = np.flatnonzero((owners == k + 1).any(1)), np.flatnonzero((owners == k + 1).any(0))
      np.testing.assert_array_equal(box, [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1])
      sizes.append(box[3] - box[1])
      for other in boxes[k + 1 :]:  # digits never overlap
        assert min(box[2], other[2]) <= max(box[0], other[0]) or min(box[3], other[3]) <= max(box[1], other[1])
      # The digit shows: its brightest pixels are much brighter than the background below 110 + noise.
      x1, y1, x2, y2 = box.astype(int)
      assert image[y1:y2, x1:x2].max() >= 140
  assert min(sizes) >= 8 and max(sizes) <= 40 and np.ptp(sizes) > 15


def test_written_files_are_the_rendered_canvases(train, data_dir):
  """The JSON's boxes are render_split's exactly, the JPEGs its pixels within JPEG error, in image id order."""
  rendered = list(digits_detection.render_split("train", 3))
  examples = list(itertools.islice(train.dataset().as_numpy_iterator(), 3))
  for (image, boxes, labels, _, _), example in zip(rendered, examples):
    np.testing.assert_array_equal(example["boxes"], boxes)
    np.testing.assert_array_equal(example["labels"], labels)
    decoded = tf.io.decode_jpeg(example["image"]).numpy().astype(int)
    assert np.abs(decoded - image).mean() < 5  # JPEG at quality 95 of a noisy canvas
    assert np.abs(decoded - rendered[2][0]).mean() > 10 or example is examples[2]  # another canvas is far off
  assert [int(e["image_id"]) for e in examples] == [1, 2, 3]
  again = list(digits_detection.render_split("train", 3))  # the same seed: the same canvases
  for a, b in zip(rendered, again):
    for x, y in zip(a, b):
      np.testing.assert_array_equal(x, y)


def test_train_and_test_use_disjoint_digit_images_with_their_labels(data_dir):
  targets = load_digits().target
  for split in ("train", "test"):
    annotations = _instances(data_dir, split)["annotations"]
    used = np.array([a["sklearn_index"] for a in annotations])
    assert set(used) <= set(digits.split_indices(split))
    np.testing.assert_array_equal([a["category_id"] - 1 for a in annotations], targets[used])
    counts = np.bincount(targets[used], minlength=10)
    assert counts.min() > 0.6 * counts.mean()  # every class is well represented
  assert len(_instances(data_dir, "train")["annotations"]) > 4500


def test_concurrent_first_preparations_leave_one_complete_copy(tmp_path, monkeypatch):
  """Two threads prepare the same empty data_dir at once (both writing before either renames): both get the one
  copy that won the rename, and no partial folder is left behind."""
  both_writing = threading.Barrier(2)

  def write(root):
    os.makedirs(os.path.join(root, "annotations"))
    with open(os.path.join(root, "annotations", "writer"), "w") as f:
      f.write(threading.current_thread().name)
    both_writing.wait(timeout=10)

  monkeypatch.setattr(digits_detection, "_write", write)
  results = {}
  threads = [
    threading.Thread(
      target=lambda: results.update({threading.current_thread().name: digits_detection.prepare(str(tmp_path))})
    )
    for _ in range(2)
  ]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join(timeout=20)
  assert len(set(results.values())) == 1 and len(results) == 2
  root = results.popitem()[1]
  parent = os.path.dirname(root)
  assert os.listdir(parent) == [digits_detection.VERSION]  # no .partial-* folder left
  with open(os.path.join(root, "annotations", "writer")) as f:
    assert f.read() in {thread.name for thread in threads}


def test_bad_split_and_remote_data_dir_are_clear_errors(tmp_path):
  with pytest.raises(ValueError, match="digits_detection has splits 'train', 'test', not 'val'"):
    digits_detection.digits_detection_source("val", data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="is not a local path"):
    digits_detection.prepare("gs://bucket/data")


def _check_batch_convention(batch, batch_size, max_boxes=6):
  assert batch["image"].shape == (batch_size, 128, 128, 3) and batch["image"].dtype == np.uint8
  assert batch["boxes"].shape == (batch_size, max_boxes, 4) and batch["boxes"].dtype == np.float32
  assert batch["labels"].shape == (batch_size, max_boxes) and batch["labels"].dtype == np.int32
  assert batch["box_mask"].shape == (batch_size, max_boxes) and batch["box_mask"].dtype == np.float32
  assert batch["image_id"].dtype == np.int64 and batch["scale"].dtype == np.float32
  assert batch["orig_size"].shape == (batch_size, 2) and batch["orig_size"].dtype == np.int32
  real = batch["box_mask"] > 0
  assert (batch["boxes"][~real] == 0).all()
  assert (batch["boxes"][real][:, 2:] > batch["boxes"][real][:, :2]).all() and (batch["boxes"] <= 128).all()


def test_train_batches_follow_the_convention_and_match_across_process_counts(train):
  def global_batches(count):
    streams = [
      pipeline.train_dataset(
        train, TRAIN_PP, global_batch_size=8, seed=3, shard=pipeline.Shard(i, count), num_shards=2
      ).as_numpy_iterator()
      for i in range(count)
    ]
    return [
      {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
      for parts in zip(*(itertools.islice(s, 2) for s in streams))
    ]

  one, two = global_batches(1), global_batches(2)
  for a, b in zip(one, two):
    _check_batch_convention(a, 8)
    assert set(a) == {"image", "boxes", "labels", "box_mask", "image_id", "scale", "orig_size"}
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert a["box_mask"].sum() >= 8  # every canvas has a digit
  assert len(set(np.concatenate([b["image_id"] for b in one]))) == 16


def test_eval_without_box_padding_names_the_ragged_keys(test):
  with pytest.raises(ValueError, match=r"unknown shape \(boxes \(None, 4\), labels \(None,\)\).*det_pad_boxes"):
    pipeline.eval_dataset(test, "det_decode|det_resize_pad(128)", global_batch_size=8, shard=pipeline.Shard(0, 1))


@pytest.mark.parametrize("count", [1, 2])
def test_eval_batches_cover_the_split_once_with_padding_masked(test, count):
  per_process = []
  for i in range(count):
    ds = pipeline.eval_dataset(test, EVAL_PP, global_batch_size=64, shard=pipeline.Shard(i, count))
    per_process.append(list(ds.as_numpy_iterator()))
  steps = pipeline.eval_steps(test, 64, count)
  assert [len(batches) for batches in per_process] == [steps] * count and steps == 5  # 300 = 4 x 64 + 44
  ids = []
  for batches in per_process:
    for batch in batches:
      _check_batch_convention(batch, 64 // count)
      assert batch["mask"].dtype == np.int32
      real = batch["mask"] == 1
      ids.extend(batch["image_id"][real].tolist())
      assert (batch["scale"][real] == 1.0).all() and (batch["orig_size"][real] == 128).all()
      assert not batch["image"][~real].any() and not batch["box_mask"][~real].any()
  assert sorted(ids) == list(range(1, 301))
  # The boxes are the ground truth's (the canvas is the original image: scale 1).
  gt = {(a["image_id"], tuple(a["bbox"])) for a in test.coco_ground_truth()["annotations"]}
  batch = per_process[0][0]
  for image_id, boxes, mask in zip(batch["image_id"], batch["boxes"], batch["box_mask"]):
    for x1, y1, x2, y2 in boxes[mask > 0].tolist():
      assert (int(image_id), (x1, y1, x2 - x1, y2 - y1)) in gt
