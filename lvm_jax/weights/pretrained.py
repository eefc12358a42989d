"""from_pretrained / save_pretrained: one entry point for every weight source lvm_jax reads."""

import dataclasses
import pathlib
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lvm_jax.models import vit
from lvm_jax.weights import big_vision, files, hf, timm, transfer
from lvm_jax.weights import torchvision as torchvision_weights
from lvm_jax.weights.preprocessing import Preprocessing


@dataclasses.dataclass
class Checkpoint:
  """A loaded checkpoint: the model, its variables, class names and the input preprocessing it was trained with."""

  model: nn.Module
  variables: dict
  labels: Optional[list[str]]
  preprocessing: Optional[Preprocessing]  # None when the checkpoint's preprocessor config is one we cannot apply
  source: str
  preprocessing_error: Optional[str] = None


def _hub_folder(source: str) -> pathlib.Path:
  folder = files.resolve_folder(source, hf.WEIGHT_FILES)
  if not any(folder.glob("*.safetensors")) and not (folder / files.SAFETENSORS_INDEX).exists():
    folder = files.resolve_folder(source, (files.TORCH_BIN, files.TORCH_BIN_INDEX, "pytorch_model-*.bin"))
  return folder


def load_checkpoint(source: str, **overrides: Any) -> Checkpoint:
  """Reads a checkpoint exactly as saved: its own architecture, head and image size.

  Args:
    source: one of
      - a Hugging Face transformers folder or hub id (config.json with model_type vit / swin / resnet / convnext / bit /
        efficientnet),
      - a timm folder or hub id such as "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k" (config.json with
        "architecture"),
      - a big_vision / vision_transformer .npz file (ViT or a ResNet hybrid such as R50+ViT-B/16), or a
        big_transfer one (BiT ResNetV2); the architecture is read from the tensor names and shapes.
      - a torchvision classifier (MobileNetV2, ResNet): a state dict file (.pth / .pt / .bin read with
        torch.load(weights_only=True), or .safetensors), its download.pytorch.org URL, or "torchvision/<name>"
        ("torchvision/mobilenet_v2", "torchvision/resnet50": weights/torchvision.py); the architecture is read
        off the tensor names.
      Hub ids are downloaded with huggingface_hub, or read from its cache when offline.
    **overrides: model arguments that do not change the weights (dtype, drop_path, dropout, ...);
      scan_layers=True (ViT) loads the per-layer checkpoint and stacks its blocks (vit.stack_blocks).

  Returns:
    A Checkpoint: the model, its variables (in the model's param_dtype), the class names (None when the
    checkpoint has none) and the input preprocessing it was trained with (None, with preprocessing_error saying
    why, when its preprocessor config is one this library cannot apply).

  Raises:
    WeightsMismatchError: the tensors do not fit the architecture of the config (every mismatch listed).
    FileNotFoundError, ValueError: the source cannot be found or read, or is not a supported architecture.
  """
  scan = overrides.pop("scan_layers", False)
  source = str(source)
  path = pathlib.Path(source).expanduser()
  if torchvision_weights.is_source(source):
    model, variables = torchvision_weights.load(source, **overrides)
    labels, read_preprocessing = None, torchvision_weights.preprocessing
  elif path.suffix == ".npz":
    if not path.is_file():
      raise FileNotFoundError(f"{source} does not exist.")
    model, variables = big_vision.load(path, **overrides)
    labels, read_preprocessing = None, lambda: big_vision.preprocessing(model)
  else:
    folder = _hub_folder(source)
    config = files.read_json(folder / "config.json")
    if hf.is_hf_config(config):
      model, variables, labels = hf.load(folder, config, **overrides)
      read_preprocessing = lambda: Preprocessing.from_hf(folder / "preprocessor_config.json", model)
    elif timm.is_timm_config(config):
      model, variables = timm.load(folder, config, **overrides)
      labels = timm.labels_from_config(config)
      read_preprocessing = lambda: Preprocessing.from_timm(config)
    else:
      raise ValueError(
        f"{folder / 'config.json'} is neither a Hugging Face transformers config (no "
        "'model_type') nor a timm config (no 'architecture')."
      )
  variables = jax.tree.map(lambda x: jnp.asarray(x, model.param_dtype), variables)
  if scan:
    model, variables = _scanned(model, variables)
  try:
    preprocessing, error = read_preprocessing(), None
  except ValueError as e:  # the weights are still usable; only classifying raw images needs this
    preprocessing, error = None, str(e)
  return Checkpoint(model, variables, labels, preprocessing, source, error)


