"""Image classification with a pretrained checkpoint: the top-k labels of each image, with probabilities.

    from lvm_jax.tasks.classify import Classifier, classify
    classify("google/vit-base-patch16-224", "cat.jpg")          # [[Prediction("Egyptian cat", 285, 0.61), ...]]
    classifier = Classifier("timm/resnet50.a1_in1k")            # loads and compiles once ...
    classifier(["a.jpg", "b.png"], top_k=3)                     # ... for any number of calls

Images are read and preprocessed exactly as the checkpoint's reference tools do (see tasks/images.py and
weights/preprocessing.py), so the probabilities equal those of the transformers image-classification pipeline.
"""

import dataclasses
import functools
import importlib.resources
import json
from typing import Any, Sequence, Union

import jax
import numpy as np

from lvm_jax.tasks import images as image_io
from lvm_jax.weights.pretrained import Checkpoint, load_checkpoint

IMAGENET1K_CLASSES = "imagenet1k_classes.txt"


@dataclasses.dataclass(frozen=True)
class Prediction:
  label: str
  index: int
  probability: float


class Classifier:
  """A checkpoint loaded once, with its forward pass compiled once per batch bucket (powers of two up to
  `batch_size`: a bigger request is split, a smaller one padded), so repeated calls do not recompile.

  Calling it, `classifier(images, top_k=5)`, returns one list of Predictions (label, index, probability) per
  image, most likely first; `logits` and `probabilities` give the [N, num_classes] arrays.

  Args:
    source_or_checkpoint: anything lvm_jax.load_checkpoint reads (a transformers or timm hub id or folder, a
      big_vision .npz file), or a Checkpoint already loaded. Its head must have classes (num_classes > 0), and
      its preprocessing must be readable to classify image files.
    batch_size: the largest batch the forward pass runs at once.
    **overrides: model arguments that do not change the weights, e.g. dtype=jnp.bfloat16 (only with a source).
  """

  def __init__(self, source_or_checkpoint: Union[str, Checkpoint], *, batch_size: int = 32, **overrides: Any):
    if isinstance(source_or_checkpoint, Checkpoint):
      if overrides:
        raise ValueError(f"Model overrides {sorted(overrides)} need a source to load; this checkpoint is loaded.")
      checkpoint = source_or_checkpoint
    else:
      checkpoint = load_checkpoint(source_or_checkpoint, **overrides)
    if not getattr(checkpoint.model, "num_classes", 0):
      raise ValueError(
        f"{checkpoint.source} has no classification head (num_classes=0): it gives features, not class probabilities."
      )
    if batch_size < 1:
      raise ValueError(f"batch_size must be positive, got {batch_size}.")
    self.checkpoint = checkpoint
    self.labels = class_labels(checkpoint)
    self.batch_size = batch_size
    self._traces = 0  # how many times the forward pass was traced (= compiled), for tests
    self._forward = jax.jit(self._logits)

  @property
  def preprocessing(self):
    if self.checkpoint.preprocessing is None:
      raise ValueError(
        f"{self.checkpoint.source}: its preprocessing cannot be applied "
        f"({self.checkpoint.preprocessing_error}); pass a Checkpoint with a Preprocessing set."
      )
    return self.checkpoint.preprocessing

  def _logits(self, variables, pixels):
    self._traces += 1
    return self.checkpoint.model.apply(variables, pixels, train=False)

  def logits(self, images) -> np.ndarray:
    """float32 [N, num_classes] for `images` (see `as_image_list` for what counts as one image or several)."""
    images = as_image_list(images)
    outputs = []
    for start in range(0, len(images), self.batch_size):
      chunk = np.stack(
        [self.preprocessing(image_io.load_image(image)) for image in images[start : start + self.batch_size]]
      )
      bucket = min(self.batch_size, 1 << (len(chunk) - 1).bit_length())
      padded = np.concatenate([chunk, np.zeros((bucket - len(chunk),) + chunk.shape[1:], chunk.dtype)])
      outputs.append(np.asarray(self._forward(self.checkpoint.variables, padded), np.float32)[: len(chunk)])
    return np.concatenate(outputs)

  def probabilities(self, images) -> np.ndarray:
    """[N, num_classes]: softmax of the logits; a sigmoid for a single-output head, as transformers does."""
    logits = self.logits(images).astype(np.float64)
    if logits.shape[-1] == 1:
      return 1 / (1 + np.exp(-logits))
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)

  def __call__(self, images, top_k: int = 5) -> list[list[Prediction]]:
    """For each image, its `top_k` most likely classes, most likely first (ties: lower index first)."""
    if top_k < 1:
      raise ValueError(f"top_k must be at least 1, got {top_k}.")
    results = []
    for probs in self.probabilities(images):
      order = np.argsort(-probs, kind="stable")[:top_k]
      results.append([Prediction(self.labels[i], int(i), float(probs[i])) for i in order])
    return results


def classify(
  source_or_checkpoint: Union[str, Checkpoint, Classifier], images, top_k: int = 5
) -> list[list[Prediction]]:
  """The `top_k` predictions for each image. For repeated calls build a Classifier once instead.

  Args:
    source_or_checkpoint: a checkpoint to load (anything lvm_jax.load_checkpoint reads), a loaded Checkpoint,
      or a Classifier.
    images: one image or several: a path, a PIL image, a uint8 [H, W] or [H, W, C] array, a list of those, or an
      [N, H, W, C] array. Each is preprocessed as the checkpoint's own preprocessor config says.
    top_k: how many classes to return per image.

  Returns:
    One list per image of `top_k` Predictions (label, index, probability), most likely first.
  """
  classifier = source_or_checkpoint
  if not isinstance(classifier, Classifier):
    classifier = Classifier(source_or_checkpoint)
  return classifier(images, top_k=top_k)


def as_image_list(images) -> list:
  """One image (a path, a PIL image, a [H, W] or [H, W, C] array) or several (a list/tuple of those, or an
  [N, H, W, C] array) as a list of images."""
  if isinstance(images, np.ndarray):
    return list(images) if images.ndim == 4 else [images]
  if isinstance(images, (list, tuple)):
    if not images:
      raise ValueError("No images given.")
    return list(images)
  return [images]


def class_labels(checkpoint: Checkpoint) -> list[str]:
  """The checkpoint's own class names; ImageNet-1k's for a 1000-class head without names (timm, big_vision);
  otherwise "class_<index>"."""
  num_classes = checkpoint.model.num_classes
  if checkpoint.labels is not None:
    if len(checkpoint.labels) != num_classes:
      raise ValueError(f"{checkpoint.source} names {len(checkpoint.labels)} classes but its head has {num_classes}.")
    return list(checkpoint.labels)
  if num_classes == 1000:
    return list(imagenet1k_class_names())
  return [f"class_{i}" for i in range(num_classes)]


@functools.cache
def imagenet1k_class_names() -> tuple[str, ...]:
  """The 1000 ImageNet-1k class names in index order ("tench, Tinca tinca", ...)."""
  text = importlib.resources.files("lvm_jax.tasks").joinpath(IMAGENET1K_CLASSES).read_text(encoding="utf-8")
  return tuple(text.splitlines())


def format_predictions(predictions: Sequence[Prediction], *, as_json: bool = False) -> str:
  """A JSON list of {"label", "index", "probability"}, or one "probability  label  [index]" line each."""
  if as_json:
    return json.dumps([dataclasses.asdict(p) for p in predictions])
  return "\n".join(f"{p.probability:8.2%}  {p.label}  [{p.index}]" for p in predictions)
