"""The detector a run trains, from its config: a backbone (fresh, an ImageNet classifier's, or a torchvision
detector's whole network) under the spec's FPN and head; and the description a workdir keeps of it, so that
predict rebuilds the network from the workdir alone (no hub, no dataset).
"""

import json
import os
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from lvm_jax import normalization  # IMAGENET_DEFAULT: torchvision's detectors' mean/std
from lvm_jax.models import ResNet, layers, registry
from lvm_jax.tasks.detection import backbones, detector
from lvm_jax.train.task import ModelInit

DESCRIPTION_FILE = "detector.json"
# The norm modules a described ResNet may use (its `norm` field takes a class, which JSON cannot hold).
_NORMS = {"BatchNorm": nn.BatchNorm, "FrozenBatchNorm": layers.FrozenBatchNorm}


def build(config, spec) -> ModelInit:
  """ModelInit of the detector `config` asks for (see lvm_jax/tasks/detection/task.py)."""
  dtype = jnp.dtype(config.dtype)
  if "dtype" in config.model_args:
    raise ValueError("model_args.dtype: set the top-level config.dtype instead.")
  if config.detection.weights is not None:
    return _from_torchvision(config.detection.weights, config.detection.torchvision_arch, spec, dtype, config.seed)
  source = {"model": config.model} if config.pretrained is None else {"pretrained": config.pretrained}
  backbone, backbone_variables, mean_std = backbones.build_backbone(
    {**source, "model_args": {**config.model_args, "dtype": dtype}}, seed=config.seed
  )
  if isinstance(backbone, ResNet):
    # As torchvision's detectors: no zero-initialised last norm; a pretrained ResNet's BatchNorm frozen.
    frozen = config.pretrained is not None and config.detection.frozen_batchnorm
    backbone = backbone.clone(zero_init_last=False, **({"norm": layers.FrozenBatchNorm} if frozen else {}))
  model = spec.build(backbone, dtype)
  if backbone_variables is None:
    return ModelInit(model)
  variables = detector.load_backbone(_init(model, config.seed), backbone_variables)
  return ModelInit(model, variables, mean_std)


def _init(model: nn.Module, seed: int) -> dict:
  """Fresh variables of `model`, initialised on a small canvas (parameters do not depend on its size)."""
  size = 64
  if isinstance(model.backbone, backbones.ViTBackbone):
    size = max(max(model.backbone.strides), model.backbone.vit.patch_stride) * 2
  images = jnp.zeros((1, size, size, 3), jnp.float32)
  return nn.meta.unbox(jax.jit(lambda key: model.init(key, images, train=False))(jax.random.key(seed)))


def _from_torchvision(path: str, arch: str, spec, dtype, seed: int) -> ModelInit:
  """A torchvision detector checkpoint as the whole network; a new classification layer when the class count
  differs (e.g. KITTI from COCO), initialised as the head initialises it."""
  from lvm_jax.weights import torchvision_detection

  model, variables = torchvision_detection.load_torchvision_detector(path, arch)
  head, version = detector.head_and_version(model)
  if (head, version) != (spec.head, spec.version):
    raise ValueError(
      f"detection.weights={path} is a {head} {version} checkpoint but the config asks for detection.head="
      f"{spec.head!r}, version={spec.version!r}: set them to the checkpoint's."
    )
  if model.num_classes != spec.num_classes:
    model = model.clone(num_classes=spec.num_classes)
    fresh = _init(model, seed)
    variables = _replace_class_logits(variables, fresh)
  if jnp.dtype(dtype) != jnp.float32:
    model = model.clone(dtype=dtype)
  return ModelInit(model, variables, normalization.IMAGENET_DEFAULT)


def _replace_class_logits(variables: dict, fresh: dict) -> dict:
  """`variables` with every leaf whose shape differs from `fresh`'s (the class-count-sized ones) taken from
  `fresh`."""
  return jax.tree.map(lambda old, new: new if old.shape != new.shape else old, variables, fresh)


# ----------------------------------------------------------------------------------------- the workdir's copy


def _describe(module: nn.Module) -> dict:
  """A registered family's class and plain-data arguments (module-valued ones nested or named)."""
  args = {}
  for name in registry.model_fields(type(module)) + ["norm"] * hasattr(module, "norm"):
    value = getattr(module, name)
    if isinstance(value, nn.Module):
      value = _describe(value)
    elif name == "norm":
      value = {"norm": value.__name__}
    elif name in ("dtype", "param_dtype"):
      value = jnp.dtype(value).name
    elif isinstance(value, tuple):
      value = list(value)
    args[name] = value
  return {"class": type(module).__name__, "args": args}


def _rebuild(description: dict) -> nn.Module:
  classes = {cls.__name__: cls for cls, _ in registry.FAMILIES}
  classes.update(ViTBackbone=backbones.ViTBackbone, RetinaNet=detector.RetinaNet, FCOS=detector.FCOS)
  name = description.get("class")
  if name not in classes:
    raise ValueError(f"{DESCRIPTION_FILE}: model class {name!r} is not one of {sorted(classes)}.")
  args = {}
  for key, value in description["args"].items():
    if isinstance(value, dict) and "class" in value:
      value = _rebuild(value)
    elif isinstance(value, dict) and "norm" in value:
      value = _NORMS[value["norm"]]
    elif key in ("dtype", "param_dtype"):
      value = jnp.dtype(value)
    elif isinstance(value, list):
      value = tuple(value)
    args[key] = value
  return classes[name](**args)


def save_description(workdir: str, model: nn.Module, spec, normalize: Optional[tuple]) -> None:
  """WORKDIR/detector.json: the network (its class tree and arguments), the detection spec and the input
  normalization: what predict needs besides the checkpoint and the class names."""
  from lvm_jax.tf_host import tf

  description = {
    "model": _describe(model),
    "spec": {k: v for k, v in vars(spec).items()},
    "normalize": None if normalize is None else [list(normalize[0]), list(normalize[1])],
  }
  path = os.path.join(workdir, DESCRIPTION_FILE)
  with tf.io.gfile.GFile(path + ".tmp", "w") as f:
    json.dump(description, f, indent=1)
  tf.io.gfile.rename(path + ".tmp", path, overwrite=True)


def load_description(workdir: str) -> tuple[nn.Module, Any, Optional[tuple]]:
  """(model, spec, normalize) from WORKDIR/detector.json."""
  from lvm_jax.tasks.detection.task import DetectorSpec
  from lvm_jax.tf_host import tf

  path = os.path.join(workdir, DESCRIPTION_FILE)
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(f"{workdir} has no {DESCRIPTION_FILE}: it is not the workdir of a detection run.")
  with tf.io.gfile.GFile(path) as f:
    description = json.load(f)
  normalize = description["normalize"]
  return (
    _rebuild(description["model"]),
    DetectorSpec(**description["spec"]),
    None if normalize is None else tuple(map(tuple, normalize)),
  )
