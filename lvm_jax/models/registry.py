"""Variant names ("vit_b16", "resnet50", "swin_t", "convnext_tiny") mapped to model classes and their arguments."""

import dataclasses
import difflib
import fnmatch
from typing import Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from lvm_jax.models import convnext, efficientnet, mobilenetv2, resnet, resnetv2, swin, vit

FAMILIES = (
  (vit.VisionTransformer, vit.VARIANTS),
  (resnet.ResNet, resnet.VARIANTS),
  (swin.SwinTransformer, swin.VARIANTS),
  (convnext.ConvNeXt, convnext.VARIANTS),
  (resnetv2.ResNetV2, resnetv2.VARIANTS),
  (efficientnet.EfficientNet, efficientnet.VARIANTS),
  (mobilenetv2.MobileNetV2, mobilenetv2.VARIANTS),
)
_MODELS = {name: (cls, args) for cls, variants in FAMILIES for name, args in variants.items()}


def list_models(pattern: str = "*") -> list[str]:
  """Registered variant names matching a glob pattern, e.g. list_models("vit_*")."""
  return sorted(name for name in _MODELS if fnmatch.fnmatch(name, pattern))


def _arguments(cls: type) -> list[dataclasses.Field]:
  return [f for f in dataclasses.fields(cls) if f.name not in ("parent", "name")]


def _is_module_class(value) -> bool:
  return isinstance(value, type) and issubclass(value, nn.Module)


def model_fields(cls: type) -> list[str]:
  """The model's hyper-parameters: its arguments less those that take a module (ResNet's conv and norm), which
  have no plain-data form to record (a workdir's model.json) and are rebuilt from their defaults."""
  return [f.name for f in _arguments(cls) if not _is_module_class(f.default)]


def build(cls: type, args: Mapping, overrides: Mapping, variant: Optional[str] = None) -> nn.Module:
  """cls(**args) with `overrides` replacing arguments: how create_model and every checkpoint loader build a model.

  Raises:
    TypeError: an override that is not one of cls's arguments (they are listed); `variant` names the variant in
      the message.
  """
  arguments = [f.name for f in _arguments(cls)]
  unknown = sorted(set(overrides) - set(arguments))
  if unknown:
    what = f"{cls.__name__} ({variant})" if variant else cls.__name__
    raise TypeError(
      f"{what} has no argument {', '.join(map(repr, unknown))}; its arguments are: {', '.join(arguments)}."
    )
  return cls(**{**args, **overrides})


def create_model(name: str, **overrides) -> nn.Module:
  """Builds a registered variant.

  Args:
    name: a registered name, e.g. "vit_b16", "resnet50", "swin_t" (list_models() gives them all).
    **overrides: replace the variant's arguments (num_classes, dtype, drop_path, image_size, ...); any field of its
      class (VisionTransformer, ResNet, SwinTransformer, ConvNeXt).

  Returns:
    The flax.linen Module (not initialized: call model.init for variables).

  Raises:
    ValueError: an unknown name (with the closest known ones). TypeError: an override the class does not have.
  """
  if name not in _MODELS:
    close = difflib.get_close_matches(name, _MODELS, n=5, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"Unknown model {name!r}.{hint} Known models: {', '.join(list_models())}.")
  cls, args = _MODELS[name]
  return build(cls, args, overrides, name)


def abstract_variables(model: nn.Module) -> dict:
  """The model's variables as shapes only (jax.eval_shape: no memory), with logical-axis boxes removed."""
  size = getattr(model, "image_size", 224)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3), jnp.float32)))
  return nn.meta.unbox(shapes)
