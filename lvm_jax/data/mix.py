"""Batch-level ops: mixup (Zhang et al. 2018), cutmix (Yun et al. 2019) and timm's switch between the two.

They run after batching (pp.is_batch_op marks them), on float images [B, H, W, C] and one-hot (or smoothed)
labels [B, num_classes], so the pp needs normalize/value_range and onehot before them. As in timm's "batch"
mode, one lambda is drawn per batch (from row 0 of the batch's rng) and each example is mixed with the batch
in reverse order; the labels are mixed with exactly the weight the pixels got.
"""

from lvm_jax.tf_host import tf


def _batch_rng(batch: dict) -> tuple[tf.Tensor, dict]:
  """A seed for a batch-level draw from rng row 0, and the batch with that row replaced by the other half."""
  if "rng" not in batch:
    raise KeyError("Batch ops need batch['rng'] ([B, 2] stateless seeds); the pipeline adds it before the ops run.")
  rng = batch["rng"]
  use, rest = tf.unstack(tf.random.experimental.stateless_split(rng[0], 2))
  return use, {**batch, "rng": tf.tensor_scatter_nd_update(rng, [[0]], rest[None])}


def _check(batch: dict, op: str) -> dict:
  """The batch, checked; uint8 images become float32 in 0..255 units (normalized later, on the devices)."""
  image, label = batch["image"], batch["label"]
  if image.dtype == tf.uint8:
    image = tf.cast(image, tf.float32)
    batch = {**batch, "image": image}
  if not image.dtype.is_floating or image.shape.rank != 4:
    raise TypeError(
      f"{op}: expects a batch of images [B, H, W, C] (uint8 or float), got {image.dtype.name} of "
      f"rank {image.shape.rank}; run it after batching."
    )
  if not label.dtype.is_floating or label.shape.rank != 2:
    raise TypeError(
      f"{op}: expects one-hot labels [B, num_classes], got {label.dtype.name} of rank "
      f"{label.shape.rank}; put onehot(num_classes) in the pp before it."
    )
  return batch


def _check_alpha(alpha, op: str, name: str = "alpha"):
  if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
    raise ValueError(f"{op}: {name} must be a positive number (Beta(alpha, alpha)), got {alpha!r}.")


def sample_beta(seed: tf.Tensor, alpha: float) -> tf.Tensor:
  """One Beta(alpha, alpha) draw, as a ratio of two stateless Gamma(alpha) draws."""
  g = tf.random.stateless_gamma([2], seed, alpha, dtype=tf.float64)
  total = g[0] + g[1]
  # Both gammas underflow to 0 about once in 10^8 draws at alpha=0.2: call that an even mix, not NaN.
  return tf.cast(tf.where(total > 0, g[0] / tf.where(total > 0, total, 1.0), 0.5), tf.float32)


def _mix_labels(label, weight):
  return weight * label + (1 - weight) * tf.reverse(label, [0])


def _mixup(batch, seed, alpha):
  lam = sample_beta(seed, alpha)
  image = batch["image"]
  mixed = lam * image + (1 - lam) * tf.reverse(image, [0])
  return {**batch, "image": tf.cast(mixed, image.dtype), "label": _mix_labels(batch["label"], lam)}


def _cutmix(batch, seed, alpha):
  lam_seed, y_seed, x_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  lam = sample_beta(lam_seed, alpha)
  image = batch["image"]
  shape = tf.shape(image)
  h, w = shape[1], shape[2]
  # A box of area (1 - lam) centred at a uniform pixel, clipped to the image (timm's rand_bbox).
  cut = tf.sqrt(1.0 - lam)
  cut_h = tf.cast(tf.cast(h, tf.float32) * cut, tf.int32)
  cut_w = tf.cast(tf.cast(w, tf.float32) * cut, tf.int32)
  cy = tf.random.stateless_uniform([], y_seed, 0, h, tf.int32)
  cx = tf.random.stateless_uniform([], x_seed, 0, w, tf.int32)
  y0, y1 = tf.clip_by_value(cy - cut_h // 2, 0, h), tf.clip_by_value(cy + cut_h // 2, 0, h)
  x0, x1 = tf.clip_by_value(cx - cut_w // 2, 0, w), tf.clip_by_value(cx + cut_w // 2, 0, w)
  rows, cols = tf.range(h), tf.range(w)
  inside = (((rows >= y0) & (rows < y1))[:, None] & ((cols >= x0) & (cols < x1))[None, :])[None, :, :, None]
  mixed = tf.where(inside, tf.reverse(image, [0]), image)
  # The label weight is the area actually kept, after clipping, not the drawn lambda.
  kept = 1.0 - tf.cast((y1 - y0) * (x1 - x0), tf.float32) / tf.cast(h * w, tf.float32)
  return {**batch, "image": mixed, "label": _mix_labels(batch["label"], kept)}


def _batch_op(fn):
  fn.batch_op = True
  return fn


def _single(name: str, mix, alpha: float):
  """A batch op that checks the batch, draws its seed and applies `mix` (_mixup or _cutmix)."""
  _check_alpha(alpha, name)

  @_batch_op
  def op(batch):
    batch = _check(batch, name)
    seed, batch = _batch_rng(batch)
    return mix(batch, seed, alpha)

  return op


def mixup(alpha: float = 0.2):
  """Blend each image with its partner with lambda ~ Beta(alpha, alpha); labels with the same lambda."""
  return _single("mixup", _mixup, alpha)


def cutmix(alpha: float = 1.0):
  """Paste a box of the partner image covering ~(1 - lambda) of the area; labels weighted by that area."""
  return _single("cutmix", _cutmix, alpha)


def mixup_cutmix(mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, switch_prob: float = 0.5):
  """Per batch, cutmix with probability switch_prob, else mixup (timm's Mixup); an alpha of 0 turns one off."""
  if mixup_alpha == 0 and cutmix_alpha == 0:
    raise ValueError("mixup_cutmix: mixup_alpha and cutmix_alpha are both 0; at least one must be positive.")
  if mixup_alpha:
    _check_alpha(mixup_alpha, "mixup_cutmix", "mixup_alpha")
  if cutmix_alpha:
    _check_alpha(cutmix_alpha, "mixup_cutmix", "cutmix_alpha")
  if not 0 <= switch_prob <= 1:
    raise ValueError(f"mixup_cutmix: switch_prob must be a probability in [0, 1], got {switch_prob!r}.")

  @_batch_op
  def op(batch):
    batch = _check(batch, "mixup_cutmix")
    seed, batch = _batch_rng(batch)
    switch_seed, mix_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    if not cutmix_alpha:
      return _mixup(batch, mix_seed, mixup_alpha)
    if not mixup_alpha:
      return _cutmix(batch, mix_seed, cutmix_alpha)
    use_cutmix = tf.random.stateless_uniform([], switch_seed) < switch_prob
    return tf.cond(
      use_cutmix, lambda: _cutmix(batch, mix_seed, cutmix_alpha), lambda: _mixup(batch, mix_seed, mixup_alpha)
    )

  return op
