"""ViT from and to Hugging Face transformers checkpoints, against transformers itself on torch."""

import json

import numpy as np
import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification, ViTModel

import lvm_jax
from tests import torch_reference as ref

TINY = dict(
  hidden_size=48,
  num_hidden_layers=2,
  num_attention_heads=3,
  intermediate_size=96,
  image_size=32,
  patch_size=8,
  num_labels=5,
)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
  torch.manual_seed(0)
  model = ref.randomize(ViTForImageClassification(ViTConfig(**TINY)))
  folder = tmp_path_factory.mktemp("vit_tiny")
  model.save_pretrained(folder)
  return folder, model


def test_tiny_logits_match_transformers(tiny_folder):
  folder, torch_model = tiny_folder
  model, variables = lvm_jax.from_pretrained(folder)
  assert (model.width, model.depth, model.num_heads, model.num_classes) == (48, 2, 3, 5)
  assert model.layer_norm_eps == 1e-12
  x = ref.images(2, 32)
  np.testing.assert_allclose(model.apply(variables, x), ref.logits(torch_model, x), atol=1e-4, rtol=0)


def test_full_size_vit_base_patch16_224_matches_transformers(tmp_path):
  # ViTConfig's defaults are google/vit-base-patch16-224's config (hidden 768, 12 layers, eps 1e-12).
  torch.manual_seed(1)
  torch_model = ref.randomize(ViTForImageClassification(ViTConfig(num_labels=1000)), seed=1, scale=0.02)
  torch_model.save_pretrained(tmp_path)
  model, variables = lvm_jax.from_pretrained(tmp_path)
  x = ref.images(2, 224, seed=1)
  expected = ref.logits(torch_model, x)
  np.testing.assert_allclose(model.apply(variables, x), expected, atol=1e-4, rtol=0)
  assert np.abs(expected).max() > 0.1  # the comparison is not between near-zero outputs


def test_base_model_with_pooler_loads_as_pre_logits(tmp_path):
  torch.manual_seed(2)
  config = ViTConfig(**{k: v for k, v in TINY.items() if k != "num_labels"})
  torch_model = ref.randomize(ViTModel(config, add_pooling_layer=True), seed=2)
  torch_model.save_pretrained(tmp_path)
  model, variables = lvm_jax.from_pretrained(tmp_path)
  assert model.num_classes == 0 and model.representation_size == 48
  x = ref.images(2, 32, seed=2)
  with torch.no_grad():
    expected = torch_model(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).pooler_output.numpy()
  np.testing.assert_allclose(model.apply(variables, x), expected, atol=1e-4, rtol=0)


def test_save_pretrained_loads_in_transformers_with_same_logits(tiny_folder, tmp_path):
  folder, torch_model = tiny_folder
  model, variables = lvm_jax.from_pretrained(folder)
  labels = ["cat", "dog", "bird", "fish", "frog"]
  lvm_jax.save_pretrained(model, variables, tmp_path / "out", labels=labels)
  reloaded = ViTForImageClassification.from_pretrained(tmp_path / "out").eval()
  assert reloaded.config.id2label[3] == "fish"
  x = ref.images(3, 32, seed=3)
  np.testing.assert_allclose(ref.logits(reloaded, x), ref.logits(torch_model, x), atol=1e-6, rtol=0)


def test_new_head_and_image_size_for_transfer(tiny_folder):
  folder, _ = tiny_folder
  source, source_vars = lvm_jax.from_pretrained(folder)
  model, variables = lvm_jax.from_pretrained(folder, num_classes=3, image_size=64)
  assert model.num_classes == 3 and model.image_size == 64
  params = variables["params"]
  assert params["pos_embed"].shape == (1, 1 + 8 * 8, 48)
  # the class-token position is kept, the body is copied, the head is fresh (zeros, as big_vision)
  np.testing.assert_array_equal(params["pos_embed"][:, 0], source_vars["params"]["pos_embed"][:, 0])
  np.testing.assert_array_equal(
    params["block_1"]["mlp"]["fc1"]["kernel"], source_vars["params"]["block_1"]["mlp"]["fc1"]["kernel"]
  )
  assert params["head"]["kernel"].shape == (48, 3) and not np.asarray(params["head"]["kernel"]).any()
  assert model.apply(variables, np.zeros((2, 64, 64, 3), np.float32)).shape == (2, 3)


