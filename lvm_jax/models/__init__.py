"""Model families as plain Flax linen modules."""

from lvm_jax.models.convnext import ConvNeXt
from lvm_jax.models.efficientnet import EfficientNet
from lvm_jax.models.mobilenetv2 import MobileNetV2
from lvm_jax.models.registry import create_model, list_models
from lvm_jax.models.resnet import ResNet
from lvm_jax.models.resnetv2 import ResNetV2
from lvm_jax.models.swin import SwinTransformer
from lvm_jax.models.vit import VisionTransformer

__all__ = [
  "ConvNeXt",
  "EfficientNet",
  "MobileNetV2",
  "ResNet",
  "ResNetV2",
  "SwinTransformer",
  "VisionTransformer",
  "create_model",
  "list_models",
]
