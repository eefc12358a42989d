"""The input preprocessing a checkpoint was trained with, read from its own config files, and applied to images.

The arithmetic follows the reference processors exactly, so that lvm_jax and the PyTorch tools see the same
pixels: transformers' PIL backend (image_processing_backends.PilBackend, used when torchvision is absent) for
Hugging Face checkpoints, and timm's eval transform (torchvision Resize + CenterCrop on PIL images) for timm ones.
"""

import dataclasses
import json
import math
import pathlib
from typing import Any, Optional

import numpy as np
import PIL.Image

from lvm_jax.normalization import IMAGENET_DEFAULT, IMAGENET_STANDARD, OPENAI_CLIP

# PIL resampling codes, which is how transformers' preprocessor_config.json stores "resample".
INTERPOLATIONS = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
CROP_ROUNDINGS = ("floor", "round")


# Class defaults of the transformers image processors our checkpoints use; a preprocessor_config.json only
# stores what differs from them (older ones store "size" as an int).
_HF_PROCESSORS = {
  "ViTImageProcessor": dict(
    size={"height": 224, "width": 224},
    default_to_square=True,
    resample=2,
    image_mean=IMAGENET_STANDARD[0],
    image_std=IMAGENET_STANDARD[1],
  ),
  "DeiTImageProcessor": dict(
    size={"height": 256, "width": 256},
    default_to_square=True,
    resample=3,
    do_center_crop=True,
    crop_size={"height": 224, "width": 224},
    image_mean=IMAGENET_STANDARD[0],
    image_std=IMAGENET_STANDARD[1],
  ),
  "ConvNextImageProcessor": dict(
    size={"shortest_edge": 384},
    default_to_square=False,
    resample=3,
    crop_pct=224 / 256,
    image_mean=IMAGENET_STANDARD[0],
    image_std=IMAGENET_STANDARD[1],
  ),
  "BitImageProcessor": dict(
    size={"shortest_edge": 224},
    default_to_square=False,
    resample=3,
    do_center_crop=True,
    crop_size={"height": 224, "width": 224},
    image_mean=OPENAI_CLIP[0],
    image_std=OPENAI_CLIP[1],
  ),
  "EfficientNetImageProcessor": dict(
    size={"height": 346, "width": 346},
    default_to_square=True,
    resample=3,
    crop_size={"height": 289, "width": 289},
    image_mean=IMAGENET_STANDARD[0],
    image_std=IMAGENET_STANDARD[1],
    rescale_offset=False,
    include_top=True,
  ),
  "CLIPImageProcessor": dict(
    size={"shortest_edge": 224},
    default_to_square=False,
    resample=3,
    do_center_crop=True,
    crop_size={"height": 224, "width": 224},
    image_mean=OPENAI_CLIP[0],
    image_std=OPENAI_CLIP[1],
  ),
}
_HF_COMMON_DEFAULTS = dict(
  do_resize=True, do_center_crop=False, do_rescale=True, rescale_factor=1 / 255, do_normalize=True, do_pad=False
)
# What AutoImageProcessor picks from config.json's model_type when preprocessor_config.json names no class.
_HF_PROCESSOR_FOR_MODEL = {
  "VisionTransformer": "ViTImageProcessor",
  "SwinTransformer": "ViTImageProcessor",
  "ResNet": "ConvNextImageProcessor",
  "ConvNeXt": "ConvNextImageProcessor",
  "ResNetV2": "BitImageProcessor",
  "EfficientNet": "EfficientNetImageProcessor",
}
# ConvNextImageProcessor warps instead of cropping from this shortest_edge on.
_CONVNEXT_NO_CROP_FROM = 384


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """How an RGB image becomes the float input of a model.

  size: final (height, width).
  resize_shorter: when set, resize the shorter side to this length (keeping the aspect ratio, the longer side
    rounded down) and center-crop `size`; otherwise resize straight to `resize_size` (or to `size` when
    `resize_size` is None) and center-crop `size` from it when the two differ.
  interpolation: PIL resampling filter, one of INTERPOLATIONS.
  rescale: pixel values (0..255) are multiplied by it before normalization.
  mean, std: per channel, applied after rescaling.
  crop_rounding: how an odd margin is split by the center crop: "floor" (transformers) or "round" (Python's
    round, as torchvision's CenterCrop that timm uses).
  """

  size: tuple[int, int] = (224, 224)
  resize_shorter: Optional[int] = None
  interpolation: str = "bilinear"
  mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
  std: tuple[float, float, float] = (0.5, 0.5, 0.5)
  resize_size: Optional[tuple[int, int]] = None
  rescale: float = 1 / 255
  crop_rounding: str = "floor"

  def __post_init__(self):
    # Normalize lists read from JSON into the hashable tuples the frozen dataclass promises.
    object.__setattr__(self, "size", _pair(self.size, "size"))
    if self.resize_size is not None:
      object.__setattr__(self, "resize_size", _pair(self.resize_size, "resize_size"))
    object.__setattr__(self, "mean", _per_channel(self.mean, "mean"))
    object.__setattr__(self, "std", _per_channel(self.std, "std"))
    if self.interpolation not in INTERPOLATIONS:
      raise ValueError(f"interpolation {self.interpolation!r} is not one of {', '.join(INTERPOLATIONS)}.")
    if self.crop_rounding not in CROP_ROUNDINGS:
      raise ValueError(f"crop_rounding {self.crop_rounding!r} is not one of {', '.join(CROP_ROUNDINGS)}.")
    if self.resize_shorter is not None and self.resize_size is not None:
      raise ValueError("Give resize_shorter or resize_size, not both.")

  def __call__(self, image: PIL.Image.Image) -> np.ndarray:
    """float32 [height, width, 3] model input from an RGB PIL image."""
    if image.mode != "RGB":
      raise ValueError(
        f"Preprocessing expects an RGB image, got mode {image.mode!r}; read images with "
        "lvm_jax.tasks.images.load_image, which converts them."
      )
    height, width = self._resized_shape(image.height, image.width)
    pixels = np.asarray(image.resize((width, height), resample=INTERPOLATIONS[self.interpolation]))
    pixels = _center_crop(pixels, self.size, self.crop_rounding)
    # transformers rescales in float64 and only then casts; normalization is in float32.
    x = (pixels.astype(np.float64) * self.rescale).astype(np.float32)
    return (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)

  def _resized_shape(self, height: int, width: int) -> tuple[int, int]:
    if self.resize_shorter is None:
      return self.resize_size or self.size
    # Same expression (and so the same float rounding) as transformers and torchvision.
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = self.resize_shorter, int(self.resize_shorter * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)

  # ---- transformers: preprocessor_config.json ----

  @classmethod
  def from_hf(cls, path, model) -> "Preprocessing":
    """What transformers' image processor for this folder does. Without a preprocessor_config.json, the
    defaults of the processor transformers uses for the model type, at the model's own input size when it has
    one (ViT, Swin: transformers' 224 would not fit a 384 model; ConvNeXt: image_size as the shortest edge)."""
    path = pathlib.Path(path)
    if path.exists():
      try:
        config = json.loads(path.read_text())
      except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    else:
      config = {}
      image_size = getattr(model, "image_size", None)
      if image_size and _hf_processor_type(config, model) == "ConvNextImageProcessor":
        # As the released ConvNeXt configs give it: a shortest edge, cropped by crop_pct below 384.
        config["size"] = {"shortest_edge": int(image_size)}
      elif image_size and _hf_processor_type(config, model) == "BitImageProcessor":
        # Its defaults at the model's size: the shortest edge resized to it, then a center crop of it.
        config["size"], config["crop_size"] = {"shortest_edge": int(image_size)}, (int(image_size),) * 2
      elif image_size:
        config["size"] = {"height": int(image_size), "width": int(image_size)}
    return cls._from_hf_config(config, _hf_processor_type(config, model), str(path))

  @classmethod
  def _from_hf_config(cls, config: dict, processor: str, source: str) -> "Preprocessing":
    # A null value means "the class default" in transformers (_set_attributes), so drop them.
    s = {**_HF_COMMON_DEFAULTS, **_HF_PROCESSORS[processor], **{k: v for k, v in config.items() if v is not None}}
    if not s["do_resize"] or s["do_pad"]:
      raise ValueError(
        f"{source}: do_resize=false or do_pad=true is not supported (the input size would depend on the image)."
      )
    size = _hf_size_dict(s["size"], s["default_to_square"], source)
    crop = _hf_size_dict(s.get("crop_size"), True, source) if s["do_center_crop"] else None
    args = dict(
      interpolation=_interpolation_from_pil(s["resample"], source),
      rescale=float(s["rescale_factor"]) if s["do_rescale"] else 1.0,
      mean=s["image_mean"] if s["do_normalize"] else 0.0,
      std=s["image_std"] if s["do_normalize"] else 1.0,
    )
    if processor == "EfficientNetImageProcessor":
      # rescale_offset subtracts 1 after rescaling; include_top (true in the released configs) divides by image_std
      # once more after normalizing, as the Keras models did: both fold into the mean and std.
      offset = 1.0 if s["do_rescale"] and s["rescale_offset"] else 0.0
      mean, std = np.broadcast_to(np.add(args["mean"], offset, dtype=np.float64), 3), np.broadcast_to(args["std"], 3)
      if s["include_top"]:
        std = std * np.broadcast_to(np.asarray(s["image_std"], np.float64), 3)
      args.update(mean=tuple(mean.tolist()), std=tuple(std.tolist()))
    if set(size) == {"height", "width"}:
      resized = (size["height"], size["width"])
      if crop is None:
        return cls(size=resized, **args)
      return cls(size=(crop["height"], crop["width"]), resize_size=resized, **args)
    if set(size) != {"shortest_edge"}:
      raise ValueError(f"{source}: size {size} is not supported; expected {{height, width}} or {{shortest_edge}}.")
    edge = size["shortest_edge"]
    if processor == "ConvNextImageProcessor":
      if crop is not None:
        raise ValueError(f"{source}: ConvNextImageProcessor with do_center_crop=true is not supported.")
      if edge >= _CONVNEXT_NO_CROP_FROM:
        return cls(size=(edge, edge), **args)
      return cls(size=(edge, edge), resize_shorter=int(edge / s["crop_pct"]), **args)
    if crop is None:
      raise ValueError(
        f"{source}: a shortest_edge resize without a center crop gives inputs whose size depends "
        "on the image; not supported."
      )
    return cls(size=(crop["height"], crop["width"]), resize_shorter=edge, **args)

  def to_hf(self) -> dict:
    """preprocessor_config.json content that transformers' AutoImageProcessor reads back to this preprocessing.
    transformers always floors the crop margin, so a timm preprocessing ("round") is written with the nearest
    transformers equivalent: a one-pixel shift of the crop when the margin is 3 mod 4."""
    config = {
      "do_resize": True,
      "resample": INTERPOLATIONS[self.interpolation],
      "do_rescale": self.rescale != 1.0,
      "rescale_factor": self.rescale,
      "do_normalize": True,
      "image_mean": list(self.mean),
      "image_std": list(self.std),
      "crop_size": {"height": self.size[0], "width": self.size[1]},
    }
    if self.resize_shorter is not None:
      return {
        **config,
        "image_processor_type": "BitImageProcessor",
        "size": {"shortest_edge": self.resize_shorter},
        "do_center_crop": True,
        "do_convert_rgb": True,
      }
    resized = self.resize_size or self.size
    return {
      **config,
      "image_processor_type": "ViTImageProcessor",
      "size": {"height": resized[0], "width": resized[1]},
      "do_center_crop": resized != self.size,
    }

  # ---- timm: pretrained_cfg in config.json ----

  @classmethod
  def from_timm(cls, config: dict) -> "Preprocessing":
    """timm's eval transform (timm.data.transforms_imagenet_eval) for a timm config.json, with timm's defaults
    (resolve_data_config) for missing fields."""
    cfg = config.get("pretrained_cfg") or {}
    if cfg.get("input_size"):
      size = tuple(int(v) for v in cfg["input_size"][-2:])
    else:
      img_size = (config.get("model_args") or {}).get("img_size", 224)
      size = _pair(img_size, "img_size")
    crop_pct = cfg.get("crop_pct") or 0.875
    crop_mode = cfg.get("crop_mode") or "center"
    interpolation = cfg.get("interpolation") or "bicubic"
    if interpolation not in INTERPOLATIONS:
      raise ValueError(
        f"timm interpolation {interpolation!r} is not supported; expected one of {', '.join(INTERPOLATIONS)}."
      )
    args = dict(
      size=size,
      interpolation=interpolation,
      crop_rounding="round",
      mean=cfg.get("mean") or IMAGENET_DEFAULT[0],
      std=cfg.get("std") or IMAGENET_DEFAULT[1],
    )
    scaled = tuple(math.floor(s / crop_pct) for s in size)
    if crop_mode == "squash":
      return cls(resize_size=scaled, **args)
    if crop_mode == "center" and size[0] == size[1]:
      return cls(resize_shorter=scaled[0], **args)
    raise ValueError(
      f"timm crop_mode {crop_mode!r} with input size {size} is not supported; supported: "
      "'center' (square inputs) and 'squash'."
    )


