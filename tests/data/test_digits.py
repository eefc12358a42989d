"""The built-in digits dataset: counts, class balance, pixels equal to scikit-learn's, and a fixed split."""

import numpy as np
import pytest
import tensorflow as tf
from sklearn.datasets import load_digits

from lvm_jax.data import digits, sources


def read_split(source):
  images, labels = [], []
  for example in source.dataset().as_numpy_iterator():
    images.append(tf.io.decode_png(example["image"]).numpy())
    labels.append(example["label"])
  return np.stack(images), np.array(labels)


def test_counts_and_class_names(digits_dir):
  train = sources.make_source("digits", split="train", data_dir=digits_dir)
  test = sources.make_source("digits", split="test", data_dir=digits_dir)
  assert (train.num_examples, test.num_examples) == (1437, 360)
  assert train.class_names == test.class_names == [str(d) for d in range(10)]
  assert train.num_classes == 10
  assert train.builder.data_path.name == "1.0.0" and train.builder.data_path.parent.name == "digits"


def test_class_balance(digits_dir):
  all_labels = load_digits().target
  test_labels = read_split(sources.make_source("digits", split="test", data_dir=digits_dir))[1]
  train_labels = read_split(sources.make_source("digits", split="train", data_dir=digits_dir))[1]
  np.testing.assert_array_equal(np.bincount(test_labels, minlength=10), [36] * 10)
  np.testing.assert_array_equal(np.bincount(train_labels, minlength=10), np.bincount(all_labels) - 36)


@pytest.mark.parametrize("split", ["train", "test"])
def test_images_are_sklearn_pixels_scaled(digits_dir, split):
  source = sources.make_source("digits", split=split, data_dir=digits_dir)
  images, labels = read_split(source)
  reference = load_digits()
  index = digits.split_indices(split)
  assert images.shape == (len(index), 8, 8, 1) and images.dtype == np.uint8
  expected = np.round(reference.images[index] * 255 / 16).astype(np.uint8)[..., None]
  np.testing.assert_array_equal(images, expected)
  np.testing.assert_array_equal(labels, reference.target[index])
  assert images.max() == 255 and images.min() == 0


def test_scaling_endpoints():
  np.testing.assert_array_equal(digits.to_uint8(np.array([0.0, 1.0, 8.0, 15.0, 16.0])), [0, 16, 128, 239, 255])


def test_split_is_fixed_disjoint_and_complete():
  train, test = digits.split_indices("train"), digits.split_indices("test")
  assert len(np.intersect1d(train, test)) == 0
  np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(1797))
  # Pinned: the split must never change, or results on "digits" stop being comparable across versions.
  np.testing.assert_array_equal(test[:8], [3, 7, 13, 19, 36, 38, 43, 48])
  assert int(test.sum()) == 312284
  with pytest.raises(ValueError, match="'train' and 'test', not 'validation'"):
    digits.split_indices("validation")


def test_prepared_again_is_identical(digits_dir, tmp_path):
  """Preparing in a fresh data_dir gives the same bytes in the same order (and reading is repeatable)."""
  first = sources.make_source("digits", split="test", data_dir=digits_dir)
  second = sources.make_source("digits", split="test", data_dir=str(tmp_path))
  a = [ex["image"] for ex in first.dataset().as_numpy_iterator()]
  assert a == [ex["image"] for ex in first.dataset().as_numpy_iterator()]
  assert a == [ex["image"] for ex in second.dataset().as_numpy_iterator()]
  assert (tmp_path / "digits" / "1.0.0" / "dataset_info.json").exists()
