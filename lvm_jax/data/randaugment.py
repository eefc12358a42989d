"""RandAugment (Cubuk et al. 2019) in TensorFlow on uint8 images, stateless-random.

The op set and magnitude scale are timm's "rand-m9-n2" (also big_vision's): `num_layers` times, pick one of
the 15 ops uniformly and apply it with probability `prob` at a fixed magnitude on the 0..10 scale. The
pixel ops follow PIL's ImageOps/ImageEnhance definitions (lookup tables, blends truncated as PIL does), so
they match PIL to within a level; geometric ops fill uncovered pixels with `fill` (timm: the ImageNet mean).

Magnitude 0 is not "no change" for every op, as in timm: Posterize keeps 0 bits (black), Solarize inverts
everything, and the enhance ops use factor 0.1; only Rotate, Shear*, Translate* and SolarizeAdd are identities.
"""

import math
from typing import Optional, Sequence

from lvm_jax import normalization
from lvm_jax.data.ops import take_rng
from lvm_jax.tf_host import tf

_MAX_LEVEL = 10.0


def _lut(image: tf.Tensor, table: tf.Tensor) -> tf.Tensor:
  """Maps each uint8 value through a [256] or per-channel [3, 256] table."""
  table = tf.clip_by_value(tf.broadcast_to(tf.cast(table, tf.int32), [3, 256]), 0, 255)
  index = tf.cast(image, tf.int32) + 256 * tf.range(3)
  return tf.cast(tf.gather(tf.reshape(table, [-1]), index), tf.uint8)


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor) -> tf.Tensor:
  """PIL's Image.blend: degenerate + factor * (image - degenerate), clipped, truncated to uint8."""
  d, x = tf.cast(degenerate, tf.float32), tf.cast(image, tf.float32)
  return tf.cast(tf.clip_by_value(d + factor * (x - d), 0.0, 255.0), tf.uint8)


def _luma(image: tf.Tensor) -> tf.Tensor:
  """PIL's convert("L") exactly: (19595 R + 38470 G + 7471 B + 2^15) >> 16, as [H, W, 1] int32."""
  rgb = tf.cast(image, tf.int32)
  weighted = rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000
  return tf.bitwise.right_shift(weighted, 16)[..., None]


def invert(image):
  return 255 - image


def posterize(image, bits):
  """Keep the `bits` most significant bits (0 bits: black)."""
  mask = tf.cast(tf.bitwise.left_shift(255, 8 - tf.cast(bits, tf.int32)) & 255, tf.uint8)
  return tf.bitwise.bitwise_and(image, mask)


def solarize(image, threshold):
  """Invert pixels at or above `threshold` (threshold 0 inverts everything, 256 nothing)."""
  values = tf.range(256)
  return _lut(image, tf.where(values < threshold, values, 255 - values))


def solarize_add(image, addition, threshold=128):
  """Adds `addition` (clipped at 255) to pixels below `threshold`."""
  values = tf.range(256)
  return _lut(image, tf.where(values < threshold, tf.minimum(values + addition, 255), values))


def autocontrast(image):
  """Stretch each channel to 0..255 (PIL's autocontrast with no cutoff); flat channels stay as they are."""
  flat = tf.reshape(image, [-1, 3])
  lo = tf.cast(tf.reduce_min(flat, 0), tf.float64)
  hi = tf.cast(tf.reduce_max(flat, 0), tf.float64)
  scale = 255.0 / tf.where(hi > lo, hi - lo, 1.0)
  values = tf.cast(tf.range(256), tf.float64)[None, :]
  # PIL computes i * scale - lo * scale in double and truncates; float64 keeps us bit-identical.
  stretched = tf.cast(tf.floor(values * scale[:, None] + (-lo * scale)[:, None]), tf.int32)
  return _lut(image, tf.where((hi > lo)[:, None], stretched, tf.range(256)[None, :]))


