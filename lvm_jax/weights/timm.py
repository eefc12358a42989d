"""timm checkpoints (hub id "timm/<architecture>.<tag>" or a folder with timm's config.json + weights)."""

import pathlib

from lvm_jax.models import registry
from lvm_jax.models.resnet import ResNet
from lvm_jax.models.swin import SwinTransformer
from lvm_jax.models.vit import VisionTransformer
from lvm_jax.weights import files, mapping
from lvm_jax.weights import resnet as resnet_weights
from lvm_jax.weights import swin as swin_weights
from lvm_jax.weights import vit as vit_weights

# architecture name prefix -> (converter, model class)
FAMILIES = {
    "vit_": (vit_weights, VisionTransformer),
    "resnet": (resnet_weights, ResNet),
    "swin_": (swin_weights, SwinTransformer),
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
    raise ValueError(f"{source}: timm architecture {config['architecture']!r} is not supported; supported "
                     f"families: {', '.join(p + '*' for p in FAMILIES)}.")
  args = converter.timm_model_args(architecture, dict(config.get("model_args") or {}), config.get("global_pool"))
  args["num_classes"] = int(config.get("num_classes", 1000))
  return converter, cls(**{**args, **overrides})


def load(folder: pathlib.Path, config: dict, **overrides):
  """(model, variables) from a timm folder whose config.json is `config`."""
  converter, model = build_model(config, str(folder), **overrides)
  tensors = converter.timm_prepare(files.read_weights(folder))
  variables = mapping.load_variables(converter.timm_table(model), tensors, registry.abstract_variables(model),
                                     source=str(folder), ignore=converter.TIMM_IGNORE)
  return model, variables
