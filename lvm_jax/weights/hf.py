"""Hugging Face transformers checkpoints: config.json + weights <-> lvm_jax model and variables."""

import pathlib

import flax.linen as nn
import jax
import numpy as np

from lvm_jax.models import registry
from lvm_jax.weights import bit as bit_weights
from lvm_jax.weights import convnext as convnext_weights
from lvm_jax.weights import efficientnet as efficientnet_weights
from lvm_jax.weights import files, mapping
from lvm_jax.weights import resnet as resnet_weights
from lvm_jax.weights import swin as swin_weights
from lvm_jax.weights import vit as vit_weights
from lvm_jax.models.convnext import ConvNeXt
from lvm_jax.models.efficientnet import EfficientNet
from lvm_jax.models.resnet import ResNet
from lvm_jax.models.resnetv2 import ResNetV2
from lvm_jax.models.swin import SwinTransformer
from lvm_jax.models.vit import VisionTransformer

# model_type -> (converter, model class, supported architectures)
FAMILIES = {
  "vit": (vit_weights, VisionTransformer, ("ViTForImageClassification", "ViTModel")),
  "swin": (swin_weights, SwinTransformer, ("SwinForImageClassification", "SwinModel")),
  "resnet": (resnet_weights, ResNet, ("ResNetForImageClassification", "ResNetModel")),
  "convnext": (convnext_weights, ConvNeXt, ("ConvNextForImageClassification", "ConvNextModel")),
  "bit": (bit_weights, ResNetV2, ("BitForImageClassification", "BitModel")),
  "efficientnet": (efficientnet_weights, EfficientNet, ("EfficientNetForImageClassification", "EfficientNetModel")),
}
WEIGHT_FILES = (files.SAFETENSORS, files.SAFETENSORS_INDEX, "model-*.safetensors", "preprocessor_config.json")


def is_hf_config(config: dict) -> bool:
  return "model_type" in config


def _family(config: dict, source: str):
  model_type = config.get("model_type")
  if model_type not in FAMILIES:
    raise ValueError(
      f"{source}: model_type {model_type!r} is not supported; supported Hugging Face model types: "
      f"{', '.join(sorted(FAMILIES))}."
    )
  converter, cls, architectures = FAMILIES[model_type]
  arch = (config.get("architectures") or [architectures[0]])[0]
  if arch not in architectures:
    raise ValueError(f"{source}: architecture {arch!r} is not supported; supported: {', '.join(architectures)}.")
  return converter, cls, arch


def labels_from_config(config: dict) -> list[str] | None:
  id2label = config.get("id2label")
  if not id2label:
    return None
  return [str(id2label[k]) for k in sorted(id2label, key=int)]


def build_model(config: dict, names: set[str], source: str, **overrides):
  """The lvm_jax model that a transformers config.json (and the tensor names present) describe."""
  converter, cls, arch = _family(config, source)
  args = converter.hf_model_args(config)
  if arch.endswith("ForImageClassification"):
    labels = labels_from_config(config)
    args["num_classes"] = len(labels) if labels else int(config.get("num_labels", 2))
  else:
    args["num_classes"] = 0
    if converter is vit_weights and "pooler.dense.weight" in names:
      args.update(vit_weights.hf_pooler_args(config))
  return registry.build(cls, args, overrides)


def table_for(model, tensors: dict) -> list[mapping.Tensor]:
  converter = FAMILIES[_model_type(model)][0]
  table = converter.hf_table(model)
  if not any(name.startswith(converter.HF_PREFIX) for name in tensors):  # a base model (ViTModel, ...)
    table = [mapping.Tensor(t.path, t.name.removeprefix(converter.HF_PREFIX), t.layout) for t in table]
  return table


def _model_type(model) -> str:
  for model_type, (_, cls, _) in FAMILIES.items():
    if isinstance(model, cls):
      return model_type
  raise TypeError(
    f"{type(model).__name__} cannot be saved as a Hugging Face checkpoint; supported: "
    f"{', '.join(cls.__name__ for _, cls, _ in FAMILIES.values())}."
  )


def load(folder: pathlib.Path, config: dict, **overrides):
  """(model, variables, labels) from a transformers folder whose config.json is `config`."""
  _family(config, str(folder))  # an unsupported architecture is reported before reading any weights
  tensors = files.read_weights(folder)
  model = build_model(config, set(tensors), str(folder), **overrides)
  converter = FAMILIES[config["model_type"]][0]
  variables = mapping.load_variables(
    table_for(model, tensors),
    tensors,
    registry.abstract_variables(model),
    source=str(folder),
    ignore=converter.HF_IGNORE,
  )
  return model, variables, labels_from_config(config)


def save(model, variables, folder, *, labels=None) -> pathlib.Path:
  """Writes config.json + model.safetensors that transformers' from_pretrained loads into the same network."""
  model_type = _model_type(model)
  converter = FAMILIES[model_type][0]
  config = converter.hf_config(model)
  if model.num_classes:
    labels = list(labels) if labels is not None else [f"LABEL_{i}" for i in range(model.num_classes)]
    if len(labels) != model.num_classes:
      raise ValueError(f"{len(labels)} labels given for a model with num_classes={model.num_classes}.")
    config["id2label"] = {str(i): name for i, name in enumerate(labels)}
    config["label2id"] = {name: i for i, name in enumerate(labels)}
  config["torch_dtype"] = "float32"
  tensors = mapping.save_tensors(converter.hf_table(model), _to_numpy(variables))
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  files.write_safetensors(tensors, folder / files.SAFETENSORS)
  files.write_json(config, folder / "config.json")
  return folder


def _to_numpy(variables) -> dict:
  return jax.tree.map(lambda x: np.asarray(x, np.float32), nn.meta.unbox(dict(variables)))