@pytest.mark.parametrize("image_size", [56, 24])
def test_resized_position_embeddings_match_timms_bicubic_resample(tiny_folder, image_size):
  # timm's resample_abs_pos_embed: F.interpolate(mode="bicubic", antialias=True, align_corners=False) on the
  # patch grid, prefix tokens kept. A random grid, so that a wrong filter or a transposed grid shows.
  folder, _ = tiny_folder
  model, variables = lvm_jax.from_pretrained(folder)
  pos = np.random.default_rng(0).standard_normal(variables["params"]["pos_embed"].shape).astype(np.float32)
  variables["params"]["pos_embed"] = pos
  from lvm_jax.weights.pretrained import retarget

  _, resized = retarget(model, variables, image_size=image_size)
  new = image_size // 8
  grid = torch.from_numpy(pos[0, 1:].reshape(4, 4, 48).transpose(2, 0, 1)[None].astype(np.float64))
  expected = (
    torch.nn.functional.interpolate(grid, size=(new, new), mode="bicubic", antialias=True, align_corners=False)[0]
    .numpy()
    .transpose(1, 2, 0)
    .reshape(-1, 48)
  )
  got = np.asarray(resized["params"]["pos_embed"])
  assert got.shape == (1, 1 + new * new, 48)
  np.testing.assert_array_equal(got[0, 0], pos[0, 0])
  np.testing.assert_allclose(got[0, 1:], expected, atol=1e-5, rtol=0)


def test_shape_mismatch_names_tensor_and_both_shapes(tiny_folder, tmp_path):
  folder, _ = tiny_folder
  from safetensors.numpy import load_file, save_file

  tensors = load_file(str(folder / "model.safetensors"))
  tensors["vit.encoder.layer.1.intermediate.dense.weight"] = np.zeros((97, 48), np.float32)
  del tensors["vit.layernorm.bias"]
  tensors["vit.extra.weight"] = np.zeros((2,), np.float32)
  save_file(tensors, str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text((folder / "config.json").read_text())
  with pytest.raises(lvm_jax.WeightsMismatchError) as err:
    lvm_jax.from_pretrained(tmp_path)
  message = str(err.value)
  assert "vit.encoder.layer.1.intermediate.dense.weight: checkpoint has (97, 48)" in message
  assert "block_1/mlp/fc1/kernel expects (48, 96)" in message
  assert "missing vit.layernorm.bias" in message
  assert "unexpected vit.extra.weight" in message


def test_unsupported_architecture_names_supported_ones(tiny_folder, tmp_path):
  folder, _ = tiny_folder
  config = json.loads((folder / "config.json").read_text())
  config["architectures"] = ["ViTForMaskedImageModeling"]
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(
    ValueError,
    match="architecture 'ViTForMaskedImageModeling' is not supported; supported: ViTForImageClassification, ViTModel",
  ):
    lvm_jax.from_pretrained(tmp_path)
  config["model_type"] = "deit"
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="model_type 'deit' is not supported"):
    lvm_jax.from_pretrained(tmp_path)


def test_torch_bin_checkpoint_is_read_weights_only(tiny_folder, tmp_path):
  folder, torch_model = tiny_folder
  torch_model.save_pretrained(tmp_path, safe_serialization=False)
  if not (tmp_path / "pytorch_model.bin").exists():
    # transformers 5 always writes safetensors; write the legacy .bin layout ourselves
    from safetensors.torch import load_file

    torch.save(load_file(str(folder / "model.safetensors")), tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink(missing_ok=True)
  model, variables = lvm_jax.from_pretrained(tmp_path)
  x = ref.images(1, 32, seed=4)
  np.testing.assert_allclose(model.apply(variables, x), ref.logits(torch_model, x), atol=1e-4, rtol=0)


def test_missing_source_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="neither an existing folder nor a hub repository id"):
    lvm_jax.from_pretrained(str(tmp_path / "nope" / "deeper"))
  with pytest.raises(FileNotFoundError, match="config.json"):
    lvm_jax.from_pretrained(tmp_path)


class _WritesAFile:
  """Unpickling this calls open(path, "w"): a stand-in for any code a hostile .bin could run."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return open, (str(self.path), "w")


def test_torch_bin_with_code_in_its_pickle_is_refused_before_anything_runs(tiny_folder, tmp_path):
  folder, _ = tiny_folder
  from safetensors.torch import load_file

  marker = tmp_path / "ran"
  state = load_file(str(folder / "model.safetensors"))
  state["vit.layernorm.bias"] = _WritesAFile(marker)
  (tmp_path / "ckpt").mkdir()
  (tmp_path / "ckpt" / "config.json").write_text((folder / "config.json").read_text())
  torch.save(state, tmp_path / "ckpt" / "pytorch_model.bin")
  assert not marker.exists()
  # refused for the call it holds (pickle records builtins.open as io.open), not for some other reason
  with pytest.raises(ValueError, match=r"weights-only PyTorch checkpoint(.|\n)*\bio\.open"):
    lvm_jax.from_pretrained(tmp_path / "ckpt")
  assert not marker.exists()
  # the file really is hostile: a plain unpickle runs the call
  torch.load(tmp_path / "ckpt" / "pytorch_model.bin", weights_only=False)["vit.layernorm.bias"].close()
  assert marker.exists()
