"""A trained run's workdir as a classification Checkpoint: the model, its latest parameters, its class names, and
the run's own eval preprocessing, so `main.py --mode=predict --workdir=DIR` sees images exactly as eval did.

The trainer writes WORKDIR/model.json (the model class, its arguments and the input normalization) beside the
checkpoints, so a workdir is enough: no dataset and no hub access is needed to predict.
"""

import dataclasses
import io
import json
import os
from typing import Optional, Sequence

import jax.numpy as jnp
import numpy as np
import PIL.Image

from lvm_jax.data import device_batches, pp, sources
from lvm_jax.models import registry
from lvm_jax.tasks import classification
from lvm_jax.tf_host import tf
from lvm_jax.train import checkpoints as checkpoints_lib
from lvm_jax.weights.pretrained import Checkpoint

MODEL_FILE = "model.json"
CLASS_NAMES_FILE = classification.CLASS_NAMES_FILE
CHECKPOINT_DIR = "checkpoints"


def save_model_description(workdir: str, model, normalize: Optional[tuple]) -> None:
  """WORKDIR/model.json: what predict needs to rebuild the network and its input."""
  args = {}
  for name in registry.model_fields(type(model)):
    value = getattr(model, name)
    if name in ("dtype", "param_dtype"):
      value = jnp.dtype(value).name
    args[name] = list(value) if isinstance(value, tuple) else value
  description = {
    "class": type(model).__name__,
    "args": args,
    "normalize": None if normalize is None else [list(normalize[0]), list(normalize[1])],
  }
  path = os.path.join(workdir, MODEL_FILE)
  with tf.io.gfile.GFile(path + ".tmp", "w") as f:
    json.dump(description, f, indent=1)
  tf.io.gfile.rename(path + ".tmp", path, overwrite=True)


def _model_from_description(path: str):
  with tf.io.gfile.GFile(path) as f:
    description = json.load(f)
  classes = {cls.__name__: cls for cls, _ in registry.FAMILIES}
  if description.get("class") not in classes:
    raise ValueError(f"{path}: model class {description.get('class')!r} is not one of {sorted(classes)}.")
  args = {k: tuple(v) if isinstance(v, list) else v for k, v in description["args"].items()}
  for name in ("dtype", "param_dtype"):
    args[name] = jnp.dtype(args[name])
  normalize = description["normalize"]
  return classes[description["class"]](**args), (None if normalize is None else tuple(map(tuple, normalize)))


@dataclasses.dataclass(frozen=True)
class PipelinePreprocessing:
  """The run's eval pp applied to one PIL image (sent through the same TF ops as eval batches), then the
  run's normalization. Callable like lvm_jax.Preprocessing: RGB PIL image -> float32 [H, W, 3]."""

  spec: str
  mean: Optional[Sequence[float]] = None
  std: Optional[Sequence[float]] = None

  def __call__(self, image: PIL.Image.Image) -> np.ndarray:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")  # lossless: the pp decodes exactly these pixels
    example = {
      "image": tf.constant(buffer.getvalue()),
      "label": tf.constant(0, tf.int64),
      "rng": tf.constant([0, 0], tf.int64),
    }
    for op in pp.parse(self.spec):
      example = op(example)
    pixels = example["image"].numpy()
    if self.mean is None:
      return pixels.astype(np.float32)
    return np.asarray(device_batches.normalize(pixels, self.mean, self.std))  # exactly what eval steps do


def load(workdir: str, step: Optional[int] = None, *, ema: bool = False) -> Checkpoint:
  """The run in `workdir` at its newest intact (or the given) checkpoint; ema=True takes the EMA parameters."""
  from lvm_jax.train import reporting  # the saved config

  workdir = checkpoints_lib.absolute(workdir)
  model_path = os.path.join(workdir, MODEL_FILE)
  if not tf.io.gfile.exists(model_path):
    raise FileNotFoundError(f"{workdir} has no {MODEL_FILE}: it is not a workdir of a lvm_jax training run.")
  model, normalize = _model_from_description(model_path)
  config = reporting.load_config(workdir)
  labels = sources.load_class_names(os.path.join(workdir, CLASS_NAMES_FILE))
  with checkpoints_lib.CheckpointManager(os.path.join(workdir, CHECKPOINT_DIR), read_only=True) as checkpoints:
    state = checkpoints.restore_arrays(step)
  params = state["ema_params"] if ema else state["params"]
  if ema and not params:
    raise ValueError(f"{workdir}: the run kept no EMA of its parameters (optimizer.ema_decay was not set).")
  variables = {"params": params, **({"batch_stats": state["batch_stats"]} if state.get("batch_stats") else {})}
  preprocessing = PipelinePreprocessing(config.data.pp_eval, *(normalize or (None, None)))
  return Checkpoint(model, variables, labels, preprocessing, source=str(workdir))
