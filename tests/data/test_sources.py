"""The TFDS source (on real, offline-prepared TFDS builders: digits and a tiny one defined here) and make_source."""

import json

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from lvm_jax.data import sources


class LvmJaxTinyPets(tfds.core.GeneratorBasedBuilder):
  """Shaped like oxford_iiit_pet (two Image features, two ClassLabels), with other names: 12 examples."""

  code_path = None  # nothing to download, so no checksums file (see lvm_jax/data/digits.py)
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {
          "photo": tfds.features.Image(shape=(4, 4, 3), encoding_format="png"),
          "mask": tfds.features.Image(shape=(4, 4, 1), encoding_format="png"),
          "breed": tfds.features.ClassLabel(names=["abyssinian", "beagle", "boxer"]),
          "species": tfds.features.ClassLabel(names=["cat", "dog"]),
        }
      ),
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(12)}

  def _generate_examples(self, n):
    for i in range(n):
      yield (
        i,
        {
          "photo": np.full((4, 4, 3), 10 * i, np.uint8),
          "mask": np.zeros((4, 4, 1), np.uint8),
          "breed": i % 3,
          "species": int(i % 3 > 0),
        },
      )


def examples(ds):
  return [(ex["image"], int(ex["label"])) for ex in ds.as_numpy_iterator()]


@pytest.mark.parametrize("split", ["train", "train[:98%]", "test[10:]", "train[:100]+test[:7]"])
@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_shards_are_disjoint_complete_and_sized(digits_dir, split, count):
  source = sources.make_source("digits", split=split, data_dir=digits_dir)
  whole = examples(source.dataset())
  assert len(whole) == source.num_examples == source.shard_size(0, 1)
  shards = [examples(source.dataset(i, count)) for i in range(count)]
  assert [len(s) for s in shards] == [source.shard_size(i, count) for i in range(count)]
  together = [ex for shard in shards for ex in shard]
  assert sorted(together) == sorted(whole)  # complete; with the count above, also disjoint
  if "+" not in split:
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    # even_splits cuts contiguous ranges, so the shards in process order are the whole split in its order.
    assert together == whole
  # (a "+" split is cut part by part: each shard takes its range of every part, so sizes can differ by 2.)


def test_slice_sizes(digits_dir):
  assert sources.make_source("digits", split="train[:98%]", data_dir=digits_dir).num_examples == 1408
  assert (
    sources.make_source("tfds", name="digits", split="train[1000:]+test", data_dir=digits_dir).num_examples == 437 + 360
  )


def test_examples_are_encoded_and_repeatable(digits_dir):
  source = sources.make_source("digits", split="test", data_dir=digits_dir)
  spec = source.dataset(1, 3).element_spec
  assert spec == {"image": tf.TensorSpec([], tf.string), "label": tf.TensorSpec([], tf.int64)}
  first = examples(source.dataset(1, 3))
  assert first == examples(source.dataset(1, 3))
  assert first[0][0].startswith(b"\x89PNG")


def test_more_processes_than_examples(digits_dir):
  source = sources.make_source("digits", split="test[:3]", data_dir=digits_dir)
  sizes = [source.shard_size(i, 5) for i in range(5)]
  assert sizes == [1, 1, 1, 0, 0]
  assert examples(source.dataset(4, 5)) == []
  assert source.dataset(4, 5).element_spec == source.dataset(0, 5).element_spec


def test_tfds_kind_reads_digits_like_digits_kind(digits_dir):
  a = sources.make_source("tfds", name="digits", split="test", data_dir=digits_dir)
  b = sources.make_source("digits", split="test", data_dir=digits_dir)
  assert examples(a.dataset(0, 2)) == examples(b.dataset(0, 2))


