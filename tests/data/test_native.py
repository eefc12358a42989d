"""lvm_jax.data.native: the crop + resize and crop box kernels against TensorFlow's ops, their errors,
and the fallback."""

import io
import os
import shutil

import numpy as np
import PIL.Image
import pytest
import skimage.data
import tensorflow as tf

from lvm_jax.data import native, ops

HAS_COMPILER = shutil.which(os.environ.get("CXX", "c++")) is not None
needs_compiler = pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler to build the kernel")


def _stock(image, left, width, size):
  crop = image[:, left : left + width]
  return ops._resize_uint8(tf.constant(crop), size, "bilinear", antialias=False).numpy()


@needs_compiler
@pytest.mark.parametrize(
  "shape,left,width,size",
  [
    ((375, 500, 3), 37, 300, (224, 224)),  # downscale
    ((90, 120, 3), 5, 70, (224, 224)),  # upscale
    ((1, 40, 3), 0, 40, (7, 9)),  # one row
    ((30, 1, 3), 0, 1, (5, 4)),  # one column
    ((64, 80, 1), 16, 33, (20, 31)),  # grayscale
    ((64, 80, 4), 3, 77, (40, 40)),  # RGBA
    ((40, 50, 2), 9, 41, (60, 17)),  # two channels
    ((40, 50, 5), 2, 45, (30, 70)),  # more channels than one vector holds: the per-value path
  ],
)
def test_kernel_is_tensorflows_bilinear_resize_within_one_level(shape, left, width, size):
  assert native.library() is not None  # a compiler is here, so the build must work
  kernel = native.library().lvm_crop_resize_bilinear
  image = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
  out = kernel(image, left, width, size).numpy()
  expected = _stock(image, left, width, size)
  assert out.shape == expected.shape == size + (shape[2],)
  difference = np.abs(out.astype(int) - expected)
  assert difference.max() <= 1  # the kernel blends rows before columns: float rounding differs, not the sampling
  assert np.mean(difference > 0) < 1e-3


@needs_compiler
def test_kernel_names_columns_outside_the_image():
  with pytest.raises(tf.errors.InvalidArgumentError, match=r"columns \[40, 80\) are not inside"):
    native.library().lvm_crop_resize_bilinear(np.zeros((5, 70, 3), np.uint8), 40, 40, [4, 4])


@needs_compiler
def test_decode_inception_crop_with_and_without_the_kernel(monkeypatch):
  """The kernel path decodes a block-aligned window and reads the crop's columns from it: same crop."""
  buffer = io.BytesIO()
  PIL.Image.fromarray(skimage.data.astronaut()).save(buffer, format="JPEG", quality=90)
  example = {"image": tf.constant(buffer.getvalue()), "label": tf.constant(0, tf.int64)}
  with_kernel = ops.decode_inception_crop(96)
  monkeypatch.setattr(native, "library", lambda: None)
  without = ops.decode_inception_crop(96)
  crops = 0
  for seed in range(20):
    seeded = {**example, "rng": tf.constant([seed, 7], tf.int64)}
    a, b = with_kernel(seeded)["image"].numpy(), without(seeded)["image"].numpy()
    assert a.shape == b.shape == (96, 96, 3)
    assert np.abs(a.astype(int) - b).max() <= 1
    crops += not np.array_equal(a, without({**example, "rng": tf.constant([seed + 1, 7], tf.int64)})["image"])
  assert crops == 20  # different seeds, different crops: the comparison is not of one fixed window


def test_without_a_compiler_the_pipeline_warns_and_uses_tensorflow(monkeypatch, tmp_path):
  monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
  monkeypatch.setenv("LVM_JAX_CACHE", str(tmp_path / "cache"))
  native.library.cache_clear()
  try:
    with pytest.warns(UserWarning, match="could not build or load crop_resize.cc, crop_box.cc .*no-such-compiler"):
      assert native.library() is None
    image = skimage.data.chelsea()[::4, ::4].copy()
    out = ops.inception_crop(24)({"image": tf.constant(image), "rng": tf.constant([1, 2], tf.int64)})["image"]
    assert out.shape == (24, 24, 3)
    monkeypatch.setenv("LVM_JAX_NATIVE_OPS", "0")
    native.library.cache_clear()
    assert native.library() is None  # switched off: no build attempted, no warning
  finally:
    native.library.cache_clear()


