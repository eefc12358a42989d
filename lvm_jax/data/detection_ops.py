"""Box-aware per-example ops for detection: decode, resize + pad to a canvas, flip, scale jitter, box padding.

An example from a DetectionSource carries "boxes" (float32 [n, 4], x1, y1, x2, y2 in pixels of the current
image: pixel (row i, column j) covers [j, j + 1) x [i, i + 1)), "labels" ([n]) and "image_id". Every op here
moves the boxes with the pixels, so a box bounds the same object before and after. `det_decode` adds
"orig_size" (int32 [2], the decoded height and width) and "scale" (float32, canvas pixels per original pixel),
which the resizing ops update: a detection on the canvas maps back to the original image as box / scale.

A typical pp, training then evaluation (RetinaNet at 800 px, torchvision's transform; padded to 1344):

    det_decode|det_flip_lr|det_resize_pad(800, max_size=1333)|det_pad_boxes(100)
    det_decode|det_resize_pad(800, max_size=1333)|det_pad_boxes(100)

and large-scale jitter (the v2 recipe): det_decode|det_flip_lr|det_scale_jitter(1024, 0.1, 2.0)|det_pad_boxes(100).
Ops are factories like lvm_jax/data/ops.py's, and random ones draw from example["rng"] alone (ops.take_rng).
"""

import math
from typing import Optional

from lvm_jax.data import ops
from lvm_jax.tf_host import tf

# Keys that hold one row per box: filtered together when boxes leave the image.
PER_BOX_KEYS = ("boxes", "labels")
# torchvision pads batches to a multiple of 32 (size_divisible), which also suits FPN strides up to 32.
CANVAS_MULTIPLE = 32


def _require(example: dict, keys, op: str) -> None:
  missing = [k for k in keys if k not in example]
  if missing:
    raise KeyError(
      f"{op}: the example has no {', '.join(map(repr, missing))} (it has {', '.join(map(repr, example))}); "
      "detection ops need a detection source (boxes, labels) and det_decode first."
    )


def _positive_int(value, name: str, op: str) -> int:
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    raise ValueError(f"{op}: {name} must be a positive int, got {value!r}.")
  return value


def det_decode():
  """Encoded bytes -> RGB uint8 [H, W, 3] (as ops.decode), plus "orig_size" (int32 [2]: H, W) and "scale" 1.0."""
  decode = ops.decode()

  def op(example):
    _require(example, PER_BOX_KEYS, "det_decode")
    example = decode(example)
    return {
      **example,
      "boxes": tf.ensure_shape(tf.cast(example["boxes"], tf.float32), [None, 4]),
      "orig_size": tf.shape(example["image"], out_type=tf.int32)[:2],
      "scale": tf.constant(1.0, tf.float32),
    }

  return op


def _resized_size(height, width, scale):
  """The (height, width) an image takes at `scale`: rounded down (as torchvision), at least 1 pixel."""
  # The 1e-6 keeps a side that the scale maps exactly onto the target (size / side * side) from flooring to
  # one pixel less through float rounding.
  new = tf.floor(tf.stack([height, width]) * scale + 1e-6)
  return tf.cast(tf.maximum(new, 1.0), tf.int32)


def _resize_with_boxes(example, scale, method):
  """The image resized by `scale` and the boxes with it (per axis, by the exact ratio of the integer sizes)."""
  image = example["image"]
  size = tf.cast(tf.shape(image)[:2], tf.float64)
  new_size = _resized_size(size[0], size[1], scale)
  ratio = tf.cast(new_size, tf.float32) / tf.cast(size, tf.float32)  # (y, x)
  resized = ops._resize_uint8(image, new_size, method, True)
  boxes = example["boxes"] * tf.stack([ratio[1], ratio[0], ratio[1], ratio[0]])
  scale_so_far = example.get("scale", tf.constant(1.0, tf.float32))
  return {**example, "image": resized, "boxes": boxes, "scale": scale_so_far * tf.cast(scale, tf.float32)}


