"""Per-example preprocessing ops: decode, resize, crops, flip, normalize, onehot.

Every op is a factory: `name(*args, **kwargs)` returns a function example -> example on one unbatched example
(a dict of tf tensors, see lvm_jax/data/pp.py). Random ops draw only from stateless TF random ops seeded by
example["rng"], taking one half of a split and putting the other half back, so an example's output depends on
its seed alone. Images stay uint8 until normalize (or value_range) turns them into float32.
"""

import math
from typing import Sequence, Union

from lvm_jax import normalization
from lvm_jax.data import native
from lvm_jax.tf_host import tf

Size = Union[int, Sequence[int]]

# The presets of data.normalize and the normalize op, in 0..1 units.
NORMALIZATIONS = {
  "imagenet": normalization.IMAGENET_DEFAULT,
  "inception": normalization.IMAGENET_STANDARD,
}
RESIZE_METHODS = ("bilinear", "bicubic", "nearest", "area", "lanczos3", "lanczos5", "gaussian", "mitchellcubic")
OVERSHOOTING_METHODS = ("bicubic", "lanczos3", "lanczos5", "mitchellcubic")  # negative lobes: may leave 0..255


def take_rng(example: dict) -> tuple[tf.Tensor, dict]:
  """A fresh seed for this op, and the example with the other half of the split as its new rng."""
  if "rng" not in example:
    raise KeyError(
      "Random preprocessing ops need example['rng'] (a tf.int64 [2] stateless seed); the pipeline "
      "adds it before the ops run."
    )
  use, rest = tf.unstack(tf.random.experimental.stateless_split(example["rng"], 2))
  return use, {**example, "rng": rest}


def _size(size: Size, op: str) -> tuple[int, int]:
  """(height, width) from an int or a pair, with a clear error for anything else."""
  pair = (size, size) if isinstance(size, int) else tuple(size)
  if len(pair) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in pair):
    raise ValueError(f"{op}: size must be a positive int or a (height, width) pair of them, got {size!r}.")
  return pair


def _to_uint8(image: tf.Tensor) -> tf.Tensor:
  return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def _resize_uint8(image, size, method="bilinear", antialias=True):
  if method not in RESIZE_METHODS:
    raise ValueError(f"resize: method must be one of {RESIZE_METHODS}, got {method!r}.")
  # TF's resize kernels read float32 far faster than uint8, so casting first is the cheaper path overall.
  resized = tf.image.resize(tf.cast(image, tf.float32), size, method=method, antialias=antialias)
  if method in OVERSHOOTING_METHODS:
    return _to_uint8(resized)
  # Weights >= 0 keep values inside 0..255, so rounding half up is one add and a truncating cast.
  return tf.cast(resized + 0.5, tf.uint8)


def _native_crop_resize(method: str, antialias: bool):
  """lvm_jax.data.native's crop + resize kernel where it applies (bilinear, no antialiasing) and is built."""
  library = native.library() if method == "bilinear" and not antialias else None
  return None if library is None else library.lvm_crop_resize_bilinear


def _rows(image, top, count):
  """Rows [top, top + count) of an image, keeping its static width and channel count (a -1 slice size hides them)."""
  rows = tf.slice(image, tf.stack([top, 0, 0]), tf.stack([count, -1, -1]))
  rows.set_shape([None] + image.shape[1:].as_list())
  return rows


def _resize_columns(rows, left, crop_width, size, method, antialias):
  """Columns [left, left + crop_width) of `rows` (all of the crop's rows), resized to `size`, as uint8."""
  kernel = _native_crop_resize(method, antialias)
  if kernel is not None:
    return kernel(rows, left, crop_width, size)
  crop = tf.slice(rows, tf.stack([0, left, 0]), tf.stack([-1, crop_width, -1]))
  crop.set_shape([None, None, rows.shape[-1]])  # a -1 slice size would otherwise hide the channel count
  return _resize_uint8(crop, size, method, antialias)


def decode():
  """Encoded JPEG/PNG/GIF/BMP bytes -> RGB uint8 [H, W, 3].

  tf.io.decode_image with channels=3 replicates grayscale, drops alpha (as PIL's convert("RGB")), expands
  palettes, converts CMYK JPEGs (within 2 levels of PIL) and takes the high byte of 16-bit PNGs
  (65535 -> 255, like lvm_jax.tasks.images). Animated GIFs give their first frame.
  """

  def op(example):
    image = tf.io.decode_image(example["image"], channels=3, dtype=tf.uint8, expand_animations=False)
    image.set_shape([None, None, 3])
    return {**example, "image": image}

  return op


