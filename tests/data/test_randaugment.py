"""RandAugment: each op against PIL's ImageOps/ImageEnhance, geometry, timm's magnitude scale, randomness."""

import numpy as np
import PIL.Image
import PIL.ImageEnhance
import PIL.ImageOps
import pytest
import skimage.data
import tensorflow as tf

from lvm_jax.data import ops
from lvm_jax.data import randaugment as ra

PHOTOS = {
  "chelsea": skimage.data.chelsea()[::5, ::5].copy(),
  "astronaut": skimage.data.astronaut()[::8, ::8].copy(),
  "coffee": skimage.data.coffee()[::6, ::6].copy(),
}
CAT = PHOTOS["chelsea"]
GEOMETRIC = ["Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"]


def _same(ours, reference, tolerance=0):
  error = np.abs(np.asarray(ours).astype(int) - np.asarray(reference).astype(int))
  assert error.max() <= tolerance, f"max error {error.max()} at {np.unravel_index(error.argmax(), error.shape)}"


def _augment(image, seed=(1, 2), **kwargs):
  example = {"image": tf.constant(image), "rng": tf.constant(seed, tf.int64)}
  return ra.randaugment(**kwargs)(example)["image"].numpy()


# -- pixel ops against PIL --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PHOTOS))
def test_lookup_table_ops_equal_pil(name):
  image = PHOTOS[name]
  pil = PIL.Image.fromarray(image)
  _same(ra.invert(tf.constant(image)), PIL.ImageOps.invert(pil))
  _same(ra.autocontrast(tf.constant(image)), PIL.ImageOps.autocontrast(pil))
  _same(ra.equalize(tf.constant(image)), PIL.ImageOps.equalize(pil))
  for bits in (1, 3, 4):
    _same(ra.posterize(tf.constant(image), bits), PIL.ImageOps.posterize(pil, bits))
  for threshold in (0, 128, 230, 256):
    _same(ra.solarize(tf.constant(image), threshold), PIL.ImageOps.solarize(pil, threshold))


