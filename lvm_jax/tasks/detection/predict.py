"""Detections of a trained run on an image file: what `main.py --mode=predict --workdir=DIR --image=FILE` prints
(one line a detection, or JSON) and, with --output, draws."""

import dataclasses
import io
import json
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import PIL.ImageDraw

from lvm_jax.data import device_batches, pp, sources
from lvm_jax.tasks import classification
from lvm_jax.tasks import images as image_io
from lvm_jax.tasks.detection import model_builder
from lvm_jax.tf_host import tf
from lvm_jax.train import checkpoints as checkpoints_lib
from lvm_jax.train import reporting, workdir_checkpoint


@dataclasses.dataclass(frozen=True)
class Detection:
  label: str
  index: int
  score: float
  box: tuple[float, float, float, float]  # x1, y1, x2, y2 in the original image's pixels


def prepare_image(image, pp_eval: str) -> dict:
  """An image (path, PIL image or array) through the run's eval pp: {"image": canvas uint8, "scale", "orig_size"}.
  It goes through the same TF ops as eval batches (re-encoded losslessly), with no boxes."""
  pil = image_io.load_image(image)
  buffer = io.BytesIO()
  pil.convert("RGB").save(buffer, format="PNG")
  example = {
    "image": tf.constant(buffer.getvalue()),
    "boxes": tf.zeros([0, 4], tf.float32),
    "labels": tf.zeros([0], tf.int64),
    "image_id": tf.constant(0, tf.int64),
    "rng": tf.constant([0, 0], tf.int64),
  }
  for op in pp.parse(pp_eval):
    example = op(example)
  return {k: example[k].numpy() for k in ("image", "scale", "orig_size")}


class RunDetector:
  """A trained detection run loaded once from its workdir (newest intact or the given checkpoint), its forward pass
  and post-processing compiled once: calling it on an image (path, PIL image or array) gives its detections."""

  def __init__(self, workdir: str, step: Optional[int] = None):
    workdir = checkpoints_lib.absolute(workdir)
    self.model, self.spec, self.normalize = model_builder.load_description(workdir)
    self.pp_eval = reporting.load_config(workdir).data.pp_eval
    self.labels = sources.load_class_names(os.path.join(workdir, classification.CLASS_NAMES_FILE))
    with checkpoints_lib.CheckpointManager(
      os.path.join(workdir, workdir_checkpoint.CHECKPOINT_DIR), read_only=True
    ) as checkpoints:
      state = checkpoints.restore_arrays(step)
    stats = {"batch_stats": state["batch_stats"]} if state.get("batch_stats") else {}
    self.variables = {"params": state["params"], **stats}
    self._forward = jax.jit(self._detections)

  def _detections(self, variables, images, resized):
    outputs = self.model.apply(variables, images, train=False)
    return self.spec.detections(outputs, images.shape[1:3], resized)

  def __call__(self, image) -> list[Detection]:
    example = prepare_image(image, self.pp_eval)
    images = jnp.asarray(example["image"])[None]
    if self.normalize:
      images = device_batches.normalize(images, *self.normalize)
    canvas = example["image"].shape[:2]
    resized = np.minimum(np.round(example["orig_size"] * example["scale"]), canvas)[None]
    found = jax.tree.map(np.asarray, self._forward(self.variables, images.astype(jnp.float32), resized))
    return to_original(found, example, self.labels)


def detect_with_run(workdir: str, image, *, step: Optional[int] = None) -> list[Detection]:
  """The detections (score threshold and NMS as the run's spec) of the run in `workdir` on `image`."""
  return RunDetector(workdir, step)(image)


def to_original(found: dict, example: dict, labels: Sequence[str]) -> list[Detection]:
  """The first image's detections of a post-processed batch, boxes mapped from the canvas back to the original
  image (divided by the example's scale, clipped to its size)."""
  height, width = example["orig_size"]
  out = []
  for i in range(int(found["count"][0])):
    box = np.clip(found["boxes"][0, i] / example["scale"], 0, [width, height, width, height])
    index = int(found["labels"][0, i])
    label = labels[index] if index < len(labels) else str(index)
    out.append(Detection(label, index, float(found["scores"][0, i]), tuple(float(v) for v in box)))
  return out


def format_detections(detections: Sequence[Detection], *, as_json: bool = False) -> str:
  if as_json:
    return json.dumps([dataclasses.asdict(d) for d in detections])
  if not detections:
    return "no detections above the score threshold"
  return "\n".join(
    f"{d.score:6.1%}  {d.label:20s} {d.box[0]:7.1f} {d.box[1]:7.1f} {d.box[2]:7.1f} {d.box[3]:7.1f}" for d in detections
  )


def draw(image, detections: Sequence[Detection], output: str, min_score: float = 0.0) -> None:
  """The image with each detection's box and "label score" drawn on it, written to `output` (PNG, JPEG, ...
  by its extension; atomically)."""
  canvas = image_io.load_image(image).convert("RGB")
  pen = PIL.ImageDraw.Draw(canvas)
  width = max(1, round(max(canvas.size) / 300))
  for d in (d for d in detections if d.score >= min_score):
    color = _COLORS[d.index % len(_COLORS)]
    pen.rectangle(d.box, outline=color, width=width)
    text = f"{d.label} {d.score:.2f}"
    left, top = d.box[0], max(0, d.box[1] - 11)
    pen.rectangle(pen.textbbox((left, top), text), fill=color)
    pen.text((left, top), text, fill="white")
  suffix = os.path.splitext(output)[1] or ".png"
  tmp = f"{output}.tmp{suffix}"
  canvas.save(tmp)
  os.replace(tmp, output)


_COLORS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#469990", "#9a6324", "#800000")
