"""The README's input recipe end to end on a folder of real photos: augmentations, mixing, global batches,
device normalization, and an exact eval over the held-out files."""

import itertools

import jax
import numpy as np
import PIL.Image
import pytest
import skimage.data
from jax.sharding import NamedSharding, PartitionSpec as P

from lvm_jax.data import device_batches, pipeline, sources

TRAIN_PP = "decode_inception_crop(64)|flip_lr|randaugment(2, 9)|onehot(3, smoothing=0.1)|mixup_cutmix(0.8, 1.0)"
EVAL_PP = "decode|resize_small(72)|central_crop(64)"


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  """root/<class>/*.jpg|png, 3 classes of 20 crops each; no split folders, so a held-out fraction is used."""
  root = tmp_path_factory.mktemp("photos")
  rng = np.random.default_rng(0)
  for name in ("chelsea", "astronaut", "coffee"):
    image = getattr(skimage.data, name)()
    (root / name).mkdir()
    for i in range(20):
      y, x = rng.integers(0, 100, 2)
      crop = PIL.Image.fromarray(image[y : y + 200, x : x + 250])
      crop.save(root / name / f"{i}.{'png' if i % 4 == 0 else 'jpg'}")
  return str(root)


def test_train_batches_on_the_mesh_with_soft_labels(photos, tmp_path):
  train = sources.make_source("folder", root=photos, split="train", holdout_fraction=0.25)
  assert train.class_names == ["astronaut", "chelsea", "coffee"]
  train.save_class_names(str(tmp_path / "classes.json"))
  assert sources.load_class_names(str(tmp_path / "classes.json")) == train.class_names
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = NamedSharding(mesh, P("data"))
  stream = pipeline.train_dataset(train, TRAIN_PP, global_batch_size=16, seed=0, shard=pipeline.Shard(0, 1))
  normalize = jax.jit(lambda x: device_batches.normalize(x, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))
  for step, batch in zip(range(3), device_batches.global_batches(stream.as_numpy_iterator(), sharding)):
    assert batch["image"].shape == (16, 64, 64, 3) and batch["image"].sharding == sharding
    images = np.asarray(normalize(batch["image"]))
    assert images.dtype == np.float32 and -1.0 <= images.min() and images.max() <= 1.0
    labels = np.asarray(batch["label"])
    np.testing.assert_allclose(labels.sum(-1), 1.0, atol=1e-5)  # mixed soft labels still sum to one
    # Example i is mixed with example 15 - i, so each pair still holds its two smoothed one-hot labels
    # (0.9 * onehot + 0.1 / 3) in total, whatever the weight ...
    hot = (labels + labels[::-1] - 2 * 0.1 / 3) / 0.9
    np.testing.assert_allclose(hot, hot.round(), atol=1e-4)
    assert (hot.round().sum(-1) == 2).all()
    # ... and mixing happened: labels that are not a smoothed one-hot, with 0.9 + 0.1 / 3 at most.
    mixed = ~np.isclose(labels.max(-1), 0.9 + 0.1 / 3, atol=1e-3)
    print(f"step {step}: {mixed.sum()} of 16 labels mixed")
    assert mixed.any()


def test_eval_covers_the_held_out_files_exactly_once(photos):
  train = sources.make_source("folder", root=photos, split="train", holdout_fraction=0.25)
  held_out = sources.make_source("folder", root=photos, split="validation", holdout_fraction=0.25)
  assert train.num_examples + held_out.num_examples == 60 and 0 < held_out.num_examples < 30
  evals = pipeline.eval_dataset(held_out, EVAL_PP, global_batch_size=8, shard=pipeline.Shard(0, 1))
  batches = list(evals.as_numpy_iterator())
  assert sum(int(b["mask"].sum()) for b in batches) == held_out.num_examples
  labels = np.concatenate([b["label"][b["mask"] == 1] for b in batches])
  assert sorted(labels.tolist()) == sorted(held_out.labels)


class _BytesOnly(sources.Source):
  """A folder source seen only through dataset(): the pipeline must shuffle its encoded images."""

  def __init__(self, folder):
    self.folder, self.num_examples, self.class_names = folder, folder.num_examples, folder.class_names

  def dataset(self, process_index=0, process_count=1):
    return self.folder.dataset(process_index, process_count)

  def shard_size(self, process_index=0, process_count=1):
    return self.folder.shard_size(process_index, process_count)


def test_shuffling_file_paths_gives_the_batches_of_shuffling_image_bytes(photos):
  """Folders hand the pipeline paths to shuffle (references + load): the stream is the one a shuffle of the
  encoded images gives, across an epoch boundary (45 training files, batches of 16)."""
  train = sources.make_source("folder", root=photos, split="train", holdout_fraction=0.25)
  assert train.load is not None and _BytesOnly(train).load is None
  spec = "decode_inception_crop(48)|flip_lr"
  kwargs = dict(global_batch_size=16, seed=3, shard=pipeline.Shard(0, 1), shuffle_buffer=32)
  by_path = pipeline.train_dataset(train, spec, **kwargs).as_numpy_iterator()
  by_bytes = pipeline.train_dataset(_BytesOnly(train), spec, **kwargs).as_numpy_iterator()
  for _ in range(5):
    a, b = next(by_path), next(by_bytes)
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])


def test_a_resume_reads_none_of_the_files_it_skips(tmp_path):
  """One photo per class, so labels name files: after deleting the files a resume at example 4 skips, it
  still yields the batches an uninterrupted run yields from there."""
  image = skimage.data.astronaut()
  for label in range(6):
    (tmp_path / "train" / f"class{label}").mkdir(parents=True)
    PIL.Image.fromarray(image[label * 40 : label * 40 + 100, :120]).save(tmp_path / "train" / f"class{label}" / "a.jpg")
  source = sources.make_source("folder", root=str(tmp_path), split="train")
  kwargs = dict(global_batch_size=1, seed=0, shard=pipeline.Shard(0, 1))
  full = [
    int(b["label"][0])
    for b in itertools.islice(pipeline.train_dataset(source, "decode|resize(8)", **kwargs).as_numpy_iterator(), 6)
  ]
  assert sorted(full) == list(range(6))
  for label in full[:4]:
    (tmp_path / "train" / f"class{label}" / "a.jpg").unlink()
  resumed = pipeline.train_dataset(source, "decode|resize(8)", start=4, **kwargs).as_numpy_iterator()
  assert [int(next(resumed)["label"][0]) for _ in range(2)] == full[4:]
