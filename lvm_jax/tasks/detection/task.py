"""Object detection as a training task: RetinaNet or FCOS on a backbone, trained and evaluated by the one trainer.

Batches are {"image": uint8 [B, H, W, 3] canvas, "boxes": [B, M, 4] canvas pixels, "labels": [B, M],
"box_mask": [B, M]} (the det_* pp ops make them); eval batches add "image_id", "scale", "orig_size" and "mask".
The loss is torchvision's (losses.py), anchors are static for the canvas, eval runs the post-processing on the
device and COCO evaluation (pycocotools) on the host over the whole split.

The settings live in config.detection (lvm_jax/train/config.py); the backbone is config.model (+ model_args), or
config.pretrained (an ImageNet classifier whose backbone is taken), or config.detection.weights (a torchvision
detector checkpoint, the whole network).
"""

import dataclasses
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lvm_jax.tasks import classification
from lvm_jax.tasks.detection import anchors as anchor_ops
from lvm_jax.tasks.detection import losses, postprocess
from lvm_jax.train.task import ModelInit, Task

HEADS = ("retinanet", "fcos")
# torchvision's post-processing defaults per head: score threshold, top-k candidates a level, NMS IoU, detections.
POSTPROCESS_DEFAULTS = {
  "retinanet": dict(score_threshold=0.05, topk_candidates=1000, nms_threshold=0.5, detections_per_img=300),
  "fcos": dict(score_threshold=0.2, topk_candidates=1000, nms_threshold=0.6, detections_per_img=100),
}
LOSS_NAMES = {
  "retinanet": ("classification", "bbox_regression"),
  "fcos": ("classification", "bbox_regression", "bbox_ctrness"),
}