def test_autocontrast_and_equalize_leave_flat_channels_alone():
  image = CAT.copy()
  image[..., 1] = 90  # one flat channel: PIL keeps it, and so must we, while stretching the others
  pil = PIL.Image.fromarray(image)
  for ours, theirs in [(ra.autocontrast, PIL.ImageOps.autocontrast), (ra.equalize, PIL.ImageOps.equalize)]:
    out = ours(tf.constant(image)).numpy()
    assert (out[..., 1] == 90).all()
    _same(out, theirs(pil))
  # A low-contrast image really is stretched to the full range.
  dull = (CAT // 4 + 100).astype(np.uint8)
  stretched = ra.autocontrast(tf.constant(dull)).numpy()
  assert stretched.min() == 0 and stretched.max() == 255


def test_posterize_zero_bits_is_black_and_solarize_add_definition():
  assert (ra.posterize(tf.constant(CAT), 0).numpy() == 0).all()
  out = ra.solarize_add(tf.constant(CAT), 100).numpy().astype(int)
  expected = np.where(CAT < 128, np.minimum(CAT.astype(int) + 100, 255), CAT)
  _same(out, expected)


@pytest.mark.parametrize("factor", [0.1, 0.5, 1.0, 1.72])
@pytest.mark.parametrize(
  "ours,theirs",
  [
    (ra.brightness, PIL.ImageEnhance.Brightness),
    (ra.contrast, PIL.ImageEnhance.Contrast),
    (ra.color, PIL.ImageEnhance.Color),
    (ra.sharpness, PIL.ImageEnhance.Sharpness),
  ],
  ids=["Brightness", "Contrast", "Color", "Sharpness"],
)
def test_enhance_ops_equal_pil(ours, theirs, factor):
  for image in PHOTOS.values():
    _same(ours(tf.constant(image), factor), theirs(PIL.Image.fromarray(image)).enhance(factor), tolerance=1)


# -- geometric ops ----------------------------------------------------------------------------------------------


def test_rotate_quarter_turn_is_exact_and_counter_clockwise():
  square = CAT[:40, :40]
  _same(ra.rotate(tf.constant(square), 90.0), np.rot90(square))
  _same(ra.rotate(tf.constant(square), -90.0), np.rot90(square, -1))


def test_translate_by_whole_pixels_shifts_and_fills():
  fill = (124, 116, 104)
  out = ra.translate_x(tf.constant(CAT), 7.0, fill).numpy()
  _same(out[:, :-7], CAT[:, 7:])
  assert (out[:, -7:] == fill).all()
  out = ra.translate_y(tf.constant(CAT), -5.0, fill).numpy()
  _same(out[5:], CAT[:-5])
  assert (out[:5] == fill).all()


def test_shear_and_rotate_follow_pil_affine_conventions():
  pil = PIL.Image.fromarray(CAT)
  fill = (124, 116, 104)
  pairs = [
    (
      ra.shear_x(tf.constant(CAT), 0.3, fill),
      pil.transform(pil.size, PIL.Image.AFFINE, (1, 0.3, 0, 0, 1, 0), PIL.Image.BILINEAR, fillcolor=fill),
    ),
    (
      ra.shear_y(tf.constant(CAT), -0.2, fill),
      pil.transform(pil.size, PIL.Image.AFFINE, (1, 0, 0, -0.2, 1, 0), PIL.Image.BILINEAR, fillcolor=fill),
    ),
    (ra.rotate(tf.constant(CAT), 20.0, fill), pil.rotate(20, PIL.Image.BILINEAR, fillcolor=fill)),
  ]
  for ours, theirs in pairs:
    error = np.abs(ours.numpy().astype(int) - np.asarray(theirs).astype(int))
    # Same sampling inside; only the one-pixel seam where the image meets the fill differs (we blend it).
    assert (error > 2).mean() < 0.03


# -- the randaugment op -----------------------------------------------------------------------------------------


def test_magnitude_zero_is_identity_only_for_geometric_ops_and_solarize_add():
  same = _augment(CAT, num_layers=4, magnitude=0, prob=1.0, ops=GEOMETRIC + ["SolarizeAdd"])
  _same(same, CAT)
  # timm's scale has no identity at 0 for these: 0 bits, threshold 0, enhance factor 0.1.
  _same(_augment(CAT, num_layers=1, magnitude=0, prob=1.0, ops=["Posterize"]), np.zeros_like(CAT))
  _same(_augment(CAT, num_layers=1, magnitude=0, prob=1.0, ops=["Solarize"]), 255 - CAT)
  _same(_augment(CAT, num_layers=1, magnitude=0, prob=1.0, ops=["Brightness"]), ra.brightness(CAT, 0.1))


def test_magnitude_nine_uses_timms_arguments():
  def one(name, seed=(1, 2)):
    return _augment(CAT, seed, num_layers=1, magnitude=9, prob=1.0, ops=[name])

  _same(one("Posterize"), ra.posterize(tf.constant(CAT), 3))  # int(0.9 * 4) bits
  _same(one("Solarize"), ra.solarize(tf.constant(CAT), 230))  # int(0.9 * 256)
  _same(one("SolarizeAdd"), ra.solarize_add(tf.constant(CAT), 99))  # int(0.9 * 110)
  _same(one("Contrast"), ra.contrast(tf.constant(CAT), 0.9 * 1.8 + 0.1))
  # Rotate: 27 degrees with a random sign; both signs occur.
  plus = ra.rotate(tf.constant(CAT), 27.0, ra.IMAGENET_FILL)
  minus = ra.rotate(tf.constant(CAT), -27.0, ra.IMAGENET_FILL)
  signs = set()
  for seed in range(12):
    out = one("Rotate", (seed, 0))
    signs.add(+1 if np.array_equal(out, plus) else -1 if np.array_equal(out, minus) else 0)
  assert signs == {1, -1}


def test_prob_and_num_layers_zero_do_nothing_and_prob_one_always_changes():
  _same(_augment(CAT, num_layers=3, magnitude=9, prob=0.0), CAT)
  _same(_augment(CAT, num_layers=0, magnitude=9), CAT)
  for seed in range(5):
    assert not np.array_equal(_augment(CAT, (seed, 1), num_layers=1, magnitude=9, prob=1.0, ops=["Invert"]), CAT)


def test_deterministic_per_seed_and_varied_across_seeds():
  a = _augment(CAT, (4, 4))
  _same(_augment(CAT, (4, 4)), a)
  outputs = {_augment(CAT, (s, 4)).tobytes() for s in range(10)}
  assert len(outputs) >= 6  # some draws skip both layers (p = 1/4) or pick pixel-identical results


def test_every_op_traces_in_tf_data_on_unknown_shapes():
  encoded = tf.io.encode_png(tf.constant(CAT))
  ds = tf.data.Dataset.from_tensors({"image": encoded, "rng": tf.constant([0, 0], tf.int64)}).map(ops.decode())
  assert ds.element_spec["image"].shape.as_list() == [None, None, 3]
  for name in ra.OPS:
    out = next(iter(ds.map(ra.randaugment(2, 9, prob=1.0, ops=[name]))))["image"]
    assert out.dtype == tf.uint8 and out.shape == CAT.shape, name


def test_clear_errors():
  with pytest.raises(ValueError, match="unknown ops \\['Rotat'\\]"):
    ra.randaugment(ops=["Rotat"])
  with pytest.raises(ValueError, match="magnitude must be a number in \\[0, 10\\]"):
    ra.randaugment(2, 12)
  with pytest.raises(TypeError, match="run it before normalize"):
    ra.randaugment()({"image": tf.zeros([4, 4, 3]), "rng": tf.constant([0, 0], tf.int64)})