def _pad_to(image, canvas):
  """`image` on a (height, width) canvas at the top left, zeros below and right."""
  padded = tf.image.pad_to_bounding_box(image, 0, 0, canvas[0], canvas[1])
  return tf.ensure_shape(padded, [canvas[0], canvas[1], 3])


def det_resize_pad(size: int, max_size: Optional[int] = None, canvas=None, method: str = "bilinear"):
  """Resize keeping the aspect ratio, then pad (bottom/right, zeros) to a fixed canvas.

  Without max_size the longer side becomes `size` (a fixed square canvas, size x size). With max_size it is
  torchvision's GeneralizedRCNNTransform rule: the shorter side becomes `size` unless that makes the longer
  side exceed max_size, in which case the longer side becomes max_size; sides round down. Boxes scale with the
  pixels, "scale" is multiplied by the factor used.

  Args:
    size: the longer side (no max_size), or the shorter side's target (torchvision's min_size).
    max_size: the longer side's limit (torchvision's max_size), or None.
    canvas: the padded (height, width) or an int for a square; default size x size without max_size, else
      max_size rounded up to a multiple of 32, square (every image of either orientation fits). Smaller than
      what a resized image may take is an error.
    method: the resize method (ops.RESIZE_METHODS); antialiased, so shrinking does not alias.
  """
  name = "det_resize_pad"
  size = _positive_int(size, "size", name)
  longest = size
  if max_size is not None:
    longest = _positive_int(max_size, "max_size", name)
    if max_size < size:
      raise ValueError(f"{name}: max_size ({max_size}) must be at least size ({size}).")
  if canvas is None:
    canvas = size if max_size is None else CANVAS_MULTIPLE * math.ceil(max_size / CANVAS_MULTIPLE)
  canvas = ops._size(canvas, name)
  if min(canvas) < longest:
    raise ValueError(
      f"{name}: canvas {canvas} is smaller than a resized image may be ({longest} on its longer side, either "
      f"orientation); make it at least {longest} x {longest}."
    )
  ops._resize_uint8(tf.zeros([1, 1, 3]), (1, 1), method, True)  # a bad method fails when the pp is parsed

  def op(example):
    _require(example, PER_BOX_KEYS, name)
    shape = tf.cast(tf.shape(example["image"])[:2], tf.float64)
    shorter, longer = tf.reduce_min(shape), tf.reduce_max(shape)
    scale = size / longer if max_size is None else tf.minimum(size / shorter, max_size / longer)
    example = _resize_with_boxes(example, scale, method)
    return {**example, "image": _pad_to(example["image"], canvas)}

  return op


def det_flip_lr(p: float = 0.5):
  """Mirror the image and its boxes left-right with probability p (x -> width - x)."""
  if not 0 <= p <= 1:
    raise ValueError(f"det_flip_lr: p must be a probability in [0, 1], got {p!r}.")

  def op(example):
    _require(example, PER_BOX_KEYS, "det_flip_lr")
    rng, example = ops.take_rng(example)
    image, boxes = example["image"], example["boxes"]
    width = tf.cast(tf.shape(image)[1], tf.float32)
    flipped_boxes = tf.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], axis=1)
    flip = tf.random.stateless_uniform([], rng) < p
    image = tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)
    boxes = tf.cond(flip, lambda: flipped_boxes, lambda: boxes)
    return {**example, "image": image, "boxes": boxes}

  return op


def _keep_boxes(example, keep):
  return {**example, **{k: tf.boolean_mask(example[k], keep) for k in PER_BOX_KEYS}}


