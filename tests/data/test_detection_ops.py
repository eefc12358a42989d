"""Box-aware detection ops: each keeps every box on its object's pixels, and random ones are fixed by their seed.

The test image holds three filled rectangles, pure red, green and blue on black, labelled 0, 1, 2 by channel. After
an op, the pixels where a rectangle's channel dominates must be bounded by its box (to within a pixel of
resampling), and a rectangle with no pixel left must have lost its box.
"""

import numpy as np
import pytest

from lvm_jax.data import detection_ops, pipeline, pp
from lvm_jax.tf_host import tf

HEIGHT, WIDTH = 60, 100
# (x1, y1, x2, y2) in pixels: red, green, blue.
RECTS = np.array([[10, 5, 30, 25], [50, 30, 95, 58], [35, 40, 45, 50]], np.float32)


def _example(rng=(1, 2)):
  image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
  for channel, (x1, y1, x2, y2) in enumerate(RECTS.astype(int)):
    image[y1:y2, x1:x2, channel] = 255
  return {
    "image": tf.io.encode_png(image),
    "boxes": tf.constant(RECTS),
    "labels": tf.constant([0, 1, 2], tf.int64),
    "image_id": tf.constant(42, tf.int64),
    "rng": tf.constant(rng, tf.int64),
  }


def _run(spec, rng=(1, 2)):
  out = pipeline._chain(pp.parse(spec))(_example(rng))
  return {k: v.numpy() for k, v in out.items()}


def _pixel_bounds(image, channel):
  """(x1, y1, x2, y2) of the pixels where `channel` dominates, or None."""
  others = [c for c in range(3) if c != channel]
  on = (image[..., channel] > 127) & (image[..., others] < 128).all(-1)
  if not on.any():
    return None
  rows, cols = np.flatnonzero(on.any(1)), np.flatnonzero(on.any(0))
  return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], np.float32)


def _check_boxes_follow_pixels(out, tolerance=1.0):
  """Each rectangle still in the image has exactly one box, matching its pixels; a vanished one has none."""
  mask = out.get("box_mask", np.ones(len(out["labels"])))
  boxes, labels = out["boxes"][mask > 0], out["labels"][mask > 0]
  for channel in range(3):
    seen = _pixel_bounds(out["image"], channel)
    mine = boxes[labels == channel]
    if seen is None:
      # No box, or a sliver under a pixel thick at a crop edge (too faint to pass the threshold).
      assert len(mine) == 0 or (mine[0, 2:] - mine[0, :2]).min() < 1.0, (channel, mine)
      continue
    assert len(mine) == 1, (channel, boxes, labels)
    np.testing.assert_allclose(mine[0], seen, atol=tolerance, err_msg=f"rectangle {channel}")


def test_det_decode_keeps_the_original_size_and_the_boxes():
  out = _run("det_decode")
  assert out["image"].shape == (HEIGHT, WIDTH, 3) and out["image"].dtype == np.uint8
  np.testing.assert_array_equal(out["orig_size"], [HEIGHT, WIDTH])
  assert out["orig_size"].dtype == np.int32 and out["scale"] == 1.0 and out["scale"].dtype == np.float32
  np.testing.assert_array_equal(out["boxes"], RECTS)
  _check_boxes_follow_pixels(out, tolerance=0)  # no resampling: exact


def test_resize_pad_to_a_square_canvas():
  out = _run("det_decode|det_resize_pad(128)")
  assert out["image"].shape == (128, 128, 3)
  assert out["scale"] == pytest.approx(1.28)
  # 100 -> 128 wide, 60 -> floor(76.8) = 76 high; the rest is zero padding at the bottom.
  assert out["image"][76:].max() == 0 and out["image"][:76, 50:].max() == 255
  np.testing.assert_allclose(out["boxes"], RECTS * [1.28, 76 / 60, 1.28, 76 / 60], rtol=1e-6)
  np.testing.assert_array_equal(out["orig_size"], [HEIGHT, WIDTH])
  _check_boxes_follow_pixels(out)
  # Mapping back: canvas box / scale is the original box to within a pixel of the size rounding.
  np.testing.assert_allclose(out["boxes"] / out["scale"], RECTS, atol=1.0)