def _pair(value: Any, name: str) -> tuple[int, int]:
  if isinstance(value, (int, np.integer)):
    return (int(value), int(value))
  value = tuple(int(v) for v in value)
  if len(value) != 2:
    raise ValueError(f"{name} must be (height, width), got {value}.")
  return value


def _per_channel(value: Any, name: str) -> tuple[float, float, float]:
  if isinstance(value, (int, float)):
    return (float(value),) * 3
  value = tuple(float(v) for v in value)
  if len(value) != 3:
    raise ValueError(f"{name} must have one value per RGB channel, got {value}.")
  return value


def _hf_processor_type(config: dict, model) -> str:
  name = config.get("image_processor_type")
  if not name and config.get("feature_extractor_type"):
    name = config["feature_extractor_type"].replace("FeatureExtractor", "ImageProcessor")
  if not name:
    name = _HF_PROCESSOR_FOR_MODEL.get(type(model).__name__)
    if name is None:
      raise ValueError(f"No default transformers image processor is known for {type(model).__name__}.")
  name = name.removesuffix("Fast").removesuffix("Pil")
  if name not in _HF_PROCESSORS:
    raise ValueError(f"image processor {name!r} is not supported; supported: {', '.join(sorted(_HF_PROCESSORS))}.")
  return name