@dataclasses.dataclass(frozen=True)
class DetectorSpec:
  """The head on the backbone, and how its outputs become boxes: everything but the backbone itself."""

  head: str = "retinanet"
  version: str = "v1"  # RetinaNet: "v1" (L1 box loss, P6 from P5) or "v2" (GroupNorm towers, GIoU, P6 from C5)
  num_classes: int = 91
  fpn_channels: int = 256
  anchor_size: int = 32  # the smallest anchor side (P3); each level doubles it (torchvision: 32; FCOS: 8 a stride)
  score_threshold: Optional[float] = None  # None: the head's torchvision default (POSTPROCESS_DEFAULTS)
  topk_candidates: Optional[int] = None
  nms_threshold: Optional[float] = None
  detections_per_img: Optional[int] = None

  def __post_init__(self):
    if self.head not in HEADS:
      raise ValueError(f"detection.head={self.head!r} is not one of {HEADS}.")
    if self.head == "retinanet" and self.version not in ("v1", "v2"):
      raise ValueError(f"detection.version={self.version!r}: RetinaNet is 'v1' or 'v2'.")
    if self.anchor_size < 1:
      raise ValueError(f"detection.anchor_size must be positive, got {self.anchor_size}.")

  def postprocess_settings(self) -> dict:
    settings = dict(POSTPROCESS_DEFAULTS[self.head])
    for name in settings:
      if getattr(self, name) is not None:
        settings[name] = getattr(self, name)
    return settings

  def anchors(self, canvas_hw: Sequence[int]) -> list[np.ndarray]:
    """The static anchors of every level (P3..P7) for a canvas (height, width)."""
    if self.head == "fcos":
      sizes = tuple((self.anchor_size // 4 * 2**level,) for level in range(5))  # 8, 16, ... at anchor_size 32
      return anchor_ops.make_anchors(canvas_hw, sizes, anchor_ops.FCOS_ASPECT_RATIOS)
    scales = (1.0, 2 ** (1.0 / 3), 2 ** (2.0 / 3))
    sizes = tuple(tuple(int(self.anchor_size * 2**level * s) for s in scales) for level in range(5))
    return anchor_ops.make_anchors(canvas_hw, sizes, anchor_ops.RETINANET_ASPECT_RATIOS)

  def detections(self, outputs: dict, canvas_hw: Sequence[int], image_hw) -> dict:
    """Post-processed detections of a batch: boxes [B, K, 4] canvas pixels, scores, labels, count."""
    detect = postprocess.fcos_detections if self.head == "fcos" else postprocess.retinanet_detections
    return detect(outputs, self.anchors(canvas_hw), image_hw, **self.postprocess_settings())

  def losses(self, outputs: dict, batch: dict) -> dict:
    anchors = self.anchors(batch["image"].shape[1:3])
    targets = (batch["boxes"], batch["labels"], batch["box_mask"])
    if self.head == "fcos":
      return losses.fcos_loss(outputs, anchors, *targets)
    return losses.retinanet_loss(outputs, anchors, *targets, box_loss="l1" if self.version == "v1" else "giou")

  def build(self, backbone, dtype=jnp.float32):
    """The detector module around `backbone`."""
    from lvm_jax.tasks.detection import detector

    if self.head == "fcos":
      return detector.FCOS(backbone, self.num_classes, fpn_channels=self.fpn_channels, dtype=dtype)
    return detector.RetinaNet(
      backbone, self.num_classes, version=self.version, fpn_channels=self.fpn_channels, dtype=dtype
    )


class Detection(Task):
  """spec: the detector's settings; class_names / category_ids: of the training source (category_ids[i] is the
  COCO id evaluation reports class i as); ground_truth: the eval split's COCO instances dict, or None to score
  against the boxes the eval batches carry."""

  name = "detection"
  eval_metrics = {"AP": "max", "AP50": "max", "AP75": "max", "APs": "max", "APm": "max", "APl": "max", "AR100": "max"}

  def __init__(
    self,
    spec: DetectorSpec,
    class_names: Optional[Sequence[str]] = None,
    category_ids: Optional[Sequence[int]] = None,
    ground_truth: Optional[dict] = None,
  ):
    self.spec = spec
    self.train_metrics = LOSS_NAMES[spec.head]
    self.class_names = None if class_names is None else list(class_names)
    self.category_ids = list(category_ids) if category_ids is not None else list(range(1, spec.num_classes + 1))
    self.ground_truth = ground_truth

  @classmethod
  def from_config(cls, config, train_source, eval_source) -> "Detection":
    for where, source in (("data.train", train_source), ("data.eval", eval_source)):
      if source is not None and not hasattr(source, "coco_ground_truth"):
        raise ValueError(
          f"task='detection' needs detection data: {where} is a {type(source).__name__}; use kind "
          "'digits_detection', 'coco_folder' or 'tfds_detection'."
        )
    if eval_source is not None and eval_source.class_names != train_source.class_names:
      raise ValueError(
        f"data.eval has classes {eval_source.class_names[:5]}... but data.train has "
        f"{train_source.class_names[:5]}...: they must be the same, in the same order."
      )
    spec = spec_from_config(config, num_classes=config.num_classes or train_source.num_classes)
    ground_truth = eval_source.coco_ground_truth() if eval_source is not None else None
    return cls(spec, train_source.class_names, train_source.category_ids, ground_truth)

  def build_model(self, config) -> ModelInit:
    from lvm_jax.tasks.detection import model_builder

    return model_builder.build(config, self.spec)

  def check_data(self, element_spec: dict, pp_name: str) -> None:
    missing = [k for k in ("boxes", "labels", "box_mask") if k not in element_spec]
    if missing:
      raise ValueError(
        f"{pp_name} gives batches without {', '.join(missing)}: a detection pp ends with det_pad_boxes(max_boxes) "
        "(e.g. 'det_decode|det_resize_pad(512)|det_pad_boxes(100)')."
      )

  def loss(self, outputs: dict, batch: dict) -> tuple[jax.Array, dict]:
    parts = self.spec.losses(outputs, batch)
    return sum(parts.values()), parts

  def eval_batch(self, outputs: dict, batch: dict) -> dict:
    """The batch's detections (clipped to each image's resized extent, as torchvision) and what COCO evaluation
    needs of the batch; image ids travel as int32 on the device (COCO's, KITTI's and the digits' all fit)."""
    canvas = batch["image"].shape[1:3]
    resized = jnp.round(batch["orig_size"].astype(jnp.float32) * batch["scale"][:, None])
    found = self.spec.detections(outputs, canvas, jnp.minimum(resized, jnp.asarray(canvas, jnp.float32)))
    keep = ("image_id", "scale", "orig_size", "mask", "boxes", "labels", "box_mask")
    return {**{f"det_{k}": v for k, v in found.items()}, **{k: batch[k] for k in keep}}

  def summarize_eval(self, per_batch: Sequence[dict]) -> dict:
    from lvm_jax.tasks.detection import coco_eval

    joined = {k: np.concatenate([np.asarray(b[k]) for b in per_batch]) for k in per_batch[0]}
    detections = {k.removeprefix("det_"): v for k, v in joined.items() if k.startswith("det_")}
    batch = {k: v for k, v in joined.items() if not k.startswith("det_")}
    result = coco_eval.evaluate(detections, batch, self.category_ids, ground_truth=self.ground_truth)
    return {name: result.metrics[name] for name in self.eval_metrics}

  def save_run_files(self, workdir: str, model=None, normalize=None) -> None:
    from lvm_jax.data import sources
    from lvm_jax.tasks.detection import model_builder

    if self.class_names is not None:
      sources.write_class_names(self.class_names, os.path.join(workdir, classification.CLASS_NAMES_FILE))
    if model is not None:
      model_builder.save_description(workdir, model, self.spec, normalize)

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
    """The run's detections on `image` (those above its score threshold and `min_score`), one line each (JSON
    with as_json); `output` also draws them on the image. top_k is classification's: it does not apply here."""
    from lvm_jax.tasks.detection import predict as predict_lib

    detector = predict_lib.Detector.from_workdir(workdir, step)
    return predict_lib.run(detector, image, as_json=as_json, output=output, min_score=min_score or 0.0)


def spec_from_config(config, num_classes: int) -> DetectorSpec:
  d = config.detection
  return DetectorSpec(
    head=d.head,
    version=d.version,
    num_classes=num_classes,
    fpn_channels=d.fpn_channels,
    anchor_size=d.anchor_size,
    score_threshold=d.score_threshold,
    topk_candidates=d.topk_candidates,
    nms_threshold=d.nms_threshold,
    detections_per_img=d.detections_per_img,
  )