def test_a_library_that_does_not_load_warns_and_uses_tensorflow(monkeypatch):
  def broken(path):
    raise tf.errors.NotFoundError(None, None, f"{path}: undefined symbol")

  # The default cache: the library the other tests built is found there, not compiled a second time.
  monkeypatch.setattr(tf, "load_op_library", broken)
  native.library.cache_clear()
  try:
    with pytest.warns(UserWarning, match="undefined symbol"):
      assert native.library() is None
  finally:
    native.library.cache_clear()


@pytest.mark.parametrize("kernel", [True, False])
def test_crops_keep_a_static_shape_in_a_pipeline(kernel, monkeypatch):
  """tf.data traces the ops with unknown image sizes: the crop must still say (size, size, channels)."""
  if not kernel:
    monkeypatch.setattr(native, "library", lambda: None)
  elif not HAS_COMPILER:
    pytest.skip("no C++ compiler to build the kernel")
  spec = {"image": tf.TensorSpec([None, None, 3], tf.uint8), "rng": tf.TensorSpec([2], tf.int64)}
  crop = tf.function(ops.inception_crop(32)).get_concrete_function(spec).structured_outputs["image"]
  assert crop.shape.as_list() == [32, 32, 3]
  encoded = {"image": tf.TensorSpec([], tf.string), "rng": tf.TensorSpec([2], tf.int64)}
  crop = tf.function(ops.decode_inception_crop(32)).get_concrete_function(encoded).structured_outputs["image"]
  assert crop.shape.as_list() == [32, 32, 3]


@needs_compiler
def test_crop_box_kernel_chooses_the_boxes_of_the_tensorflow_ops(monkeypatch):
  """Over random sizes, seeds and ranges, fallbacks included (thin strips where no draw fits)."""
  box = native.library().lvm_inception_crop_box
  rng = np.random.default_rng(0)
  cases = [((int(rng.integers(1, 700)), int(rng.integers(1, 700))), 0.08, 1.0, (3 / 4, 4 / 3)) for _ in range(150)]
  cases += [
    ((10, 200), 0.9, 1.0, (3 / 4, 4 / 3)),
    ((400, 7), 0.5, 1.0, (0.5, 2.0)),
    ((1, 1), 0.08, 1.0, (0.75, 1.33)),
    ((375, 500), 1.0, 1.0, (1.0, 1.0)),
    ((224, 224), 0.3, 0.31, (0.2, 5.0)),
  ]
  args = [
    (tf.constant(size), tf.constant([i, 9], tf.int64), lo, hi, ratio) for i, (size, lo, hi, ratio) in enumerate(cases)
  ]
  with_kernel = [[int(v) for v in ops.inception_crop_box(*a)] for a in args]
  monkeypatch.setattr(native, "library", lambda: None)
  assert with_kernel == [[int(v) for v in ops.inception_crop_box(*a)] for a in args]
  fallbacks = sum(
    (size[0] - ch) // 2 == top and (size[1] - cw) // 2 == left and (ch == size[0] or cw == size[1])
    for (size, *_), (top, left, ch, cw) in zip(cases, with_kernel)
  )
  assert fallbacks >= 3  # the strips and the 1x1 image take the centred fallback
  with pytest.raises(tf.errors.InvalidArgumentError, match="input 0 must be a vector"):  # an error, not a crash
    box([[5, 5]], [0.5], [1.0], [0.5, 0.5], area_min=0.1, area_max=1.0, ratio_min=0.75, ratio_max=1.33)
