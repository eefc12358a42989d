"""One-stage detectors: a backbone's stride-8/16/32 maps through an FPN (P3..P7) into RetinaNet's or FCOS's head.

The backbone is any module whose `backbone(x, train=train, return_features=True)` returns a dict with "stride_8",
"stride_16" and "stride_32" NHWC maps (ResNet and SwinTransformer do). A detector's __call__(images, *, train)
returns the heads' per-level outputs (heads.py); anchors, losses and post-processing live beside it in this
package and never in the model.

A detector describes its parameters to the optimizer as the classifiers do (models/param_groups.py): backbone
parameters take the backbone's own layer ids and no-weight-decay patterns, the FPN and heads the last layer id.
"""

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from lvm_jax.models import layers, param_groups, registry
from lvm_jax.tasks.detection.fpn import FeaturePyramid
from lvm_jax.tasks.detection.heads import FCOSHead, RetinaNetHead
from lvm_jax.weights import mapping

FEATURE_KEYS = ("stride_8", "stride_16", "stride_32")  # C3, C4, C5
RETINANET_VERSIONS = ("v1", "v2")
_BACKBONE, _PARTS = "backbone", ("fpn", "head")


class _Detector(nn.Module):
  """What every detector here shares: backbone -> FPN (self.fpn) -> head (self.head, both made by the subclass's
  setup), and the parameter description for the optimizer."""

  backbone: nn.Module
  num_classes: int

  def pyramid(self, images: jax.Array, *, train: bool = False) -> list[jax.Array]:
    """The FPN maps P3..P7, NHWC."""
    return self.fpn(self.backbone_features(images, train))

  def __call__(self, images: jax.Array, *, train: bool = False) -> dict[str, list[jax.Array]]:
    return self.head(self.pyramid(images, train=train))

  def backbone_features(self, images: jax.Array, train: bool) -> list[jax.Array]:
    features = self.backbone(images, train=train, return_features=True)
    missing = [k for k in FEATURE_KEYS if k not in features]
    if missing:
      raise ValueError(
        f"{type(self.backbone).__name__} with return_features=True gave {sorted(features)}; a detector needs "
        f"{', '.join(FEATURE_KEYS)} (missing {', '.join(missing)})."
      )
    return [features[k] for k in FEATURE_KEYS]

  def layer_id(self, path: str) -> Optional[int]:
    """The backbone's id for its parameters (path below "backbone/"), the last id for the FPN and the heads."""
    below = param_groups.relative_path(path, _BACKBONE)
    if below is not None:
      return self.backbone.layer_id(below)
    return self.num_layer_ids() - 1 if param_groups.top_level(path) in _PARTS else None

  def num_layer_ids(self) -> int:
    return self.backbone.num_layer_ids()

  def no_weight_decay(self) -> tuple[str, ...]:
    # The backbone's patterns are written to match at any depth (param_groups), so they hold below "backbone/".
    return tuple(dict.fromkeys(param_groups.NO_WEIGHT_DECAY + tuple(self.backbone.no_weight_decay())))


class RetinaNet(_Detector):
  """RetinaNet (Lin et al. 2017) as torchvision's retinanet_resnet50_fpn ("v1") and retinanet_resnet50_fpn_v2
  ("v2": P6 from C5, GroupNorm in the head towers; its GIoU box loss lives in losses.py).

  __call__(images [B, H, W, 3] normalized, *, train) -> {"cls_logits": per level [B, H_l*W_l*A, num_classes],
  "box_regression": per level [B, H_l*W_l*A, 4]}, levels P3..P7. `pyramid` gives the FPN maps alone.
  """

  version: str = "v1"
  fpn_channels: int = 256
  num_anchors: int = 9
  prior_probability: float = 0.01
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    if self.version not in RETINANET_VERSIONS:
      raise ValueError(f"RetinaNet version must be one of {RETINANET_VERSIONS}, got {self.version!r}.")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.fpn = FeaturePyramid(self.fpn_channels, extra_from="p5" if self.version == "v1" else "c5", **kw)
    self.head = RetinaNetHead(
      self.num_classes, self.num_anchors, self.version, prior_probability=self.prior_probability, **kw
    )


