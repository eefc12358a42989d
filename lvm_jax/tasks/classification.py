"""Image classification as a training task: softmax cross-entropy with label smoothing, top-1/top-5 eval.

Batches are {"image", "label"}: int class ids [B], or soft labels [B, C] (after mixup/cutmix or a onehot pp).
A fresh model is a registered one with a head of the run's class count; a pretrained one keeps its backbone and
gets a new head when the class count differs (weights.pretrained.retarget).
"""

import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from lvm_jax.models import registry
from lvm_jax.train.task import ModelInit, Task
from lvm_jax.weights import pretrained as pretrained_lib

CLASS_NAMES_FILE = "class_names.json"


def targets(labels: jax.Array, num_classes: int, smoothing: float = 0.0) -> jax.Array:
  """Soft targets [B, C]: int labels one-hot with label smoothing; [B, C] labels as given."""
  if labels.ndim == 2:
    return labels.astype(jnp.float32)
  hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  return hot * (1.0 - smoothing) + smoothing / num_classes


def cross_entropy(logits: jax.Array, soft_targets: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy in float32 (bf16 logits would lose the small probabilities)."""
  return -jnp.sum(soft_targets * jax.nn.log_softmax(logits.astype(jnp.float32)), axis=-1)


def class_ids(labels: jax.Array) -> jax.Array:
  return labels if labels.ndim == 1 else jnp.argmax(labels, axis=-1)


class Classification(Task):
  """num_classes: the head's size; label_smoothing: for int labels in training (eval never smooths)."""

  name = "classification"
  train_metrics = ("top1",)
  eval_metrics = {"top1": "max", "top5": "max", "loss": "min"}

  def __init__(self, num_classes: int, label_smoothing: float = 0.0, class_names: Optional[Sequence[str]] = None):
    self.num_classes = num_classes
    self.label_smoothing = label_smoothing
    self.class_names = None if class_names is None else list(class_names)

  @classmethod
  def from_config(cls, config, train_source, eval_source) -> "Classification":
    if eval_source is not None and eval_source.class_names != train_source.class_names:
      raise ValueError(
        f"data.eval has classes {eval_source.class_names[:5]}... but data.train has "
        f"{train_source.class_names[:5]}...: they must be the same, in the same order."
      )
    return cls(config.num_classes or train_source.num_classes, config.label_smoothing, train_source.class_names)

  def build_model(self, config) -> ModelInit:
    dtype = jnp.dtype(config.dtype)
    overrides = dict(config.model_args)
    for key in ("num_classes", "dtype"):
      if key in overrides:
        raise ValueError(f"model_args.{key}: set the top-level config.{key} instead.")
    if config.pretrained is None:
      if config.image_size is not None:
        overrides["image_size"] = config.image_size
      return ModelInit(registry.create_model(config.model, num_classes=self.num_classes, dtype=dtype, **overrides))
    checkpoint = pretrained_lib.load_checkpoint(config.pretrained, dtype=dtype, **overrides)
    model, variables = pretrained_lib.retarget(
      checkpoint.model,
      checkpoint.variables,
      num_classes=self.num_classes,
      image_size=config.image_size,
      seed=config.seed,
    )
    mean_std = None
    if checkpoint.preprocessing is not None:
      mean_std = (checkpoint.preprocessing.mean, checkpoint.preprocessing.std)
    elif config.data.normalize is None:
      raise ValueError(
        f"pretrained={config.pretrained!r}: its preprocessing cannot be read "
        f"({checkpoint.preprocessing_error}); set data.normalize to a preset."
      )
    return ModelInit(model, variables, mean_std)

  def check_data(self, element_spec: dict, pp_name: str) -> None:
    label_shape = tuple(element_spec["label"].shape[1:])
    if label_shape not in ((), (self.num_classes,)):
      raise ValueError(f"{pp_name} gives labels of shape {label_shape}; the model has {self.num_classes} classes.")

  def loss(self, logits: jax.Array, batch: dict) -> tuple[jax.Array, dict]:
    soft = targets(batch["label"], self.num_classes, self.label_smoothing)
    loss = jnp.mean(cross_entropy(logits, soft))
    return loss, {"top1": jnp.mean(jnp.argmax(logits, -1) == class_ids(batch["label"]))}

  def eval_batch(self, logits: jax.Array, batch: dict) -> dict:
    """Sums over the real (mask 1) examples of a batch: count, correct top-1 / top-5, loss."""
    logits = logits.astype(jnp.float32)
    labels = class_ids(batch["label"])
    mask = batch["mask"].astype(jnp.float32)
    loss = cross_entropy(logits, targets(labels, self.num_classes))
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    return {
      "count": jnp.sum(mask),
      "top1": jnp.sum(mask * (jnp.argmax(logits, -1) == labels)),
      "top5": jnp.sum(mask * jnp.any(top5 == labels[:, None], axis=-1)),
      "loss": jnp.sum(jnp.where(mask > 0, loss, 0.0)),  # a padded example never turns the sum into NaN
    }

  def summarize_eval(self, per_batch: Sequence[dict]) -> dict:
    """Metric sums of all eval batches -> means over the real examples (top1, top5, loss)."""
    total = {name: sum(float(s[name]) for s in per_batch) for name in per_batch[0]}
    count = total.pop("count")
    if count == 0:
      raise ValueError("The eval split has no examples (every batch was padding).")
    return {name: value / count for name, value in total.items()}

  def save_run_files(self, workdir: str, model, normalize) -> None:
    """The class names and the model's description (model.json), what predict rebuilds the run from."""
    from lvm_jax.data import sources  # TensorFlow comes with it: only when a run writes its workdir
    from lvm_jax.train import workdir_checkpoint

    if self.class_names is not None:
      sources.write_class_names(self.class_names, os.path.join(workdir, CLASS_NAMES_FILE))
    workdir_checkpoint.save_model_description(workdir, model, normalize)

  @classmethod
  def predict(
    cls,
    workdir: str,
    image: str,
    *,
    step: Optional[int] = None,
    top_k: int = 5,
    as_json: bool = False,
    output: Optional[str] = None,
    min_score: Optional[float] = None,
  ) -> str:
    """The run's `top_k` classes for `image`, as classify.format_predictions writes them."""
    if output is not None or min_score is not None:
      flag = "--output draws" if output is not None else "--min_score filters"
      raise ValueError(f"{flag} detections; a classification run prints its top classes (drop it).")
    from lvm_jax.tasks import classify  # the inference API, which builds on the weights loaders
    from lvm_jax.train import workdir_checkpoint

    predictions = classify.classify(workdir_checkpoint.load(workdir, step=step), image, top_k=top_k)[0]
    return classify.format_predictions(predictions, as_json=as_json)