@pytest.mark.parametrize(
  "size,max_size,expected_hw,expected_scale",
  [
    (80, 133, (79, 133), 1.33),  # shorter side to 80 would make the longer 133.3 > 133: the longer side wins
    (30, 1000, (30, 50), 0.5),  # shorter side to 30
    (120, 200, (120, 200), 2.0),
  ],
)
def test_resize_pad_follows_torchvisions_min_max_rule(size, max_size, expected_hw, expected_scale):
  # torchvision's GeneralizedRCNNTransform: scale = min(min_size / shorter, max_size / longer), sizes floored.
  scale = min(size / min(HEIGHT, WIDTH), max_size / max(HEIGHT, WIDTH))
  assert scale == pytest.approx(expected_scale)
  assert (int(HEIGHT * scale + 1e-9), int(WIDTH * scale + 1e-9)) == expected_hw
  out = _run(f"det_decode|det_resize_pad({size}, max_size={max_size})")
  canvas = 32 * -(-max_size // 32)
  assert out["image"].shape == (canvas, canvas, 3)
  assert out["scale"] == pytest.approx(expected_scale)
  h, w = expected_hw
  assert out["image"][h:].max() == 0 and out["image"][:, w:].max() == 0
  _check_boxes_follow_pixels(out)


def test_resize_pad_checks_its_canvas_when_parsed():
  with pytest.raises(ValueError, match=r"det_resize_pad.*canvas \(64, 64\) is smaller.*at least 100 x 100"):
    pp.parse("det_resize_pad(100, canvas=64)")
  with pytest.raises(ValueError, match="max_size.*must be at least size"):
    pp.parse("det_resize_pad(800, max_size=600)")
  assert pp.parse("det_resize_pad(64, canvas=(64, 96))")  # a canvas larger than needed is fine


def test_flip_mirrors_boxes_with_pixels():
  out = _run("det_decode|det_flip_lr(1.0)")
  np.testing.assert_array_equal(out["boxes"][0], [WIDTH - 30, 5, WIDTH - 10, 25])
  _check_boxes_follow_pixels(out, tolerance=0)
  same = _run("det_decode|det_flip_lr(0.0)")
  np.testing.assert_array_equal(same["boxes"], RECTS)
  twice = _run("det_decode|det_flip_lr(1.0)|det_flip_lr(1.0)")
  np.testing.assert_array_equal(twice["boxes"], RECTS)


def test_flip_is_drawn_from_the_example_seed():
  flips = [_run("det_decode|det_flip_lr(0.5)", rng=(seed, 0))["boxes"][0, 0] != 10 for seed in range(40)]
  assert 10 <= sum(flips) <= 30
  again = [_run("det_decode|det_flip_lr(0.5)", rng=(seed, 0))["boxes"][0, 0] != 10 for seed in range(40)]
  assert flips == again


@pytest.mark.parametrize("seed", range(8))
def test_scale_jitter_crops_and_pads_with_the_boxes(seed):
  """Factors 0.5-3 of a 64 px canvas: some seeds crop rectangles partly or wholly away, others pad."""
  out = _run("det_decode|det_scale_jitter(64, 0.5, 3.0)", rng=(seed, 5))
  assert out["image"].shape == (64, 64, 3)
  assert (out["boxes"] >= 0).all() and (out["boxes"] <= 64).all()
  assert (out["boxes"][:, 2:] > out["boxes"][:, :2]).all()  # boxes left with no area are gone
  _check_boxes_follow_pixels(out)
  assert out["image_id"] == 42 and out["orig_size"].tolist() == [HEIGHT, WIDTH]


def test_scale_jitter_drops_a_box_cropped_away_and_clips_one_cut_in_two():
  """At 3x of a 64 px canvas (fit 0.64) the image is 115 x 192: some crop windows miss the red rectangle."""
  outcomes = set()
  for seed in range(40):
    out = _run("det_decode|det_scale_jitter(64, 3.0, 3.0)", rng=(seed, 9))
    _check_boxes_follow_pixels(out)
    red = out["boxes"][out["labels"] == 0]
    full = 20 * 0.64 * 3
    outcomes.add("dropped" if len(red) == 0 else "clipped" if (red[0, 2:] - red[0, :2]).min() < full - 1 else "whole")
  assert outcomes == {"dropped", "clipped", "whole"}


def test_scale_jitter_is_deterministic_per_seed_and_spans_its_range():
  spec = "det_decode|det_scale_jitter(64)"  # large-scale jitter: 0.1-2.0
  a, b = _run(spec, rng=(3, 4)), _run(spec, rng=(3, 4))
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  fit = 64 / WIDTH
  factors = np.array([_run(spec, rng=(s, 1))["scale"] / fit for s in range(30)])
  assert factors.min() >= 0.1 - 1e-6 and factors.max() <= 2.0 + 1e-6
  assert factors.min() < 0.5 and factors.max() > 1.5  # the range is used, not one value
  assert len(set(np.round(factors, 5))) == 30


def test_pad_boxes_pads_to_a_fixed_count_with_a_mask():
  out = _run("det_decode|det_pad_boxes(5)")
  assert out["boxes"].shape == (5, 4) and out["boxes"].dtype == np.float32
  assert out["labels"].dtype == np.int32 and out["box_mask"].dtype == np.float32
  np.testing.assert_array_equal(out["box_mask"], [1, 1, 1, 0, 0])
  np.testing.assert_array_equal(out["boxes"][:3], RECTS)
  np.testing.assert_array_equal(out["labels"], [0, 1, 2, 0, 0])
  assert not out["boxes"][3:].any()


def test_pad_boxes_keeps_the_largest_in_their_order_when_there_are_too_many():
  boxes = tf.constant([[0, 0, 2, 2], [0, 0, 5, 5], [0, 0, 1, 1], [0, 0, 5, 5], [0, 0, 3, 3]], tf.float32)
  example = {"boxes": boxes, "labels": tf.constant([10, 11, 12, 13, 14], tf.int64)}
  out = detection_ops.det_pad_boxes(3)(example)
  np.testing.assert_array_equal(out["labels"], [11, 13, 14])
  np.testing.assert_array_equal(out["box_mask"], [1, 1, 1])
  tie = detection_ops.det_pad_boxes(1)(example)
  assert tie["labels"].numpy().tolist() == [11]  # equal areas: the earlier box


def test_pad_boxes_of_an_image_without_objects():
  example = {"boxes": tf.zeros([0, 4]), "labels": tf.zeros([0], tf.int64)}
  out = detection_ops.det_pad_boxes(4)(example)
  assert out["boxes"].shape == (4, 4) and not out["box_mask"].numpy().any()


def test_an_image_without_objects_passes_every_op():
  example = {**_example(), "boxes": tf.zeros([0, 4]), "labels": tf.zeros([0], tf.int64)}
  spec = "det_decode|det_flip_lr(1.0)|det_scale_jitter(64)|det_resize_pad(32)|det_pad_boxes(2)"
  out = pipeline._chain(pp.parse(spec))(example)
  assert out["image"].shape == (32, 32, 3) and out["boxes"].shape == (2, 4) and not out["box_mask"].numpy().any()


def test_detection_ops_name_what_a_classification_example_lacks():
  with pytest.raises(KeyError, match=r"det_flip_lr: the example has no 'boxes', 'labels'.*det_decode first"):
    pp.parse("det_flip_lr")[0]({"image": tf.zeros([4, 4, 3], tf.uint8), "label": tf.constant(1)})


@pytest.mark.parametrize(
  "spec,message",
  [
    ("det_pad_boxes(0)", "max_boxes must be a positive int"),
    ("det_scale_jitter(64, 2.0, 1.0)", "need 0 < min_scale <= max_scale"),
    ("det_flip_lr(2)", r"p must be a probability"),
    ("det_resize_pad(64, method='cubic')", "method must be one of"),
  ],
)
def test_bad_arguments_fail_when_parsed(spec, message):
  with pytest.raises(ValueError, match=message):
    pp.parse(spec)
