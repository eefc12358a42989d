"""Batch ops: mixup and cutmix mix labels with exactly the pixels' weights, lambda ~ Beta, and the switch."""

import numpy as np
import pytest
import scipy.stats
import tensorflow as tf

from lvm_jax.data import mix


def _batch(size=4, hw=(8, 10), seed=(5, 6), classes=4):
  """Example i is the constant image i (so mixed values reveal the weights) with one-hot label i % classes."""
  images = np.broadcast_to(np.arange(size, dtype=np.float32)[:, None, None, None], (size,) + hw + (3,))
  rng = tf.random.experimental.stateless_split(tf.constant(seed, tf.int64), size)
  return {"image": tf.constant(images), "label": tf.one_hot(np.arange(size) % classes, classes), "rng": rng}


def test_mixup_mixes_labels_with_the_image_lambda():
  batch = _batch()
  out = mix.mixup(0.4)(batch)
  image, label = out["image"].numpy(), out["label"].numpy()
  # image 0 = lam * 0 + (1 - lam) * 3, so lam = 1 - value / 3; every example shares it.
  lam = 1 - image[0, 0, 0, 0] / 3
  np.testing.assert_allclose(image[:, 0, 0, 0], lam * np.arange(4) + (1 - lam) * np.arange(4)[::-1], atol=1e-5)
  assert (image == image[:, :1, :1, :1]).all()
  expected = lam * np.eye(4) + (1 - lam) * np.eye(4)[::-1]
  np.testing.assert_allclose(label, expected, atol=1e-5)
  np.testing.assert_allclose(label.sum(-1), 1, atol=1e-6)


def test_mixup_lambda_follows_beta_alpha_alpha():
  op = mix.mixup(0.4)
  lams = []
  for seed in range(400):
    out = op(_batch(size=2, hw=(1, 1), seed=(seed, 1)))
    lams.append(1 - float(out["image"][0, 0, 0, 0]))  # image 0 = (1 - lam) * 1
  assert scipy.stats.kstest(lams, scipy.stats.beta(0.4, 0.4).cdf).pvalue > 1e-3
  # And not some other Beta: a U-shaped alpha=0.4 is far from alpha=2.
  assert scipy.stats.kstest(lams, scipy.stats.beta(2, 2).cdf).pvalue < 1e-6


def test_cutmix_label_weight_is_the_pasted_area_exactly():
  op = mix.cutmix(1.0)
  pasted_fractions = []
  for seed in range(60):
    out = op(_batch(size=2, hw=(12, 16), seed=(seed, 2), classes=2))
    image, label = out["image"].numpy()[..., 0], out["label"].numpy()
    pasted = image[0] == 1  # example 0 is all zeros, its partner all ones
    fraction = pasted.mean()
    if pasted.any():  # the pasted region is one axis-aligned box
      rows, cols = np.nonzero(pasted.any(1))[0], np.nonzero(pasted.any(0))[0]
      assert pasted[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all() and pasted.sum() == len(rows) * len(cols)
    np.testing.assert_allclose(label[0], [1 - fraction, fraction], atol=1e-6)
    np.testing.assert_array_equal(image[1] == 0, pasted)  # the partner received the same box
    pasted_fractions.append(fraction)
  # Beta(1, 1) boxes of area (1 - lam), clipped at the border: varied, and on average well below one half.
  assert 0.15 < np.mean(pasted_fractions) < 0.5 and np.std(pasted_fractions) > 0.1


@pytest.mark.parametrize("switch_prob", [0.0, 1.0, 0.5])
def test_mixup_cutmix_switches_with_switch_prob(switch_prob):
  op = mix.mixup_cutmix(mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=switch_prob)
  cutmixed = 0
  for seed in range(80):
    image = op(_batch(size=2, hw=(6, 6), seed=(seed, 3)))["image"].numpy()
    values = np.unique(image[0])
    is_cutmix = set(values) <= {0.0, 1.0}
    assert is_cutmix or len(values) == 1  # mixup: one blended value everywhere
    cutmixed += is_cutmix
  if switch_prob in (0.0, 1.0):  # never / always cutmix: no room for chance
    assert cutmixed == 80 * switch_prob
  else:
    assert scipy.stats.binomtest(cutmixed, 80, switch_prob).pvalue > 1e-3, cutmixed


def test_only_one_alpha_turns_the_other_off():
  image = mix.mixup_cutmix(mixup_alpha=0.0, cutmix_alpha=1.0)(_batch(size=2, hw=(6, 6)))["image"].numpy()
  assert set(np.unique(image)) <= {0.0, 1.0}
  with pytest.raises(ValueError, match="both 0"):
    mix.mixup_cutmix(0.0, 0.0)


def test_same_rng_same_batch_different_rng_different_batch():
  op = mix.mixup_cutmix()
  a, b = op(_batch(seed=(1, 1))), op(_batch(seed=(1, 1)))
  np.testing.assert_array_equal(a["image"], b["image"])
  np.testing.assert_array_equal(a["label"], b["label"])
  outputs = {op(_batch(seed=(s, 1)))["label"].numpy().tobytes() for s in range(5)}
  assert len(outputs) == 5
  # Row 0 of the rng was consumed and replaced; the other rows are untouched.
  before = _batch(seed=(1, 1))["rng"].numpy()
  assert not np.array_equal(a["rng"][0], before[0])
  np.testing.assert_array_equal(a["rng"][1:], before[1:])


def test_runs_after_batching_in_tf_data():
  batch = _batch(size=4)
  ds = tf.data.Dataset.from_tensor_slices(batch).batch(4).map(mix.mixup_cutmix())
  out = next(iter(ds))
  assert out["image"].shape == (4, 8, 10, 3) and out["label"].shape == (4, 4)
  assert mix.mixup_cutmix().batch_op and mix.mixup(0.2).batch_op and mix.cutmix(1.0).batch_op


def test_uint8_images_mix_as_float_in_pixel_units():
  """Pipelines that normalize on the devices mix uint8 batches: the result is float32 in 0..255."""
  batch = _batch()
  pixels = tf.cast(tf.round(tf.clip_by_value(batch["image"] * 50 + 128, 0, 255)), tf.uint8)
  out = mix.mixup(0.4)({**batch, "image": pixels})
  assert out["image"].dtype == tf.float32
  as_float = mix.mixup(0.4)({**batch, "image": tf.cast(pixels, tf.float32)})
  np.testing.assert_allclose(out["image"].numpy(), as_float["image"].numpy(), atol=1e-4)
  assert 0 <= out["image"].numpy().min() and out["image"].numpy().max() <= 255


def test_clear_errors_for_wrong_inputs():
  batch = _batch()
  with pytest.raises(TypeError, match="expects a batch of images"):
    mix.mixup(0.2)({**batch, "image": tf.zeros([4, 8, 3], tf.int32)})
  with pytest.raises(TypeError, match="put onehot"):
    mix.cutmix(1.0)({**batch, "label": tf.range(4, dtype=tf.int64)})
  with pytest.raises(ValueError, match="mixup: alpha must be a positive number"):
    mix.mixup(0)
