"""lvm_jax: large vision models (ViT, ResNet, Swin, ConvNeXt) in JAX/Flax."""

from lvm_jax.kernels import cpu_kernels_enabled, use_cpu_kernels
from lvm_jax.models import ConvNeXt, EfficientNet, MobileNetV2, ResNet, ResNetV2, SwinTransformer, VisionTransformer
from lvm_jax.models.registry import abstract_variables, create_model, list_models
from lvm_jax.tasks.classify import Classifier, Prediction, classify
from lvm_jax.weights.mapping import WeightsMismatchError
from lvm_jax.weights.pretrained import Checkpoint, from_pretrained, load_checkpoint, save_pretrained
from lvm_jax.weights.preprocessing import Preprocessing

__all__ = [
  "Checkpoint",
  "Classifier",
  "ConvNeXt",
  "EfficientNet",
  "MobileNetV2",
  "Prediction",
  "Preprocessing",
  "ResNet",
  "ResNetV2",
  "SwinTransformer",
  "VisionTransformer",
  "WeightsMismatchError",
  "abstract_variables",
  "classify",
  "cpu_kernels_enabled",
  "create_model",
  "from_pretrained",
  "list_models",
  "load_checkpoint",
  "save_pretrained",
  "use_cpu_kernels",
]
