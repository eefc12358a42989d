"""Per-example ops: decoding every image kind, resize and crop geometry, flip, normalize, onehot, randomness."""

import io
import math

import numpy as np
import PIL.Image
import pytest
import skimage.data
import tensorflow as tf

from lvm_jax.data import ops

CAT = skimage.data.chelsea()[::4, ::4].copy()  # 75 x 113 RGB


def _example(image, rng=(1, 2), label=3):
  return {"image": tf.constant(image), "label": tf.constant(label, tf.int64), "rng": tf.constant(rng, tf.int64)}


def _encode(image: PIL.Image.Image, fmt: str) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, fmt)
  return buffer.getvalue()


def _decode(data: bytes) -> np.ndarray:
  return ops.decode()({"image": tf.constant(data)})["image"].numpy()


# -- decode -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "mode,fmt,tolerance",
  [
    ("RGB", "PNG", 0),
    ("L", "PNG", 0),
    ("RGBA", "PNG", 0),
    ("LA", "PNG", 0),
    ("P", "PNG", 0),
    ("P", "GIF", 0),
    ("RGB", "BMP", 0),
    # TF's and PIL's libjpeg builds upsample chroma and round the colour transform differently.
    ("RGB", "JPEG", 8),
    ("L", "JPEG", 2),
    ("CMYK", "JPEG", 2),
  ],
)
def test_decode_gives_rgb_uint8_like_pil_convert(mode, fmt, tolerance):
  pil = PIL.Image.fromarray(CAT)
  if mode == "RGBA":
    pil = pil.convert("RGBA")
    pil.putalpha(PIL.Image.fromarray(np.tile(np.arange(113, dtype=np.uint8), (75, 1))))  # alpha is dropped
  else:
    pil = pil.convert(mode)
  data = _encode(pil, fmt)
  expected = np.asarray(PIL.Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
  out = _decode(data)
  assert out.dtype == np.uint8 and out.shape == (75, 113, 3)
  error = np.abs(out.astype(int) - expected)
  assert error.max() <= tolerance and error.mean() < 1
  if mode in ("L", "LA"):
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


@pytest.mark.parametrize("channels", [1, 3])
def test_decode_scales_16_bit_png_to_8_bit(channels):
  low_bytes = np.arange(CAT[..., :channels].size).reshape(CAT[..., :channels].shape) % 256
  sixteen = (CAT[..., :channels].astype(np.uint16) * 256 + low_bytes).astype(np.uint16)
  out = _decode(tf.io.encode_png(tf.constant(sixteen)).numpy())
  assert out.dtype == np.uint8 and out.shape == (75, 113, 3)
  np.testing.assert_array_equal(out, np.broadcast_to(CAT[..., :channels], out.shape))  # the high byte


def test_decode_inside_tf_data_has_static_channels_and_rejects_corrupt_bytes():
  good = _encode(PIL.Image.fromarray(CAT), "PNG")
  ds = tf.data.Dataset.from_tensor_slices({"image": [good]}).map(ops.decode())
  assert ds.element_spec["image"].shape.as_list() == [None, None, 3]
  np.testing.assert_array_equal(next(iter(ds))["image"].numpy(), CAT)
  with pytest.raises(tf.errors.InvalidArgumentError):
    _decode(b"not an image at all")


# -- resize and crops -------------------------------------------------------------------------------------------


def test_resize_shape_dtype_and_closeness_to_pil_bilinear():
  out = ops.resize((30, 45))(_example(CAT))["image"].numpy()
  assert out.dtype == np.uint8 and out.shape == (30, 45, 3)
  # Both are antialiased triangle filters when shrinking.
  ref = np.asarray(PIL.Image.fromarray(CAT).resize((45, 30), PIL.Image.BILINEAR)).astype(int)
  assert np.abs(out.astype(int) - ref).mean() < 1.0
  assert ops.resize(16)(_example(CAT))["image"].shape == (16, 16, 3)
  flat = np.full((20, 30, 3), 77, np.uint8)
  assert (ops.resize(7, method="bicubic")(_example(flat))["image"].numpy() == 77).all()
  with pytest.raises(ValueError, match="resize: method must be one of"):
    ops.resize(16, method="cubic")
  with pytest.raises(ValueError, match="resize: size must be a positive int"):
    ops.resize(0)


@pytest.mark.parametrize("method", ops.RESIZE_METHODS)
def test_resize_rounds_to_nearest_and_stays_in_range_for_every_method(method):
  # Hard 0/255 edges: kernels with negative lobes overshoot below 0 and above 255 and must be clipped;
  # the others may not be truncated (a bare cast would turn 254.6 into 254).
  edges = np.kron(np.array([[0, 255], [255, 0]], np.uint8), np.ones((6, 5), np.uint8))[..., None].repeat(3, -1)
  out = ops.resize((17, 23), method=method)(_example(edges))["image"].numpy().astype(int)
  exact = tf.image.resize(edges.astype(np.float32), (17, 23), method=method, antialias=True).numpy()
  np.testing.assert_array_equal(out, np.clip(np.floor(exact + 0.5), 0, 255))


@pytest.mark.parametrize("shape,expected", [((75, 113), (40, 60)), ((113, 75), (60, 40)), ((50, 50), (40, 40))])
def test_resize_small_sets_the_shorter_side_and_floors_the_longer(shape, expected):
  image = np.zeros(shape + (3,), np.uint8)
  assert ops.resize_small(40)(_example(image))["image"].shape == expected + (3,)


def _positions(h, w):
  """An image whose pixel (y, x) holds (y, x, 0): crops can be located exactly."""
  grid = np.stack(list(np.meshgrid(np.arange(h), np.arange(w), indexing="ij")) + [np.zeros((h, w), int)], -1)
  return grid.astype(np.uint8)


def test_central_crop_offsets_floor_odd_margins():
  out = ops.central_crop((5, 4))(_example(_positions(10, 11)))["image"].numpy()
  assert out.shape == (5, 4, 3)
  assert (out[0, 0, 0], out[0, 0, 1]) == (2, 3)  # margins 5 and 7: floor(2.5), floor(3.5)
  with pytest.raises(tf.errors.InvalidArgumentError):
    ops.central_crop(12)(_example(_positions(10, 11)))


def test_center_crop_fraction_is_timm_eval():
  # size 14 / 0.875 = 16: the shorter side is already 16, so only the crop acts; (21 - 14) / 2 = 3.5 rounds
  # to 4 like torchvision's CenterCrop, (16 - 14) / 2 = 1.
  out = ops.center_crop_fraction(14)(_example(_positions(16, 21)))["image"].numpy()
  assert out.shape == (14, 14, 3)
  assert (out[0, 0, 0], out[0, 0, 1]) == (1, 4)
  big = ops.center_crop_fraction(28, crop_fraction=0.875)(_example(CAT))["image"]
  assert big.shape == (28, 28, 3) and big.dtype == tf.uint8


def test_inception_crop_boxes_respect_area_and_ratio_ranges():
  h, w = 360, 360  # square: tall and wide crops fit equally often, so half the ratios are below 1
  area_min, area_max, ratio = 0.2, 0.6, (0.5, 2.0)
  areas, ratios = [], []
  for seed in range(300):
    top, left, ch, cw = (
      int(v)
      for v in ops.inception_crop_box(tf.constant([h, w]), tf.constant([seed, 5], tf.int64), area_min, area_max, ratio)
    )
    assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w
    areas.append(ch * cw / (h * w))
    ratios.append(cw / ch)
  areas, ratios = np.array(areas), np.array(ratios)
  slack = 0.02  # the sides are rounded to whole pixels
  assert areas.min() >= area_min - slack and areas.max() <= area_max + slack
  assert ratios.min() >= ratio[0] * (1 - slack) and ratios.max() <= ratio[1] * (1 + slack)
  # Uniform area, log-uniform ratio: both ends of each range are reached.
  assert areas.min() < 0.25 and areas.max() > 0.55
  assert np.mean(np.log(ratios) < 0) == pytest.approx(0.5, abs=0.1)


def test_inception_crop_falls_back_to_a_centred_clamped_crop():
  # A 10 x 200 strip: no crop with ratio <= 4/3 and area >= 0.9 fits, so the fallback takes the full height
  # and width round(10 * 4/3) = 13, centred.
  top, left, ch, cw = (
    int(v)
    for v in ops.inception_crop_box(tf.constant([10, 200]), tf.constant([0, 1], tf.int64), 0.9, 1.0, (3 / 4, 4 / 3))
  )
  assert (top, left, ch, cw) == (0, (200 - 13) // 2, 10, 13)


def test_inception_crop_output_and_determinism():
  op = ops.inception_crop(24)
  a = op(_example(CAT, rng=(3, 4)))
  assert a["image"].shape == (24, 24, 3) and a["image"].dtype == tf.uint8
  np.testing.assert_array_equal(a["image"], op(_example(CAT, rng=(3, 4)))["image"])
  assert not np.array_equal(a["image"], op(_example(CAT, rng=(3, 5)))["image"])
  # The example leaves with a fresh seed: the next random op does not reuse this one's draws.
  assert not np.array_equal(a["rng"], [3, 4])
  with pytest.raises(ValueError, match="area_min <= area_max"):
    ops.inception_crop(24, area_min=0.5, area_max=0.2)


# -- flip -------------------------------------------------------------------------------------------------------


def test_flip_lr_is_exact_and_half_the_time():
  op = ops.flip_lr()
  flipped = 0
  for seed in range(200):
    out = op(_example(CAT, rng=(seed, 0)))["image"].numpy()
    if np.array_equal(out, CAT[:, ::-1]):
      flipped += 1
    else:
      np.testing.assert_array_equal(out, CAT)
    np.testing.assert_array_equal(out, op(_example(CAT, rng=(seed, 0)))["image"].numpy())
  assert 70 <= flipped <= 130  # Binomial(200, 0.5): 6 standard deviations
  np.testing.assert_array_equal(ops.flip_lr(p=1.0)(_example(CAT))["image"], CAT[:, ::-1])


# -- normalize, onehot ------------------------------------------------------------------------------------------


def test_normalize_presets_and_numbers():
  image = np.array([[[0, 255, 51]]], np.uint8)
  out = ops.normalize("imagenet")(_example(image))["image"].numpy()
  assert out.dtype == np.float32
  expected = (np.array([0, 1, 0.2]) - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
  np.testing.assert_allclose(out[0, 0], expected, rtol=1e-5)
  inception = ops.normalize("inception")(_example(image))["image"].numpy()
  np.testing.assert_allclose(inception[0, 0], [-1, 1, -0.6], rtol=1e-5)
  np.testing.assert_allclose(ops.value_range(-1, 1)(_example(image))["image"], inception, atol=1e-6)
  np.testing.assert_allclose(ops.value_range(0, 1)(_example(image))["image"][0, 0], [0, 1, 0.2], rtol=1e-6)
  custom = ops.normalize(0.5, 0.25)(_example(image))["image"].numpy()
  np.testing.assert_allclose(custom[0, 0], [-2, 2, -1.2], rtol=1e-5)
  with pytest.raises(ValueError, match="normalize: a preset is one of"):
    ops.normalize("imagenett")
  with pytest.raises(ValueError, match="std > 0"):
    ops.normalize((0.5, 0.5, 0.5), (0.5, 0.0, 0.5))


def test_normalize_per_channel_over_a_whole_image():
  image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
  mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
  out = ops.normalize(mean, std)(_example(image))["image"].numpy()
  np.testing.assert_allclose(out, (image / 255.0 - mean) / std, rtol=1e-5, atol=1e-6)
  op = ops.normalize("imagenet")
  traced = tf.function(lambda x: op({"image": x})["image"])
  spec = traced.get_concrete_function(tf.TensorSpec([None, None, 3], tf.uint8))
  assert spec.structured_outputs.shape.as_list() == [None, None, 3]  # the static channel count survives
  batch = np.stack([image, image[::-1]])
  np.testing.assert_allclose(
    ops.normalize(mean, std)({"image": tf.constant(batch)})["image"], (batch / 255.0 - mean) / std, rtol=1e-5, atol=1e-6
  )  # any rank broadcasts
  with pytest.raises(ValueError, match="normalize: 3 channel means/stds for images of shape"):
    ops.normalize("imagenet")(_example(image[..., :1]))


def test_normalize_presets_are_the_published_numbers():
  from transformers import image_utils
  from lvm_jax import normalization

  assert (
    ops.NORMALIZATIONS["imagenet"]
    == normalization.IMAGENET_DEFAULT
    == (tuple(image_utils.IMAGENET_DEFAULT_MEAN), tuple(image_utils.IMAGENET_DEFAULT_STD))
  )
  assert (
    ops.NORMALIZATIONS["inception"]
    == normalization.IMAGENET_STANDARD
    == (tuple(image_utils.IMAGENET_STANDARD_MEAN), tuple(image_utils.IMAGENET_STANDARD_STD))
  )
  assert normalization.OPENAI_CLIP == (tuple(image_utils.OPENAI_CLIP_MEAN), tuple(image_utils.OPENAI_CLIP_STD))


def test_onehot_and_label_smoothing():
  plain = ops.onehot(5)(_example(CAT, label=2))["label"].numpy()
  np.testing.assert_array_equal(plain, [0, 0, 1, 0, 0])
  smooth = ops.onehot(10, smoothing=0.1)(_example(CAT, label=7))["label"].numpy()
  assert smooth.dtype == np.float32 and smooth.shape == (10,)
  assert smooth[7] == pytest.approx(0.91) and smooth[0] == pytest.approx(0.01)
  assert smooth.sum() == pytest.approx(1.0)
  with pytest.raises(tf.errors.InvalidArgumentError, match="num_classes=10"):
    ops.onehot(10)(_example(CAT, label=10))
  with pytest.raises(ValueError, match="smoothing must be in"):
    ops.onehot(10, smoothing=1.0)


def test_random_ops_need_an_rng():
  with pytest.raises(KeyError, match="example\\['rng'\\]"):
    ops.flip_lr()({"image": tf.constant(CAT)})


def test_train_chain_runs_inside_tf_data_deterministically():
  encoded = _encode(PIL.Image.fromarray(CAT), "JPEG")
  chain = [ops.decode(), ops.inception_crop(16), ops.flip_lr(), ops.normalize("imagenet"), ops.onehot(10)]

  def apply(example):
    for op in chain:
      example = op(example)
    return example

  def run():
    ds = tf.data.Dataset.range(6).map(
      lambda i: {"image": tf.constant(encoded), "label": i, "rng": tf.stack([i, tf.constant(9, tf.int64)])}
    )
    ds = ds.map(apply, num_parallel_calls=2, deterministic=True).batch(6)
    return next(iter(ds))

  first, second = run(), run()
  assert first["image"].shape == (6, 16, 16, 3) and first["label"].shape == (6, 10)
  np.testing.assert_array_equal(first["image"], second["image"])
  assert len({first["image"][i].numpy().tobytes() for i in range(6)}) == 6
  assert math.isclose(float(tf.reduce_sum(first["label"])), 6.0)


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_decode_inception_crop_equals_decode_then_inception_crop(fmt):
  """The fused op decodes only the crop window of a JPEG, and gives the same crop."""
  import io
  import PIL.Image
  import skimage.data

  buffer = io.BytesIO()
  PIL.Image.fromarray(skimage.data.astronaut()).save(buffer, format=fmt.upper())
  data = tf.constant(buffer.getvalue())
  fused = ops.decode_inception_crop(64)
  chained = [ops.decode(), ops.inception_crop(64)]
  for seed in range(5):
    example = {"image": data, "label": tf.constant(0, tf.int64), "rng": tf.constant([seed, 1], tf.int64)}
    expected = example
    for op in chained:
      expected = op(expected)
    got = fused(example)
    assert got["image"].shape == (64, 64, 3) and got["image"].dtype == tf.uint8
    diff = np.abs(got["image"].numpy().astype(int) - expected["image"].numpy().astype(int))
    if fmt == "png":
      assert diff.max() == 0
    else:  # the same window; chroma upsampling at the window's edge differs by a few levels in a few pixels
      assert diff.max() <= 4 and (diff > 0).mean() < 0.01
    np.testing.assert_array_equal(got["rng"].numpy(), expected["rng"].numpy())