class FCOS(_Detector):
  """FCOS (Tian et al. 2019) as torchvision's fcos_resnet50_fpn (P6 from P5, as its LastLevelP6P7(256, 256)).

  __call__(images [B, H, W, 3] normalized, *, train) -> {"cls_logits": per level [B, H_l*W_l, num_classes],
  "box_regression": per level [B, H_l*W_l, 4], "centerness": per level [B, H_l*W_l, 1]}, levels P3..P7.
  """

  fpn_channels: int = 256
  prior_probability: float = 0.01
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.fpn = FeaturePyramid(self.fpn_channels, extra_from="p5", **kw)
    self.head = FCOSHead(self.num_classes, prior_probability=self.prior_probability, **kw)


def head_and_version(model: _Detector) -> tuple[str, str]:
  """("retinanet", "v1" | "v2") or ("fcos", "v1"): the DetectorSpec head and version of a detector module."""
  return ("fcos", "v1") if isinstance(model, FCOS) else ("retinanet", model.version)


def resnet_backbone(variant: str = "resnet50", *, frozen_batchnorm: bool = True, bn_eps: float = 1e-5, **overrides):
  """Our ResNet built as torchvision's detection backbones: no classifier, no zero-initialised last norm
  (torchvision's zero_init_residual=False), and BatchNorm frozen (layers.FrozenBatchNorm, torchvision's
  FrozenBatchNorm2d: retinanet_resnet50_fpn and fcos_resnet50_fpn with pretrained weights) or ordinary
  (retinanet_resnet50_fpn_v2).

  Args:
    variant: a registered ResNet ("resnet18" .. "resnet152").
    frozen_batchnorm: fixed statistics and affine, all in `batch_stats`, never trained.
    bn_eps: torchvision's COCO RetinaNet v1 checkpoint runs with eps 0.0 (its overwrite_eps); others with 1e-5.
    **overrides: other ResNet fields (dtype, drop_path, ...).

  Returns:
    The ResNet module, for a detector's `backbone`.
  """
  norm = layers.FrozenBatchNorm if frozen_batchnorm else nn.BatchNorm
  args = dict(num_classes=0, zero_init_last=False, norm=norm, bn_eps=bn_eps)
  return registry.create_model(variant, **{**args, **overrides})


def frozen_backbone_patterns(trainable_layers: int = 3) -> tuple[str, ...]:
  """Regexes for the optimizer's `frozen` option that freeze a ResNet backbone as torchvision's
  trainable_backbone_layers does: of [stage 3, stage 2, stage 1, stage 0, stem] the first `trainable_layers`
  train, the rest are frozen (torchvision's default 3 freezes the stem and the first stage)."""
  if not 0 <= trainable_layers <= 5:
    raise ValueError(f"trainable_layers must be in 0..5 (as torchvision's), got {trainable_layers}.")
  frozen = [] if trainable_layers == 5 else [rf"^{_BACKBONE}/stem_"]
  return tuple(frozen + [rf"^{_BACKBONE}/stage_{s}_" for s in range(4 - trainable_layers)])


def load_backbone(variables: Mapping, backbone_variables: Mapping) -> dict:
  """`variables` of a detector with its backbone's replaced by `backbone_variables` (a classifier's: e.g. our
  ImageNet ResNet from from_pretrained; its head and other unused entries are ignored). Arrays are taken as they
  are (no copy, no cast).

  A frozen norm keeps scale and bias in `batch_stats` where an ordinary BatchNorm has them in `params`; each is
  taken from whichever collection the classifier has it in.

  Raises:
    ValueError: a backbone variable the classifier lacks, or has in another shape (every one named).
  """
  source = mapping.flatten(nn.meta.unbox(backbone_variables))
  out, problems = {}, []
  for path, value in mapping.flatten(nn.meta.unbox(variables)).items():
    if len(path) < 2 or path[1] != _BACKBONE:
      out[path] = value
      continue
    collection, below = path[0], path[2:]
    other = "batch_stats" if collection == "params" else "params"
    found = source.get((collection,) + below, source.get((other,) + below))
    if found is None:
      problems.append(f"missing {mapping.path_str(below)} (the detector's {mapping.path_str(path)})")
    elif tuple(found.shape) != tuple(value.shape):
      problems.append(f"{mapping.path_str(below)}: backbone has {tuple(found.shape)}, detector {tuple(value.shape)}")
    else:
      out[path] = found
  if problems:
    raise ValueError("Backbone variables do not fit the detector's backbone:\n  " + "\n  ".join(problems))
  return mapping.unflatten(out)