def resize(size: Size, method: str = "bilinear", antialias: bool = True):
  """Resize to exactly `size` (an int for a square); antialiased so downscaling does not alias, like PIL."""
  size = _size(size, "resize")
  _resize_uint8(tf.zeros([1, 1, 3]), size, method, antialias)  # fail at parse time on a bad method

  def op(example):
    return {**example, "image": _resize_uint8(example["image"], size, method, antialias)}

  return op


def _resize_shorter(image, size, method, antialias):
  """Shorter side to `size`, longer side rounded down (torchvision's Resize(int), timm's eval)."""
  shape = tf.shape(image)
  h, w = tf.cast(shape[0], tf.float64), tf.cast(shape[1], tf.float64)
  scale = size / tf.minimum(h, w)
  new_h = tf.where(h <= w, size, tf.cast(tf.floor(h * scale), tf.int32))
  new_w = tf.where(w < h, size, tf.cast(tf.floor(w * scale), tf.int32))
  return _resize_uint8(image, tf.stack([new_h, new_w]), method, antialias)


def resize_small(size: int, method: str = "bilinear", antialias: bool = True):
  """Resize so the shorter side is `size`, keeping the aspect ratio."""
  if not isinstance(size, int) or size <= 0:
    raise ValueError(f"resize_small: size must be a positive int (the shorter side), got {size!r}.")
  _resize_uint8(tf.zeros([1, 1, 3]), (1, 1), method, antialias)

  def op(example):
    return {**example, "image": _resize_shorter(example["image"], size, method, antialias)}

  return op


def _center_crop(image, size, rounding="floor"):
  shape = tf.shape(image)
  tf.debugging.assert_greater_equal(shape[:2], tf.constant(size), message="central_crop: image smaller than crop")
  margin = tf.cast(shape[:2] - tf.constant(size), tf.float64) / 2
  # torchvision's CenterCrop rounds half margins to even (Python's round); big_vision floors.
  top_left = tf.cast(tf.round(margin) if rounding == "round" else tf.floor(margin), tf.int32)
  return tf.slice(image, tf.concat([top_left, [0]], 0), [size[0], size[1], -1])


def central_crop(size: Size):
  """The central `size` crop (an odd margin puts the extra pixel at the bottom/right, as big_vision)."""
  size = _size(size, "central_crop")

  def op(example):
    return {**example, "image": _center_crop(example["image"], size)}

  return op


def center_crop_fraction(size: Size, crop_fraction: float = 0.875, method: str = "bilinear", antialias: bool = True):
  """timm's eval transform: shorter side to floor(size / crop_fraction), then the central `size` crop."""
  size = _size(size, "center_crop_fraction")
  if not 0 < crop_fraction <= 1:
    raise ValueError(f"center_crop_fraction: crop_fraction must be in (0, 1], got {crop_fraction!r}.")
  shorter = math.floor(max(size) / crop_fraction)
  _resize_uint8(tf.zeros([1, 1, 3]), (1, 1), method, antialias)

  def op(example):
    image = _resize_shorter(example["image"], shorter, method, antialias)
    return {**example, "image": _center_crop(image, size, rounding="round")}

  return op


def _check_inception_args(op, area_min, area_max, ratio, method, antialias):
  if not 0 < area_min <= area_max <= 1:
    raise ValueError(f"{op}: need 0 < area_min <= area_max <= 1, got {area_min!r}, {area_max!r}.")
  if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
    raise ValueError(f"{op}: ratio must be (min, max) with 0 < min <= max, got {ratio!r}.")
  _resize_uint8(tf.zeros([1, 1, 3]), (1, 1), method, antialias)


def inception_crop(
  size: Size,
  area_min: float = 0.08,
  area_max: float = 1.0,
  ratio: Sequence[float] = (3 / 4, 4 / 3),
  method: str = "bilinear",
  antialias: bool = False,
):
  """Random resized crop (Szegedy et al. 2015; timm's RandomResizedCrop), resized to `size`.

  Samples an area fraction uniformly in [area_min, area_max] and a log-uniform aspect ratio (width / height)
  in `ratio`; the first of 10 draws that fits the image wins, otherwise the largest central crop whose ratio
  is clamped into `ratio`. No antialiasing by default (as big_vision): it costs more than the JPEG decode on
  a CPU host, and a random crop is an augmentation, not a reference rendering.
  """
  size = _size(size, "inception_crop")
  _check_inception_args("inception_crop", area_min, area_max, ratio, method, antialias)

  def op(example):
    rng, example = take_rng(example)
    crop = _inception_crop_of(example["image"], rng, size, area_min, area_max, ratio, method, antialias)
    return {**example, "image": crop}

  return op


def _inception_crop_of(image, rng, size, area_min, area_max, ratio, method, antialias):
  """A decoded image's inception crop, resized to `size`."""
  top, left, ch, cw = inception_crop_box(tf.shape(image)[:2], rng, area_min, area_max, ratio)
  return _resize_columns(_rows(image, top, ch), left, cw, size, method, antialias)