def _hf_size_dict(size: Any, default_to_square: bool, source: str) -> dict:
  """transformers' get_size_dict for the forms found in released configs."""
  if isinstance(size, dict):
    return {k: int(v) for k, v in size.items() if v is not None}
  if isinstance(size, int):
    return {"height": size, "width": size} if default_to_square else {"shortest_edge": size}
  if isinstance(size, (list, tuple)) and len(size) == 2:
    return {"height": int(size[0]), "width": int(size[1])}
  raise ValueError(f"{source}: unsupported size or crop_size {size!r}; expected an int, [height, width] or a dict.")


def _interpolation_from_pil(code: Any, source: str) -> str:
  for name, value in INTERPOLATIONS.items():
    if code == value:
      return name
  raise ValueError(f"{source}: resample {code!r} is not a PIL resampling code ({INTERPOLATIONS}).")


def _center_crop(pixels: np.ndarray, size: tuple[int, int], rounding: str) -> np.ndarray:
  """Center crop of an [H, W, C] array, zero-padding a side that is too short, as the reference does."""
  for axis, target in enumerate(size):
    length = pixels.shape[axis]
    if length > target:
      margin = (length - target) / 2
      start = int(round(margin)) if rounding == "round" else (length - target) // 2
      pixels = np.take(pixels, np.arange(start, start + target), axis=axis)
    elif length < target:
      missing = target - length
      # transformers puts the larger half of the padding first, torchvision the smaller one.
      before = -(-missing // 2) if rounding == "floor" else missing // 2
      pad = [(0, 0)] * pixels.ndim
      pad[axis] = (before, missing - before)
      pixels = np.pad(pixels, pad)
  return pixels