def equalize(image):
  """Histogram equalization per channel, PIL's ImageOps.equalize lookup table."""
  tables = []
  for c in range(3):
    hist = tf.math.bincount(tf.cast(tf.reshape(image[..., c], [-1]), tf.int32), minlength=256, maxlength=256)
    nonzero = tf.boolean_mask(hist, hist > 0)
    step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255
    below = tf.cumsum(hist, exclusive=True)
    table = (step // 2 + below) // tf.maximum(step, 1)
    tables.append(tf.where(step > 0, table, tf.range(256)))
  return _lut(image, tf.stack(tables))


def brightness(image, factor):
  return _blend(tf.zeros_like(image), image, factor)


def color(image, factor):
  """Saturation: blend with the image's own grayscale."""
  return _blend(tf.cast(tf.broadcast_to(_luma(image), tf.shape(image)), tf.uint8), image, factor)


def contrast(image, factor):
  """Blend with a flat image of the rounded mean luma (PIL's ImageEnhance.Contrast)."""
  mean = tf.floor(tf.reduce_mean(tf.cast(_luma(image), tf.float64)) + 0.5)
  return _blend(tf.cast(tf.fill(tf.shape(image), mean), tf.uint8), image, factor)


def sharpness(image, factor):
  """Blend with PIL's SMOOTH filter (3x3, centre 5, sum 13); the 1-pixel border is kept unsmoothed."""
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  x = tf.cast(image, tf.float32)[None]
  smooth = tf.round(tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], "VALID"))[0]
  inner = tf.pad(tf.ones_like(smooth), [[1, 1], [1, 1], [0, 0]])
  smooth = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
  degenerate = tf.where(inner > 0, smooth, tf.cast(image, tf.float32))
  return _blend(degenerate, image, factor)


def _transform(image, matrix, fill):
  """Samples input at matrix @ (x, y, 1) for each output pixel (x, y), bilinearly; outside -> fill.

  A channel of ones rides along so pixels partly outside blend with `fill` exactly as far as they are outside.
  """
  x = tf.cast(image, tf.float32)
  x = tf.concat([x, tf.ones_like(x[..., :1])], -1)[None]
  transforms = tf.concat([tf.reshape(tf.cast(matrix, tf.float32), [6]), tf.zeros([2])], 0)[None]
  out = tf.raw_ops.ImageProjectiveTransformV3(
    images=x,
    transforms=transforms,
    output_shape=tf.shape(image)[:2],
    fill_value=0.0,
    interpolation="BILINEAR",
    fill_mode="CONSTANT",
  )[0]
  rgb, inside = out[..., :3], out[..., 3:]
  blended = rgb + (1.0 - inside) * tf.constant(fill, tf.float32)
  return tf.cast(tf.clip_by_value(tf.round(blended), 0, 255), tf.uint8)


def rotate(image, degrees, fill=(128, 128, 128)):
  """Counter-clockwise by `degrees` about the image centre (PIL's Image.rotate)."""
  theta = tf.cast(degrees, tf.float32) * math.pi / 180.0
  cos, sin = tf.cos(theta), tf.sin(theta)
  shape = tf.cast(tf.shape(image), tf.float32)
  cy, cx = (shape[0] - 1) / 2, (shape[1] - 1) / 2
  matrix = tf.stack([cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy])
  return _transform(image, matrix, fill)


def shear_x(image, factor, fill=(128, 128, 128)):
  """x_in = x + factor * y (PIL's affine (1, factor, 0, 0, 1, 0), with its pixel-centre convention)."""
  f = tf.cast(factor, tf.float32)
  return _transform(image, tf.stack([1.0, f, 0.5 * f, 0.0, 1.0, 0.0]), fill)


def shear_y(image, factor, fill=(128, 128, 128)):
  f = tf.cast(factor, tf.float32)
  return _transform(image, tf.stack([1.0, 0.0, 0.0, f, 1.0, 0.5 * f]), fill)


def translate_x(image, pixels, fill=(128, 128, 128)):
  """Content moves left by `pixels` (PIL's affine (1, 0, pixels, 0, 1, 0))."""
  return _transform(image, tf.stack([1.0, 0.0, tf.cast(pixels, tf.float32), 0.0, 1.0, 0.0]), fill)


def translate_y(image, pixels, fill=(128, 128, 128)):
  return _transform(image, tf.stack([1.0, 0.0, 0.0, 0.0, 1.0, tf.cast(pixels, tf.float32)]), fill)


def _signed(value, sign_rng):
  """value or -value, each with probability 1/2 (timm's _randomly_negate)."""
  return tf.where(tf.random.stateless_uniform([], sign_rng) < 0.5, -value, value)


def _enhance_factor(level):
  return level / _MAX_LEVEL * 1.8 + 0.1