def decode_inception_crop(
  size: Size,
  area_min: float = 0.08,
  area_max: float = 1.0,
  ratio: Sequence[float] = (3 / 4, 4 / 3),
  method: str = "bilinear",
  antialias: bool = False,
):
  """decode|inception_crop(...) in one op that decodes only the crop window of a JPEG
  (tf.image.decode_and_crop_jpeg), so the usual training crop skips most of the decode. Same rng, same
  window; pixels equal except a few levels at the window's edge from JPEG chroma upsampling. Bilinear without
  antialiasing (the default) runs lvm_jax.data.native's crop + resize kernel where it is built."""
  size = _size(size, "decode_inception_crop")
  _check_inception_args("decode_inception_crop", area_min, area_max, ratio, method, antialias)
  full_decode = decode()

  # With lvm_jax's kernel the decoder gets the window widened left to the JPEG's block column (16 px covers
  # every common chroma subsampling), which it writes in place; otherwise it copies each row of an unaligned
  # window. The kernel then reads the crop's own columns from it.
  block = 16 if _native_crop_resize(method, antialias) is not None else 1

  def op(example):
    rng, example = take_rng(example)
    data = example["image"]

    def crop_jpeg():
      top, left, ch, cw = inception_crop_box(tf.image.extract_jpeg_shape(data)[:2], rng, area_min, area_max, ratio)
      extra = left % block
      window = tf.image.decode_and_crop_jpeg(data, tf.stack([top, left - extra, ch, cw + extra]), channels=3)
      return _resize_columns(window, extra, cw, size, method, antialias)

    def crop_decoded():
      image = full_decode({"image": data})["image"]
      return _inception_crop_of(image, rng, size, area_min, area_max, ratio, method, antialias)

    resized = tf.cond(tf.io.is_jpeg(data), crop_jpeg, crop_decoded)
    resized.set_shape(size + (3,))
    return {**example, "image": resized}

  return op


def inception_crop_box(
  image_size: tf.Tensor, rng: tf.Tensor, area_min: float, area_max: float, ratio: Sequence[float], tries: int = 10
) -> tuple[tf.Tensor, ...]:
  """(top, left, height, width) of an inception crop of an image of `image_size` (height, width), int32.

  One draw of 2 * tries + 2 uniforms: area fractions, log-uniform aspect ratios, and the position. The box
  arithmetic runs in lvm_jax.data.native's kernel where it is built, else as TensorFlow ops; both in float32 with
  the same order of operations, so they choose the same box.
  """
  uniform = tf.random.stateless_uniform([2 * tries + 2], rng)
  log_min, log_max = math.log(ratio[0]), math.log(ratio[1])
  aspect = tf.exp(uniform[tries : 2 * tries] * (log_max - log_min) + log_min)
  area_uniform, position = uniform[:tries], uniform[2 * tries :]
  image_size = tf.cast(image_size, tf.int32)
  library = native.library()
  if library is not None:
    box = library.lvm_inception_crop_box(
      image_size,
      area_uniform,
      aspect,
      position,
      area_min=area_min,
      area_max=area_max,
      ratio_min=ratio[0],
      ratio_max=ratio[1],
    )
    return tuple(tf.unstack(box))
  return _inception_crop_box_ops(image_size, area_uniform, aspect, position, area_min, area_max, ratio)


def _inception_crop_box_ops(image_size, area_uniform, aspect, position, area_min, area_max, ratio):
  """inception_crop_box's arithmetic as TensorFlow ops (crop_box.cc's LvmInceptionCropBox, line for line)."""
  f32 = lambda x: tf.constant(x, tf.float32)
  height, width = image_size[0], image_size[1]
  h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  area = h * w * (area_uniform * (f32(area_max) - f32(area_min)) + f32(area_min))
  crop_w = tf.round(tf.sqrt(area * aspect))  # tf.round rounds half to even, as nearbyint in the kernel
  crop_h = tf.round(tf.sqrt(area / aspect))
  fits = (crop_w >= 1) & (crop_w <= w) & (crop_h >= 1) & (crop_h <= h)
  first = tf.argmax(tf.cast(fits, tf.int32))  # 0 when none fits; then the fallback below is used
  any_fit = tf.reduce_any(fits)
  # Fallback: the whole image, narrowed to the nearest allowed aspect ratio, centred.
  image_ratio = w / h
  fallback_w = tf.where(image_ratio > f32(ratio[1]), tf.round(h * f32(ratio[1])), w)
  fallback_h = tf.where(image_ratio < f32(ratio[0]), tf.round(w / f32(ratio[0])), h)
  ch = tf.cast(tf.where(any_fit, crop_h[first], fallback_h), tf.int32)
  cw = tf.cast(tf.where(any_fit, crop_w[first], fallback_w), tf.int32)
  top = tf.minimum(tf.cast(position[0] * tf.cast(height - ch + 1, tf.float32), tf.int32), height - ch)
  left = tf.minimum(tf.cast(position[1] * tf.cast(width - cw + 1, tf.float32), tf.int32), width - cw)
  top, left = tf.where(any_fit, top, (height - ch) // 2), tf.where(any_fit, left, (width - cw) // 2)
  return top, left, ch, cw


def flip_lr(p: float = 0.5):
  """Mirror left-right with probability p."""
  if not 0 <= p <= 1:
    raise ValueError(f"flip_lr: p must be a probability in [0, 1], got {p!r}.")

  def op(example):
    rng, example = take_rng(example)
    image = example["image"]
    flip = tf.random.stateless_uniform([], rng) < p
    return {**example, "image": tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)}

  return op


