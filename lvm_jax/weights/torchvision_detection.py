"""torchvision's one-stage detectors (retinanet_resnet50_fpn, retinanet_resnet50_fpn_v2, fcos_resnet50_fpn): their
state dicts' names and layouts against our RetinaNet / FCOS on a ResNet-50 backbone, and COCO's 91 output names.

A converted COCO checkpoint keeps torchvision's 91 outputs: index = COCO category id; 0 ("__background__") and
the ten ids COCO never used ("N/A") are never trained, exactly as in torchvision.
"""

import dataclasses
from typing import Optional

import flax.linen as nn
import numpy as np

from lvm_jax.models import layers, registry
from lvm_jax.tasks.detection import detector
from lvm_jax.weights import files, mapping
from lvm_jax.weights import resnet as resnet_weights
from lvm_jax.weights.mapping import Tensor, WeightsMismatchError


@dataclasses.dataclass(frozen=True)
class Architecture:
  family: str  # "retinanet" or "fcos"
  version: str  # RetinaNet's "v1" / "v2"; "v1" for FCOS
  frozen_batchnorm: bool
  bn_eps: float
  num_anchors: int


ARCHITECTURES = {
  # The COCO_V1 checkpoint of v1 runs with FrozenBatchNorm2d eps 0.0 (torchvision's overwrite_eps when loading it).
  "retinanet_resnet50_fpn": Architecture("retinanet", "v1", True, 0.0, 9),
  "retinanet_resnet50_fpn_v2": Architecture("retinanet", "v2", False, 1e-5, 9),
  "fcos_resnet50_fpn": Architecture("fcos", "v1", True, 1e-5, 1),
}
IGNORE = ("num_batches_tracked",)  # BatchNorm's training counter (v2); FrozenBatchNorm2d drops it too
CLS_LOGITS = "head.classification_head.cls_logits.weight"
_NUM_CONVS = 4  # convolutions in each head tower, torchvision's default

# torchvision's COCO category names (torchvision.models._meta._COCO_CATEGORIES): output index = COCO category id.
COCO_CATEGORIES = (
  "__background__", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
  "traffic light", "fire hydrant", "N/A", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse",
  "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "N/A", "backpack", "umbrella", "N/A",
  "N/A", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat",
  "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle", "N/A", "wine glass", "cup", "fork", "knife",
  "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza",
  "donut", "cake", "chair", "couch", "potted plant", "bed", "N/A", "dining table", "N/A", "N/A",
  "toilet", "N/A", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
  "toaster", "sink", "refrigerator", "N/A", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
  "toothbrush",
)  # fmt: skip


def _architecture(arch: str) -> Architecture:
  if arch not in ARCHITECTURES:
    raise ValueError(f"Unknown torchvision detector {arch!r}; supported: {', '.join(ARCHITECTURES)}.")
  return ARCHITECTURES[arch]


def build_detector(arch: str, num_classes: int = len(COCO_CATEGORIES), *, bn_eps: Optional[float] = None, **overrides):
  """Our module for torchvision's `arch` with `num_classes` outputs (91 for its COCO checkpoints).

  Args:
    arch: "retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2" or "fcos_resnet50_fpn".
    num_classes: outputs of the classification head.
    bn_eps: the backbone's BatchNorm eps; by default the one torchvision runs its COCO checkpoint with.
    **overrides: other fields of RetinaNet / FCOS (dtype, fpn_channels, ...).

  Returns:
    detector.RetinaNet or detector.FCOS on detector.resnet_backbone("resnet50").
  """
  spec = _architecture(arch)
  eps = spec.bn_eps if bn_eps is None else bn_eps
  backbone = detector.resnet_backbone("resnet50", frozen_batchnorm=spec.frozen_batchnorm, bn_eps=eps)
  if spec.family == "fcos":
    return detector.FCOS(backbone, num_classes, **overrides)
  return detector.RetinaNet(backbone, num_classes, version=spec.version, **overrides)


def _backbone_table(model: nn.Module) -> list[Tensor]:
  """torchvision's ResNet names are timm's (conv1, bn1, layer1.0.conv1, ...), under "backbone.body."."""
  frozen = model.backbone.norm is layers.FrozenBatchNorm
  table = []
  for t in resnet_weights.timm_table(model.backbone.clone(num_classes=0)):
    collection = t.path[0]
    if frozen and collection == "params" and t.layout == "same":
      collection = "batch_stats"  # a BatchNorm's weight and bias: buffers of a FrozenBatchNorm2d, as in torchvision
    table.append(Tensor((collection, "backbone") + t.path[1:], "backbone.body." + t.name, t.layout))
  return table


def _fpn_table() -> list[Tensor]:
  table = []
  for i in range(3):
    table += mapping.dense(("params", "fpn", f"lateral_{i}"), f"backbone.fpn.inner_blocks.{i}.0", "conv")
    table += mapping.dense(("params", "fpn", f"output_{i}"), f"backbone.fpn.layer_blocks.{i}.0", "conv")
  for level in ("p6", "p7"):
    table += mapping.dense(("params", "fpn", level), f"backbone.fpn.extra_blocks.{level}", "conv")
  return table


