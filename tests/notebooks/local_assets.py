"""The offline stand-ins the notebooks read when LVM_JAX_NOTEBOOK_LOCAL=DIR is set: what they would download,
small, under the same names, so that the notebooks run the code users run on other inputs.

  python -m tests.notebooks.local_assets DIR

- vit-base-patch16-224/, swin-tiny-patch4-window7-224/, resnet-50/: transformers checkpoints
  (`save_pretrained`), the hub models' architectures at a small width and depth with random weights, their
  1000 ImageNet class names and the hub models' own preprocessor_config.json.
- 000000039769.jpg: a photo of a cat (scikit-image's chelsea) in place of the COCO photo.
- flower_photos/: class folders of JPEGs (scikit-learn's handwritten digits, four classes) laid out as the
  TensorFlow flowers archive is, LICENSE.txt included.
- retinanet_resnet50_fpn_coco.safetensors: torchvision's retinanet_resnet50_fpn state dict layout (every key and
  shape of the real checkpoint) with deterministic random weights (tests/fixtures/torchvision/random_state_dict.py).
"""

import json
import pathlib
import shutil
import sys

import numpy as np
import PIL.Image
from sklearn.datasets import load_digits
from transformers import (
  ResNetConfig,
  ResNetForImageClassification,
  SwinConfig,
  SwinForImageClassification,
  ViTConfig,
  ViTForImageClassification,
)

from lvm_jax.tasks.classify import imagenet1k_class_names
from lvm_jax.weights import files
from tests import torch_reference
from tests.fixtures.torchvision.random_state_dict import random_state_dict

REPO = pathlib.Path(__file__).resolve().parents[2]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# The hub models' configurations at a small size, and their preprocessor_config.json as published.
CHECKPOINTS = {
  "vit-base-patch16-224": (
    ViTForImageClassification,
    ViTConfig(
      image_size=224, patch_size=16, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128
    ),
    {
      "image_processor_type": "ViTImageProcessor",
      "size": {"height": 224, "width": 224},
      "resample": 2,
      "image_mean": [0.5, 0.5, 0.5],
      "image_std": [0.5, 0.5, 0.5],
    },
  ),
  "swin-tiny-patch4-window7-224": (
    SwinForImageClassification,
    SwinConfig(image_size=224, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=7),
    {
      "image_processor_type": "ViTImageProcessor",
      "size": {"height": 224, "width": 224},
      "resample": 3,
      "image_mean": IMAGENET_MEAN,
      "image_std": IMAGENET_STD,
    },
  ),
  "resnet-50": (
    ResNetForImageClassification,
    ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], layer_type="bottleneck"),
    {
      "image_processor_type": "ConvNextImageProcessor",
      "size": {"shortest_edge": 224},
      "crop_pct": 0.875,
      "resample": 3,
      "image_mean": IMAGENET_MEAN,
      "image_std": IMAGENET_STD,
    },
  ),
}
DIGIT_CLASSES = {0: "zero", 1: "one", 7: "seven", 8: "eight"}
IMAGES_PER_CLASS = 100


def write_checkpoints(folder: pathlib.Path) -> None:
  labels = list(imagenet1k_class_names())
  for seed, (name, (model_class, config, preprocessor)) in enumerate(CHECKPOINTS.items()):
    torch_reference.save_classifier(folder / name, model_class, config, labels, preprocessor, seed)


def write_flower_photos(folder: pathlib.Path) -> None:
  digits = load_digits()
  root = folder / "flower_photos"
  root.mkdir(parents=True)
  (root / "LICENSE.txt").write_text("Stand-in images: scikit-learn's handwritten digits.\n")
  for digit, name in DIGIT_CLASSES.items():
    (root / name).mkdir()
    for i, image in enumerate(digits.images[digits.target == digit][:IMAGES_PER_CLASS]):
      pixels = np.uint8(255 - image * 255 / 16)  # dark strokes on white, as a photo of a digit
      PIL.Image.fromarray(pixels).convert("RGB").resize((64, 64), PIL.Image.BICUBIC).save(
        root / name / f"{name}_{i:03d}.jpg", quality=95
      )


def write_torchvision_retinanet(folder: pathlib.Path) -> None:
  manifest = json.loads((REPO / "tests" / "fixtures" / "torchvision" / "detectors" / "MANIFEST.json").read_text())
  tensors = random_state_dict(manifest["retinanet_resnet50_fpn"]["state_dict"])
  files.write_safetensors(tensors, folder / "retinanet_resnet50_fpn_coco.safetensors")


def write(folder) -> pathlib.Path:
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  write_checkpoints(folder)
  shutil.copy(REPO / "notebooks" / "images" / "cat.jpg", folder / "000000039769.jpg")
  write_flower_photos(folder)
  write_torchvision_retinanet(folder)
  return folder


if __name__ == "__main__":
  print(write(sys.argv[1]))
