"""`digits`: a TFDS dataset built offline from the 8x8 handwritten digits that scikit-learn ships.

sklearn.datasets.load_digits() holds 1,797 real images (UCI optdigits test set), 10 classes, pixel values
0..16. Here each becomes an 8x8x1 uint8 PNG with values round(v * 255 / 16) (so 16 -> 255) and a ClassLabel
named "0".."9". The split is fixed: for each digit, the images of that digit are permuted with
numpy.random.RandomState(0) and the first 36 go to "test"; "test" is 360 images (exactly 36 per class) and
"train" the other 1,437, each in ascending scikit-learn index order (shuffling is disabled when writing, so
example i of a split is sklearn image split_indices(split)[i]). numpy's RandomState stream is frozen, so the
split never changes with library versions. Preparing takes about a second and needs no network: it is the
default data for the demo, the tests and the notebooks.
"""

import contextlib
import io
from typing import Optional

import numpy as np
from absl import logging

# Before TFDS: keeps TensorFlow off the accelerators, and a missing TensorFlow is tf_host's one-line error.
from lvm_jax import tf_host  # noqa: F401

import tensorflow_datasets as tfds

TEST_PER_CLASS = 36
SPLIT_SEED = 0


def split_indices(split: str) -> np.ndarray:
  """Indices into sklearn.datasets.load_digits() of the examples of `split`, in the order they are stored."""
  from sklearn.datasets import load_digits

  labels = load_digits().target
  test = []
  rng = np.random.RandomState(SPLIT_SEED)
  for digit in range(10):
    members = np.flatnonzero(labels == digit)
    test.extend(rng.permutation(members)[:TEST_PER_CLASS])
  is_test = np.zeros(len(labels), bool)
  is_test[test] = True
  if split == "test":
    return np.flatnonzero(is_test)
  if split == "train":
    return np.flatnonzero(~is_test)
  raise ValueError(f"digits has splits 'train' and 'test', not {split!r}.")


def to_uint8(images: np.ndarray) -> np.ndarray:
  """scikit-learn's 0..16 pixel values as the 0..255 uint8 values stored in the PNGs."""
  return np.round(np.asarray(images, np.float64) * (255 / 16)).astype(np.uint8)


# skip_registration: the lvm_jax sources reach this builder through their own explicit table, so importing
# this file leaves TFDS's global registry (and any future TFDS dataset named "digits") untouched.
class Digits(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """scikit-learn's 8x8 digits as a TFDS dataset (see the module docstring for the split)."""

  # No checksums file to look up (nothing is downloaded). Without this, TFDS 4.9.10 on Python >= 3.9 looks for
  # the builder's source folder through the `importlib_resources` backport, which it does not install.
  code_path = None
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release: 1,437 train / 360 test, 8x8x1 PNG scaled to 0..255."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(8, 8, 1), encoding_format="png"),
          "label": tfds.features.ClassLabel(names=[str(d) for d in range(10)]),
        }
      ),
      supervised_keys=("image", "label"),
      disable_shuffling=True,
      homepage="https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: the images ship inside scikit-learn
    return {split: self._generate_examples(split) for split in ("train", "test")}

  def _generate_examples(self, split):
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = to_uint8(digits.images)[..., None]
    for index in split_indices(split):
      yield int(index), {"image": images[index], "label": int(digits.target[index])}


@contextlib.contextmanager
def _quiet_tfds():
  """TFDS reports a preparation as if it were a download (sizes "Unknown", progress bars, a warning that the
  new folder has no dataset_info.json); this one takes a second and downloads nothing, so one line says it."""
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  tfds.display_progress_bar(False)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    tfds.display_progress_bar(True)
    logging.set_verbosity(verbosity)


def prepared_builder(data_dir: Optional[str] = None) -> Digits:
  """The digits builder in `data_dir` (default: TFDS's default data dir), prepared there if it is not yet."""
  with _quiet_tfds():
    builder = Digits(data_dir=data_dir)
    prepared = builder.is_prepared()
  if not prepared:
    try:
      with _quiet_tfds():
        builder.download_and_prepare()
      print(f"Prepared the built-in digits dataset in {builder.data_dir} (once: later runs read it).")
    except Exception:
      # Another process may have prepared the same data_dir at the same moment; its copy is as good as ours.
      with _quiet_tfds():
        builder = Digits(data_dir=data_dir)
        prepared = builder.is_prepared()
      if not prepared:
        raise
  return builder