def det_scale_jitter(size, min_scale: float = 0.1, max_scale: float = 2.0, method: str = "bilinear"):
  """Random resize then a random crop (or padding) to a fixed canvas: scale jitter, large-scale jitter (LSJ,
  Ghiasi et al. 2021) with the defaults, as torchvision's ScaleJitter + FixedSizeCrop for its v2 recipe.

  The image is resized so that it would just fit the canvas, times a factor drawn uniformly from
  [min_scale, max_scale]; a side longer than the canvas is cropped at a uniformly drawn offset, a shorter one
  padded with zeros (bottom/right). Boxes move with the pixels, are clipped to the image left on the canvas,
  and a box left with no area is dropped with its label.

  Args:
    size: the canvas (height, width), or an int for a square.
    min_scale, max_scale: the range of the random factor (0 < min_scale <= max_scale).
    method: the resize method (ops.RESIZE_METHODS); antialiased.
  """
  name = "det_scale_jitter"
  canvas = ops._size(size, name)
  if not 0 < min_scale <= max_scale:
    raise ValueError(f"{name}: need 0 < min_scale <= max_scale, got {min_scale!r}, {max_scale!r}.")
  ops._resize_uint8(tf.zeros([1, 1, 3]), (1, 1), method, True)

  def op(example):
    _require(example, PER_BOX_KEYS, name)
    rng, example = ops.take_rng(example)
    uniform = tf.random.stateless_uniform([3], rng, dtype=tf.float64)
    factor, offset_u = min_scale + (max_scale - min_scale) * uniform[0], uniform[1:]
    shape = tf.cast(tf.shape(example["image"])[:2], tf.float64)
    fit = tf.minimum(canvas[0] / shape[0], canvas[1] / shape[1])
    example = _resize_with_boxes(example, fit * factor, method)
    image = example["image"]
    new_size = tf.shape(image)[:2]
    excess = tf.maximum(new_size - tf.constant(canvas), 0)  # (y, x): room for the crop's offset
    offset = tf.cast(tf.floor(offset_u * tf.cast(excess + 1, tf.float64)), tf.int32)
    offset = tf.minimum(offset, excess)
    kept = tf.minimum(new_size, tf.constant(canvas))  # the image's extent on the canvas
    image = tf.slice(image, tf.stack([offset[0], offset[1], 0]), tf.stack([kept[0], kept[1], 3]))
    shift = tf.cast(tf.stack([offset[1], offset[0], offset[1], offset[0]]), tf.float32)
    limit = tf.cast(tf.stack([kept[1], kept[0], kept[1], kept[0]]), tf.float32)
    boxes = tf.clip_by_value(example["boxes"] - shift, 0.0, limit)
    example = {**example, "image": _pad_to(image, canvas), "boxes": boxes}
    return _keep_boxes(example, (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]))

  return op


def det_pad_boxes(max_boxes: int):
  """Boxes and labels padded to a fixed count, with "box_mask" (float32, 1 for a real box, 0 for padding).

  Output: "boxes" float32 [max_boxes, 4], "labels" int32 [max_boxes], padded rows all zeros. An image with more
  than max_boxes boxes keeps its max_boxes largest by area (ties: the earlier box), in their original order:
  choose max_boxes above the dataset's most crowded image (COCO train2017: 93 non-crowd) so none is dropped; a
  dropped box would be trained as background.
  """
  max_boxes = _positive_int(max_boxes, "max_boxes", "det_pad_boxes")

  def op(example):
    _require(example, PER_BOX_KEYS, "det_pad_boxes")
    boxes, labels = tf.cast(example["boxes"], tf.float32), tf.cast(example["labels"], tf.int32)
    count = tf.shape(boxes)[0]
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    largest = tf.sort(tf.math.top_k(area, k=tf.minimum(count, max_boxes)).indices)
    boxes, labels = tf.gather(boxes, largest), tf.gather(labels, largest)
    padding = max_boxes - tf.shape(boxes)[0]
    return {
      **example,
      "boxes": tf.ensure_shape(tf.pad(boxes, [[0, padding], [0, 0]]), [max_boxes, 4]),
      "labels": tf.ensure_shape(tf.pad(labels, [[0, padding]]), [max_boxes]),
      "box_mask": tf.ensure_shape(tf.pad(tf.ones(tf.shape(labels), tf.float32), [[0, padding]]), [max_boxes]),
    }

  return op
