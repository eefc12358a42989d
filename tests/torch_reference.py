"""Helpers to build PyTorch reference models for parity tests (transformers on torch, CPU, float32)."""

import json
import pathlib

import numpy as np
import torch


def randomize(module: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
  """Perturbs every float parameter and buffer, so zero biases, unit norms and identity BatchNorm
  statistics cannot hide a mapping mistake; running variances stay positive."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
      if not t.is_floating_point():
        continue
      noise = torch.randn(t.shape, generator=gen) * scale
      if name.endswith("running_var"):
        t.copy_(0.5 + torch.rand(t.shape, generator=gen))
      else:
        t.add_(noise)
  return module.eval()


def logits(model: torch.nn.Module, images_nhwc: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(pixel_values=torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2).copy())).logits.numpy()


def images(batch: int, size: int, seed: int = 0) -> np.ndarray:
  return np.random.RandomState(seed).randn(batch, size, size, 3).astype(np.float32)


def save_classifier(folder, model_class, config, labels, preprocessor_config: dict, seed: int = 0) -> pathlib.Path:
  """A randomized transformers `model_class(config)` with named labels, saved as a hub checkpoint folder is laid
  out: config.json, model.safetensors and the given preprocessor_config.json."""
  folder = pathlib.Path(folder)
  config.num_labels = len(labels)
  config.id2label, config.label2id = dict(enumerate(labels)), {name: i for i, name in enumerate(labels)}
  torch.manual_seed(seed)
  randomize(model_class(config), seed=seed).save_pretrained(folder)
  (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor_config, indent=2))
  return folder
