"""Detections on an image file, of a trained run or a torchvision checkpoint: what `main.py --mode=predict
--workdir=DIR | --pretrained=CHECKPOINT --image=FILE` prints (one line a detection, or JSON) and, with --output,
draws."""

import dataclasses
import io
import json
import math
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import PIL.ImageDraw

from lvm_jax import normalization
from lvm_jax.data import device_batches, pp, sources
from lvm_jax.data.detection_ops import CANVAS_MULTIPLE
from lvm_jax.tasks import classification
from lvm_jax.tasks import images as image_io
from lvm_jax.tasks.detection import detector as detector_lib
from lvm_jax.tasks.detection import model_builder
from lvm_jax.tf_host import tf
from lvm_jax.train import checkpoints as checkpoints_lib
from lvm_jax.train import reporting, workdir_checkpoint


TORCHVISION_RESIZE = (800, 1333)  # GeneralizedRCNNTransform's min_size, max_size


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


class Detector:
  """A detector ready for image files: its network and variables, its spec (post-processing), how an image is put
  on its canvas (a run's eval pp and normalization, or torchvision's transform), and its class names. Calling it
  on an image (path, PIL image or array) gives its detections, boxes in the image's pixels. The forward pass and
  post-processing are compiled once a canvas size.

  Build one from a trained run (from_workdir) or a torchvision checkpoint (from_torchvision).
  """

  def __init__(
    self,
    model,
    variables: dict,
    spec,
    labels: Sequence[str],
    *,
    pp_eval: Optional[str] = None,
    normalize: Optional[tuple] = None,
    resize: tuple[int, int] = TORCHVISION_RESIZE,
  ):
    """pp_eval: the pp that puts an image on the canvas (a run's), then `normalize` ((mean, std) or None); None:
    torchvision's transform (torchvision_transform, `resize` = (shorter side, longer side at most))."""
    self.model, self.variables, self.spec, self.labels = model, variables, spec, list(labels)
    self.pp_eval, self.normalize, self.resize = pp_eval, normalize, resize
    self._forward = jax.jit(self._detections)

  @classmethod
  def from_workdir(cls, workdir: str, step: Optional[int] = None) -> "Detector":
    """A trained detection run: its newest intact checkpoint (or `step`), its eval pp and class names."""
    workdir = checkpoints_lib.absolute(workdir)
    model, spec, normalize = model_builder.load_description(workdir)
    labels = sources.load_class_names(os.path.join(workdir, classification.CLASS_NAMES_FILE))
    with checkpoints_lib.CheckpointManager(
      os.path.join(workdir, workdir_checkpoint.CHECKPOINT_DIR), read_only=True
    ) as checkpoints:
      state = checkpoints.restore_arrays(step)
    stats = {"batch_stats": state["batch_stats"]} if state.get("batch_stats") else {}
    variables = {"params": state["params"], **stats}
    pp_eval = reporting.load_config(workdir).data.pp_eval
    return cls(model, variables, spec, labels, pp_eval=pp_eval, normalize=normalize)

  @classmethod
  def from_torchvision(
    cls, path_or_url: str, arch: Optional[str] = None, resize: tuple[int, int] = TORCHVISION_RESIZE
  ) -> "Detector":
    """A torchvision RetinaNet / FCOS checkpoint (file or URL; the architecture read off it unless given), with
    torchvision's transform (ImageNet mean/std, shorter side 800, longer at most 1333: `resize`) and
    post-processing."""
    from lvm_jax.tasks.detection.task import DetectorSpec
    from lvm_jax.weights import torchvision_detection

    model, variables = torchvision_detection.load_torchvision_detector(path_or_url, arch)
    head, version = detector_lib.head_and_version(model)
    spec = DetectorSpec(head=head, version=version, num_classes=model.num_classes)
    coco = model.num_classes == len(torchvision_detection.COCO_CATEGORIES)
    labels = torchvision_detection.COCO_CATEGORIES if coco else [f"class_{i}" for i in range(model.num_classes)]
    return cls(model, variables, spec, labels, resize=resize)

  def _detections(self, variables, images, resized):
    outputs = self.model.apply(variables, images, train=False)
    return self.spec.detections(outputs, images.shape[1:3], resized)

  def __call__(self, image) -> list[Detection]:
    if self.pp_eval is None:
      example = torchvision_transform(image, *self.resize)  # normalized floats
    else:
      example = prepare_image(image, self.pp_eval)  # uint8
      canvas = example["image"].shape[:2]
      example["extent"] = np.minimum(np.round(example["orig_size"] * example["scale"]), canvas)
    images = jnp.asarray(example["image"])[None]
    if self.pp_eval is not None and self.normalize:
      images = device_batches.normalize(images, *self.normalize)
    extent = example["extent"].astype(np.float32)[None]
    found = jax.tree.map(np.asarray, self._forward(self.variables, images.astype(jnp.float32), extent))
    return to_original(found, example, self.labels)


def torchvision_transform(image, min_size: int, max_size: int) -> dict:
  """What torchvision's GeneralizedRCNNTransform does to one image in eval mode: scaled to 0..1, normalized with
  ImageNet's mean/std, resized (bilinear, half-pixel centers, no antialiasing) so that the shorter side is
  min_size unless the longer would pass max_size (sides rounded down), then zero-padded bottom/right to a multiple
  of 32. Returns {"image": float32 canvas, "orig_size": (h, w), "extent": the resized (h, w), "scale": the
  per-axis factors (x, y, x, y) that took the image's boxes onto the canvas, as torchvision maps boxes back}."""
  pixels = np.asarray(image_io.load_image(image), np.float32) / 255.0
  mean, std = (np.asarray(v, np.float32) for v in normalization.IMAGENET_DEFAULT)
  height, width = pixels.shape[:2]
  factor = min(min_size / min(height, width), max_size / max(height, width))
  extent = (math.floor(height * factor), math.floor(width * factor))
  resized = jax.image.resize((pixels - mean) / std, extent + (3,), "bilinear", antialias=False)
  rows, cols = (CANVAS_MULTIPLE * math.ceil(side / CANVAS_MULTIPLE) for side in extent)
  canvas = np.zeros((rows, cols, 3), np.float32)
  canvas[: extent[0], : extent[1]] = resized
  scale = np.array([extent[1] / width, extent[0] / height] * 2, np.float32)
  return {"image": canvas, "orig_size": np.array([height, width]), "extent": np.array(extent), "scale": scale}


def run(
  detector: Detector, image, *, as_json: bool = False, output: Optional[str] = None, min_score: float = 0.0
) -> str:
  """What predict prints for `image`: its detections at least `min_score` confident, one line each (JSON with
  as_json); `output` also draws them on the image."""
  detections = [d for d in detector(image) if d.score >= min_score]
  if output:
    draw(image, detections, output)
  return format_detections(detections, as_json=as_json)


def to_original(found: dict, example: dict, labels: Sequence[str]) -> list[Detection]:
  """The first image's detections of a post-processed batch, boxes mapped from the canvas back to the original
  image (divided by the example's scale, one factor or per axis (x, y, x, y); clipped to its size)."""
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