def _scanned(model, variables):
  """The per-layer ViT as loaded, in the scan_layers layout."""
  if not isinstance(model, vit.VisionTransformer):
    raise ValueError(f"scan_layers=True is a VisionTransformer option; this checkpoint is a {type(model).__name__}.")
  return model.clone(scan_layers=True), {**variables, "params": vit.stack_blocks(variables["params"])}


def _per_layer(model, variables):
  """A scan_layers ViT in the per-layer layout the converters read and write."""
  if not getattr(model, "scan_layers", False):
    return model, variables
  variables = nn.meta.unbox(dict(variables))
  return model.clone(scan_layers=False), {**variables, "params": vit.unstack_blocks(variables["params"])}


def from_pretrained(
  source: str, *, num_classes: Optional[int] = None, image_size: Optional[int] = None, seed: int = 0, **overrides: Any
):
  """(model, variables) from a pretrained checkpoint, optionally re-targeted for transfer learning.

  Args:
    source: anything load_checkpoint reads (a transformers or timm hub id or folder, a big_vision .npz file).
    num_classes: a new head, freshly initialised (0 removes the head: the model returns pooled features);
      None keeps the checkpoint's head.
    image_size: the input size to fine-tune at; ViT position embeddings are resized (bicubic on the 2-D grid),
      and a Swin whose window is image_size // 32 (7 at 224, 12 at 384, as the released models) keeps that
      rule, with its relative position bias tables resized. None keeps the checkpoint's size.
    seed: the key of the new head's initialisation.
    **overrides: model arguments that do not change the weights (dtype, drop_path, scan_layers, ...).

  Returns:
    (model, variables): a flax module and its variables ({"params", ...}; "batch_stats" for ResNet), ready for
    model.apply(variables, images, train=False).
  """
  ckpt = load_checkpoint(source, **overrides)
  return retarget(ckpt.model, ckpt.variables, num_classes=num_classes, image_size=image_size, seed=seed)


def retarget(model, variables, *, num_classes=None, image_size=None, seed=0):
  changes = {}
  if num_classes is not None and num_classes != model.num_classes:
    changes["num_classes"] = num_classes
  if image_size is not None and image_size != getattr(model, "image_size", image_size):
    changes["image_size"] = image_size
    if hasattr(model, "window_size") and model.window_size == model.image_size // 32:
      changes["window_size"] = image_size // 32  # the released Swins: window 7 at 224, 12 at 384
  if not changes:
    return model, variables
  target = model.clone(**changes)
  new_variables = transfer.transfer(jax.tree.map(np.asarray, variables), model, target, jax.random.key(seed))
  return target, jax.tree.map(lambda x: jnp.asarray(x, target.param_dtype), new_variables)


def save_pretrained(model, variables, folder, *, labels=None, preprocessing: Optional[Preprocessing] = None):
  """Writes a Hugging Face transformers checkpoint folder that transformers loads into the same network.

  transformers.AutoModelForImageClassification.from_pretrained(folder) gives the same outputs as
  model.apply(variables, ...). A scan_layers ViT is written per layer, as every released checkpoint is; each file
  is written atomically.

  Args:
    model: a VisionTransformer, SwinTransformer or ResNet.
    variables: its variables (boxed or not).
    folder: the folder to write (created if missing).
    labels: class names, index i the name of class i (config.json's id2label); None writes LABEL_0, LABEL_1, ...
    preprocessing: the input preprocessing to write as preprocessor_config.json (e.g. a Checkpoint's), so that
      transformers' image processors and lvm_jax.classify prepare images the same way; None writes none.

  Returns:
    The folder written, as a pathlib.Path.
  """
  model, variables = _per_layer(model, variables)
  folder = hf.save(model, variables, folder, labels=labels)
  if preprocessing is not None:
    files.write_json(preprocessing.to_hf(), folder / "preprocessor_config.json")
  return folder