# name -> fn(image, level, sign_rng, fill); levels map to arguments as timm's rand transforms do.
OPS = {
  "AutoContrast": lambda x, level, rng, fill: autocontrast(x),
  "Equalize": lambda x, level, rng, fill: equalize(x),
  "Invert": lambda x, level, rng, fill: invert(x),
  "Rotate": lambda x, level, rng, fill: rotate(x, _signed(level / _MAX_LEVEL * 30.0, rng), fill),
  "Posterize": lambda x, level, rng, fill: posterize(x, int(level / _MAX_LEVEL * 4)),
  "Solarize": lambda x, level, rng, fill: solarize(x, int(level / _MAX_LEVEL * 256)),
  "SolarizeAdd": lambda x, level, rng, fill: solarize_add(x, int(level / _MAX_LEVEL * 110)),
  "Color": lambda x, level, rng, fill: color(x, _enhance_factor(level)),
  "Contrast": lambda x, level, rng, fill: contrast(x, _enhance_factor(level)),
  "Brightness": lambda x, level, rng, fill: brightness(x, _enhance_factor(level)),
  "Sharpness": lambda x, level, rng, fill: sharpness(x, _enhance_factor(level)),
  "ShearX": lambda x, level, rng, fill: shear_x(x, _signed(level / _MAX_LEVEL * 0.3, rng), fill),
  "ShearY": lambda x, level, rng, fill: shear_y(x, _signed(level / _MAX_LEVEL * 0.3, rng), fill),
  "TranslateX": lambda x, level, rng, fill: translate_x(
    x, _signed(level / _MAX_LEVEL * 0.45, rng) * tf.cast(tf.shape(x)[1], tf.float32), fill
  ),
  "TranslateY": lambda x, level, rng, fill: translate_y(
    x, _signed(level / _MAX_LEVEL * 0.45, rng) * tf.cast(tf.shape(x)[0], tf.float32), fill
  ),
}

IMAGENET_FILL = tuple(round(255 * m) for m in normalization.IMAGENET_DEFAULT[0])  # timm's img_mean: (124, 116, 104)


def randaugment(
  num_layers: int = 2,
  magnitude: float = 9,
  prob: float = 0.5,
  fill: Sequence[int] = IMAGENET_FILL,
  ops: Optional[Sequence[str]] = None,
):
  """`num_layers` rounds of: pick one of `ops` (default all 15) uniformly, apply it with probability `prob`."""
  if not isinstance(num_layers, int) or num_layers < 0:
    raise ValueError(f"randaugment: num_layers must be a non-negative int, got {num_layers!r}.")
  if not isinstance(magnitude, (int, float)) or not 0 <= magnitude <= _MAX_LEVEL:
    raise ValueError(f"randaugment: magnitude must be a number in [0, 10] (timm's scale), got {magnitude!r}.")
  if not 0 <= prob <= 1:
    raise ValueError(f"randaugment: prob must be in [0, 1], got {prob!r}.")
  if len(fill) != 3:
    raise ValueError(f"randaugment: fill must be an RGB triple in 0..255, got {fill!r}.")
  names = list(OPS) if ops is None else list(ops)
  unknown = [n for n in names if n not in OPS]
  if unknown or not names:
    raise ValueError(f"randaugment: unknown ops {unknown}; choose from {list(OPS)}.")
  fill = tuple(float(v) for v in fill)
  branches = [OPS[n] for n in names]

  def _apply(image, which, sign_rng):
    out = tf.switch_case(which, [lambda fn=fn: fn(image, magnitude, sign_rng, fill) for fn in branches])
    return tf.ensure_shape(out, image.shape)

  def op(example):
    rng, example = take_rng(example)
    image = example["image"]
    if image.dtype != tf.uint8:
      raise TypeError(f"randaugment: expects uint8 images (run it before normalize), got {image.dtype.name}.")
    for layer_rng in tf.unstack(tf.random.experimental.stateless_split(rng, max(num_layers, 1)))[:num_layers]:
      choice_rng, apply_rng, sign_rng = tf.unstack(tf.random.experimental.stateless_split(layer_rng, 3))
      which = tf.random.stateless_uniform([], choice_rng, 0, len(branches), tf.int32)
      apply = tf.random.stateless_uniform([], apply_rng) < prob
      image = tf.cond(apply, lambda x=image, r=sign_rng, w=which: _apply(x, w, r), lambda x=image: x)
    return {**example, "image": image}

  return op