def test_unprepared_then_download_prepares(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"'lvm_jax_tiny_pets' is not prepared in .*download=True"):
    sources.make_source(
      "tfds", name="lvm_jax_tiny_pets", split="train", data_dir=str(tmp_path), image_key="photo", label_key="breed"
    )
  source = sources.make_source(
    "tfds",
    name="lvm_jax_tiny_pets",
    split="train",
    data_dir=str(tmp_path),
    download=True,
    image_key="photo",
    label_key="breed",
  )
  assert source.num_examples == 12
  assert (source.label_key, source.class_names) == ("breed", ["abyssinian", "beagle", "boxer"])
  got = [(tf.io.decode_png(image).numpy()[0, 0, 0], label) for image, label in examples(source.dataset())]
  assert got == [(10 * i, i % 3) for i in range(12)]
  species = sources.make_source(
    "tfds", name="lvm_jax_tiny_pets", split="train", data_dir=str(tmp_path), image_key="photo", label_key="species"
  )
  assert species.class_names == ["cat", "dog"] and [label for _, label in examples(species.dataset())][:4] == [
    0,
    1,
    1,
    0,
  ]
  with pytest.raises(ValueError, match="cannot tell which feature is the image.*image_key.*photo, mask"):
    sources.make_source("tfds", name="lvm_jax_tiny_pets", split="train", data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="cannot tell which feature is the label.*label_key.*breed, species"):
    sources.make_source("tfds", name="lvm_jax_tiny_pets", split="train", data_dir=str(tmp_path), image_key="photo")
  with pytest.raises(ValueError, match="no feature 'phot' .*Did you mean photo"):
    sources.make_source("tfds", name="lvm_jax_tiny_pets", split="train", data_dir=str(tmp_path), image_key="phot")


def test_feature_defaults_prefer_image_and_label():
  features = tfds.features.FeaturesDict(
    {
      "image": tfds.features.Image(shape=(None, None, 3)),
      "segmentation_mask": tfds.features.Image(shape=(None, None, 1)),
      "label": tfds.features.ClassLabel(num_classes=37),
      "species": tfds.features.ClassLabel(num_classes=2),
      "file_name": tfds.features.Text(),
    }
  )
  assert sources._pick_feature("pets", features, None, "image", tfds.features.Image) == "image"
  assert sources._pick_feature("pets", features, None, "label", tfds.features.ClassLabel) == "label"
  with pytest.raises(ValueError, match="'file_name' \\(label_key\\) is of type Text, expected ClassLabel"):
    sources._pick_feature("pets", features, "file_name", "label", tfds.features.ClassLabel)


def test_unknown_dataset_lists_close_matches(tmp_path):
  with pytest.raises(ValueError, match="Unknown TFDS dataset 'cifar11'. Did you mean .*cifar10"):
    sources.make_source("tfds", name="cifar11", split="train", data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="Unknown TFDS dataset 'digit'. Did you mean digits"):
    sources.make_source("tfds", name="digit", split="train", data_dir=str(tmp_path))


def test_unprepared_known_dataset_says_how_to_prepare(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"'cifar10' is not prepared in .*download_and_prepare"):
    sources.make_source("tfds", name="cifar10", split="train", data_dir=str(tmp_path))
  assert not list(tmp_path.iterdir())  # and nothing was downloaded or written


def test_unknown_split_lists_splits(digits_dir):
  with pytest.raises(ValueError, match=r"no split 'validation'.*train \(1437 examples\), test \(360 examples\)"):
    sources.make_source("digits", split="validation", data_dir=digits_dir)
  with pytest.raises(ValueError, match="no split 'train\\[:200%\\]'"):
    sources.make_source("digits", split="train[:200%]", data_dir=digits_dir)


def test_bad_process_index(digits_dir):
  source = sources.make_source("digits", split="test", data_dir=digits_dir)
  with pytest.raises(ValueError, match=r"process_index must be an int in \[0, 2\), got 2"):
    source.dataset(2, 2)
  with pytest.raises(ValueError, match="process_count must be a positive int"):
    source.shard_size(0, 0)


def test_make_source_errors(digits_dir):
  with pytest.raises(
    ValueError, match="Unknown source kind 'folders'.*tfds, folder, digits, coco_folder, .*. Did you mean folder"
  ):
    sources.make_source("folders", root="x")
  with pytest.raises(TypeError, match="unknown argument\\(s\\) data_dri. Did you mean data_dir\\? It takes: split"):
    sources.make_source("digits", split="train", data_dri=digits_dir)
  with pytest.raises(TypeError, match="make_source\\('tfds'\\) needs name, split"):
    sources.make_source("tfds")


def test_class_names_round_trip(digits_dir, tmp_path):
  source = sources.make_source("digits", split="test", data_dir=digits_dir)
  path = tmp_path / "class_names.json"
  source.save_class_names(str(path))
  assert json.loads(path.read_text()) == [str(d) for d in range(10)]
  assert sources.load_class_names(str(path)) == source.class_names
  path.write_text('{"0": "zero"}')
  with pytest.raises(ValueError, match="JSON list of class names"):
    sources.load_class_names(str(path))