def normalize(mean: Union[str, float, Sequence[float]] = "imagenet", std: Union[float, Sequence[float], None] = None):
  """uint8 -> float32 (x / 255 - mean) / std; mean/std in 0..1 units, or a preset name: 'imagenet', 'inception'."""
  if isinstance(mean, str):
    if mean not in NORMALIZATIONS or std is not None:
      raise ValueError(
        f"normalize: a preset is one of {sorted(NORMALIZATIONS)} with no std, or pass numeric "
        f"(mean, std); got mean={mean!r}, std={std!r}."
      )
    mean, std = NORMALIZATIONS[mean]
  if std is None:
    raise ValueError(f"normalize: numeric mean {mean!r} needs a std.")
  mean_t, std_t = tf.constant(mean, tf.float32), tf.constant(std, tf.float32)
  if mean_t.shape.rank > 1 or std_t.shape.rank > 1 or tf.reduce_any(std_t <= 0):
    raise ValueError(f"normalize: mean and std must be scalars or per-channel lists (std > 0), got {mean!r}, {std!r}.")
  # One multiply-add: x * scale + offset equals (x / 255 - mean) / std within a few float32 ulps of the result.
  scale, offset = 1.0 / (255.0 * std_t), -mean_t / std_t
  channels = max(scale.shape.num_elements(), offset.shape.num_elements())
  scale, offset = tf.broadcast_to(scale, [channels]), tf.broadcast_to(offset, [channels])

  def op(example):
    image = tf.cast(example["image"], tf.float32)
    if channels == 1:
      return {**example, "image": image * scale[0] + offset[0]}
    if image.shape[-1] not in (None, channels):
      raise ValueError(f"normalize: {channels} channel means/stds for images of shape {image.shape}.")
    if image.shape.rank != 3:  # not one [height, width, channels] image: plain broadcasting
      return {**example, "image": image * scale + offset}
    # TensorFlow broadcasts a per-channel vector over [height, width, channels] element by element (~4x the
    # time of the whole op below); over [height, width * channels] rows it takes its fast row-vector path.
    shape = tf.shape(image)
    rows = tf.reshape(image, [shape[0], -1])
    normalized = rows * tf.tile(scale, shape[1:2]) + tf.tile(offset, shape[1:2])
    return {**example, "image": tf.ensure_shape(tf.reshape(normalized, shape), image.shape)}

  return op


def value_range(vmin: float = -1.0, vmax: float = 1.0):
  """uint8 0..255 -> float32 linearly onto [vmin, vmax] (value_range(-1, 1) equals normalize('inception'))."""
  if not vmin < vmax:
    raise ValueError(f"value_range: need vmin < vmax, got {vmin!r}, {vmax!r}.")

  def op(example):
    image = tf.cast(example["image"], tf.float32) / 255.0
    return {**example, "image": image * (vmax - vmin) + vmin}

  return op


def onehot(num_classes: int, smoothing: float = 0.0):
  """int label -> float32 [num_classes]: (1 - smoothing) * onehot + smoothing / num_classes."""
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f"onehot: num_classes must be a positive int, got {num_classes!r}.")
  if not 0 <= smoothing < 1:
    raise ValueError(f"onehot: smoothing must be in [0, 1), got {smoothing!r}.")

  def op(example):
    label = tf.cast(example["label"], tf.int64)
    # tf.one_hot silently gives all zeros for an out-of-range label; a wrong num_classes must fail loudly.
    with tf.control_dependencies(
      [
        tf.debugging.assert_greater_equal(label, tf.constant(0, tf.int64), message="onehot: negative label"),
        tf.debugging.assert_less(
          label, tf.constant(num_classes, tf.int64), message=f"onehot: label >= num_classes={num_classes}"
        ),
      ]
    ):
      hot = tf.one_hot(label, num_classes, dtype=tf.float32)
    return {**example, "label": hot * (1 - smoothing) + smoothing / num_classes}

  return op
