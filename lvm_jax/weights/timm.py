"""timm checkpoints (hub id "timm/<architecture>.<tag>" or a folder with timm's config.json + weights)."""

import pathlib

import numpy as np

from lvm_jax.models import registry
from lvm_jax.models.convnext import ConvNeXt
from lvm_jax.models.efficientnet import EfficientNet
from lvm_jax.models.resnet import ResNet
from lvm_jax.models.resnetv2 import ResNetV2
from lvm_jax.models.swin import SwinTransformer
from lvm_jax.models.vit import VisionTransformer
from lvm_jax.weights import bit as bit_weights
from lvm_jax.weights import convnext as convnext_weights
from lvm_jax.weights import efficientnet as efficientnet_weights
from lvm_jax.weights import files, mapping
from lvm_jax.weights import resnet as resnet_weights
from lvm_jax.weights import swin as swin_weights
from lvm_jax.weights import vit as vit_weights

# architecture name prefix -> (converter, model class)
FAMILIES = {
  "vit_": (vit_weights, VisionTransformer),
  "resnetv2_": (bit_weights, ResNetV2),  # before "resnet", which would take it
  "resnet": (resnet_weights, ResNet),
  "swin_": (swin_weights, SwinTransformer),
  "convnext_": (convnext_weights, ConvNeXt),
  "efficientnet_": (efficientnet_weights, EfficientNet),
  "tf_efficientnet_": (efficientnet_weights, EfficientNet),
}


def is_timm_config(config: dict) -> bool:
  return "architecture" in config


def labels_from_config(config: dict) -> list[str] | None:
  names = config.get("label_names") or config.get("pretrained_cfg", {}).get("label_names")
  return [str(n) for n in names] if names else None


def build_model(config: dict, source: str, **overrides):
  architecture = config["architecture"].split(".")[0]
  for prefix, (converter, cls) in FAMILIES.items():
    if architecture.startswith(prefix):
      break
  else:
    raise ValueError(
      f"{source}: timm architecture {config['architecture']!r} is not supported; supported "
      f"families: {', '.join(p + '*' for p in FAMILIES)}."
    )
  args = converter.timm_model_args(architecture, dict(config.get("model_args") or {}), config.get("global_pool"))
  args["num_classes"] = int(config.get("num_classes", 1000))
  return converter, registry.build(cls, args, overrides)


def split_fused_qkv(tensors: dict) -> dict:
  """timm fuses query/key/value into one `qkv` Linear; split it so each maps onto its own kernel."""
  out = {}
  for name, value in tensors.items():
    if name.endswith((".attn.qkv.weight", ".attn.qkv.bias")):
      stem, kind = name.rsplit(".qkv.", 1)
      for part, chunk in zip("qkv", np.split(value, 3, axis=0)):
        out[f"{stem}.{part}.{kind}"] = chunk
    else:
      out[name] = value
  return out


def load(folder: pathlib.Path, config: dict, **overrides):
  """(model, variables) from a timm folder whose config.json is `config`."""
  converter, model = build_model(config, str(folder), **overrides)
  tensors = split_fused_qkv(files.read_weights(folder))
  variables = mapping.load_variables(
    converter.timm_table(model),
    tensors,
    registry.abstract_variables(model),
    source=str(folder),
    ignore=converter.TIMM_IGNORE,
  )
  return model, variables