def _head_table(spec: Architecture) -> list[Tensor]:
  table = []
  for ours, theirs in (("cls_tower", "classification_head"), ("box_tower", "regression_head")):
    tower = ("params", "head", ours)
    for i in range(_NUM_CONVS):
      if spec.family == "fcos":  # nn.Sequential of Conv2d, GroupNorm, ReLU: indices 3i, 3i + 1
        table += mapping.dense(tower + (f"conv_{i}",), f"head.{theirs}.conv.{3 * i}", "conv")
        table += mapping.norm(tower + (f"norm_{i}",), f"head.{theirs}.conv.{3 * i + 1}")
      elif spec.version == "v2":  # Conv2dNormActivation: conv (no bias) .0, GroupNorm .1
        table += mapping.dense(tower + (f"conv_{i}",), f"head.{theirs}.conv.{i}.0", "conv", bias=False)
        table += mapping.norm(tower + (f"norm_{i}",), f"head.{theirs}.conv.{i}.1")
      else:  # Conv2dNormActivation without a norm: conv with bias .0
        table += mapping.dense(tower + (f"conv_{i}",), f"head.{theirs}.conv.{i}.0", "conv")
  predictors = [("cls_logits", "classification_head.cls_logits"), ("box_regression", "regression_head.bbox_reg")]
  if spec.family == "fcos":
    predictors.append(("centerness", "regression_head.bbox_ctrness"))
  for ours, theirs in predictors:
    table += mapping.dense(("params", "head", ours), f"head.{theirs}", "conv")
  return table


def torchvision_table(model: nn.Module, arch: str) -> list[Tensor]:
  """Every variable of `model` (built by build_detector(arch)) against its torchvision state-dict name."""
  return _backbone_table(model) + _fpn_table() + _head_table(_architecture(arch))


def _num_classes(tensors: dict, spec: Architecture, source: str) -> int:
  if CLS_LOGITS not in tensors:
    raise WeightsMismatchError(f"{source} has no {CLS_LOGITS}: it is not a torchvision RetinaNet / FCOS state dict.")
  outputs = int(np.shape(tensors[CLS_LOGITS])[0])
  if outputs % spec.num_anchors:
    raise WeightsMismatchError(
      f"{source}: {CLS_LOGITS} has {outputs} outputs, not a multiple of the {spec.num_anchors} anchors a location."
    )
  return outputs // spec.num_anchors


def convert_state_dict(
  tensors: dict,
  arch: str,
  num_classes: Optional[int] = None,
  *,
  source: str = "state dict",
  bn_eps: Optional[float] = None,
  **overrides,
):
  """(model, variables) from a torchvision state dict (name -> numpy array) of `arch`.

  Args:
    tensors: the state dict.
    arch: see build_detector.
    num_classes: the classification head's outputs; None reads them off the checkpoint.
    source: how errors name the state dict.
    bn_eps, **overrides: as build_detector.

  Raises:
    WeightsMismatchError: a tensor missing, unexpected or of another shape (every one listed).
  """
  spec = _architecture(arch)
  if num_classes is None:
    num_classes = _num_classes(tensors, spec, source)
  model = build_detector(arch, num_classes, bn_eps=bn_eps, **overrides)
  expected = registry.abstract_variables(model)
  variables = mapping.load_variables(torchvision_table(model, arch), tensors, expected, source=source, ignore=IGNORE)
  return model, variables


def infer_architecture(tensors: dict, source: str = "state dict") -> str:
  """Which of ARCHITECTURES a torchvision state dict is, from its names: FCOS has a centerness predictor,
  RetinaNet v2 GroupNorms in its head towers (Conv2dNormActivation's .1), v1 neither."""
  if CLS_LOGITS not in tensors:
    raise WeightsMismatchError(f"{source} has no {CLS_LOGITS}: it is not a torchvision RetinaNet / FCOS state dict.")
  if "head.regression_head.bbox_ctrness.weight" in tensors:
    return "fcos_resnet50_fpn"
  if "head.classification_head.conv.0.1.weight" in tensors:
    return "retinanet_resnet50_fpn_v2"
  return "retinanet_resnet50_fpn"


def is_detector_file(source) -> bool:
  """Whether `source` is one state-dict file (local or http(s)) of a torchvision detector, rather than a classifier's
  state dict, a folder or a hub id."""
  return files.is_state_dict_file(source) and CLS_LOGITS in files.read_state_dict(files.fetch(source))


def load_torchvision_detector(path, arch: Optional[str] = None, num_classes: Optional[int] = None, **kwargs):
  """(model, variables) from a torchvision detector checkpoint file or URL (files.read_state_dict, files.fetch),
  e.g. torchvision's https://download.pytorch.org/models/retinanet_resnet50_fpn_coco-eeacb38b.pth. `arch` (a name in
  ARCHITECTURES) is read off the state dict when None. kwargs as convert_state_dict."""
  tensors = files.read_state_dict(files.fetch(path))
  arch = arch or infer_architecture(tensors, str(path))
  return convert_state_dict(tensors, arch, num_classes, source=str(path), **kwargs)


def to_torchvision_state_dict(model: nn.Module, variables: dict, arch: str) -> dict[str, np.ndarray]:
  """The inverse: our variables as torchvision's state dict (without BatchNorm's num_batches_tracked)."""
  return mapping.save_tensors(torchvision_table(model, arch), nn.meta.unbox(variables))
