"""Swin against Hugging Face transformers' SwinForImageClassification / SwinModel on torch.

The tables name tensors as they are on disk (what save_pretrained writes and the hub holds), so the
references are saved and read back with safetensors, never taken from model.state_dict().
"""

import json

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import SwinConfig, SwinForImageClassification, SwinModel

import lvm_jax
from lvm_jax.models.swin import SwinTransformer
from lvm_jax.weights import mapping
from lvm_jax.weights import swin as swin_weights
from tests import torch_reference as ref

# Stage 0 has 8x8 tokens in 2x2 windows of 4, so its second block really shifts (and masks).
SMALL = dict(image_size=32, patch_size=4, window_size=4, embed_dim=32, depths=[2, 2], num_heads=[2, 4], num_labels=10)


def _reference(config: dict, seed: int = 0, scale: float = 0.1, cls=SwinForImageClassification):
  torch.manual_seed(seed)
  return ref.randomize(cls(SwinConfig(**config)), seed=seed, scale=scale)


def _checkpoint(torch_model, folder):
  torch_model.save_pretrained(folder)
  return load_file(str(folder / "model.safetensors")), json.loads((folder / "config.json").read_text())


def _load(tensors: dict, config: dict, num_classes: int):
  model = SwinTransformer(num_classes=num_classes, **swin_weights.hf_model_args(config))
  variables = mapping.load_variables(
    swin_weights.hf_table(model),
    tensors,
    lvm_jax.abstract_variables(model),
    source="test checkpoint",
    ignore=swin_weights.HF_IGNORE,
  )
  return model, variables


def _logits(model, variables, x):
  return np.asarray(jax.jit(model.apply)(variables, x))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  torch_model = _reference(SMALL)
  tensors, config = _checkpoint(torch_model, tmp_path_factory.mktemp("swin_small"))
  model, variables = _load(tensors, config, 10)
  return torch_model, tensors, model, variables


def test_small_logits_match_transformers_with_shifted_windows(small):
  torch_model, _, model, variables = small
  assert (model.embed_dim, model.depths, model.num_heads, model.window_size) == (32, (2, 2), (2, 4), 4)
  x = ref.images(2, 32)
  expected = ref.logits(torch_model, x)
  np.testing.assert_allclose(_logits(model, variables, x), expected, atol=1e-4, rtol=0)
  assert np.abs(expected).max() > 0.1
  blocks = torch_model.swin.encoder.layers[0].blocks
  assert (blocks[0].shift_size, blocks[1].shift_size, blocks[1].window_size) == (0, 2, 4)


def test_full_size_swin_tiny_patch4_window7_224_matches_transformers(tmp_path):
  # SwinConfig's defaults are microsoft/swin-tiny-patch4-window7-224's configuration.
  torch_model = _reference(dict(num_labels=1000), seed=1, scale=0.05)
  tensors, config = _checkpoint(torch_model, tmp_path)
  model, variables = _load(tensors, config, 1000)
  assert model == lvm_jax.create_model("swin_t", drop_path=0.1)  # HF configs carry drop_path_rate 0.1
  assert sum(v.size for v in jax.tree.leaves(variables)) == 28_288_354
  x = ref.images(2, 224, seed=1)
  expected = ref.logits(torch_model, x)
  np.testing.assert_allclose(_logits(model, variables, x), expected, atol=1e-4, rtol=0)
  assert np.abs(expected).max() > 0.5


@pytest.mark.parametrize("height,width", [(36, 44), (34, 42)])
def test_inputs_not_a_multiple_of_the_window_match_transformers(small, height, width):
  # 36x44: 9x11 tokens, windows padded to 12x12, merged (odd rows padded) to 5x6 and padded to 8x8.
  # 34x42 also pads the pixels to a multiple of the patch. A fresh reference: transformers keeps the
  # window and shift it settled on at its last input size.
  _, _, model, variables = small
  torch_model = _reference(SMALL)
  x = np.random.RandomState(2).randn(2, height, width, 3).astype(np.float32)
  expected = ref.logits(torch_model, x)
  np.testing.assert_allclose(_logits(model, variables, x), expected, atol=1e-4, rtol=0)
  assert torch_model.swin.encoder.layers[1].blocks[1].shift_size == 2  # stage 1 (5x6) still shifts


def test_qkv_bias_false_matches_transformers(tmp_path):
  torch_model = _reference({**SMALL, "qkv_bias": False}, seed=4)
  tensors, config = _checkpoint(torch_model, tmp_path)
  assert "swin.encoder.layers.0.blocks.0.attention.self.query.bias" not in tensors
  model, variables = _load(tensors, config, 10)
  assert not model.qkv_bias
  x = ref.images(2, 32, seed=4)
  np.testing.assert_allclose(_logits(model, variables, x), ref.logits(torch_model, x), atol=1e-4, rtol=0)


def test_save_tensors_gives_back_the_checkpoint_exactly(small):
  _, tensors, model, variables = small
  saved = mapping.save_tensors(swin_weights.hf_table(model), jax.tree.map(np.asarray, variables))
  assert sorted(saved) == sorted(tensors)
  for name, value in tensors.items():
    assert saved[name].shape == value.shape, name
    np.testing.assert_array_equal(saved[name], value, err_msg=name)


def test_table_without_head_for_num_classes_zero(small):
  _, _, model, _ = small
  names = {t.name for t in swin_weights.hf_table(model.clone(num_classes=0))}
  assert {t.name for t in swin_weights.hf_table(model)} - names == {"classifier.weight", "classifier.bias"}


def test_mismatch_error_names_every_problem(small):
  _, tensors, model, _ = small
  broken = dict(tensors)
  name = "swin.encoder.layers.1.blocks.0.attention.self.relative_position_bias_table"
  broken[name] = np.zeros((25, 4), np.float32)  # a window-3 table for a window-4 model
  del broken["swin.encoder.layers.0.downsample.reduction.weight"]
  broken["swin.encoder.layers.0.blocks.0.extra.weight"] = np.zeros((3,), np.float32)
  # old checkpoints store the relative position index; it is recomputed, so it is no problem
  broken["swin.encoder.layers.0.blocks.0.attention.self.relative_position_index"] = np.zeros((16, 16), np.int64)
  with pytest.raises(lvm_jax.WeightsMismatchError) as err:
    mapping.load_variables(
      swin_weights.hf_table(model),
      broken,
      lvm_jax.abstract_variables(model),
      source="broken/swin",
      ignore=swin_weights.HF_IGNORE,
    )
  message = str(err.value)
  assert message.startswith("broken/swin does not fit the model:")
  assert (
    f"shape mismatch for {name}: checkpoint has (25, 4), model "
    "params/stage_1_block_0/attn/relative_position_bias_table expects (49, 4)" in message
  )
  assert (
    "missing swin.encoder.layers.0.downsample.reduction.weight (for params/merge_0/reduction/kernel, shape (128, 64))"
  ) in message
  assert "unexpected swin.encoder.layers.0.blocks.0.extra.weight (shape (3,))" in message
  assert "relative_position_index" not in message


@pytest.mark.parametrize(
  "field,value,message",
  [
    ("use_absolute_embeddings", True, "use_absolute_embeddings=true is not supported"),
    ("hidden_act", "relu", "hidden_act='relu' is not supported"),
    ("layer_norm_eps", 1e-6, "layer_norm_eps=1e-06 is not supported"),
    ("num_channels", 1, "num_channels=1: only RGB"),
    ("image_size", [32, 48], r"image_size=\[32, 48\]: only square"),
    ("num_heads", [2], r"depths=\[2, 2\] and num_heads=\[2\] differ in length"),
  ],
)
def test_unsupported_config_values_name_the_field(field, value, message):
  with pytest.raises(ValueError, match=message):
    swin_weights.hf_model_args({**SMALL, field: value})


def test_hf_config_rebuilds_the_same_network_in_transformers(small, tmp_path):
  # hf_config (through save_pretrained) -> transformers -> the same logits; and back through from_pretrained.
  torch_model, _, model, variables = small
  lvm_jax.save_pretrained(model, variables, tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["architectures"] == ["SwinForImageClassification"] and config["model_type"] == "swin"
  reloaded = SwinForImageClassification.from_pretrained(tmp_path).eval()
  for field in (
    "image_size",
    "patch_size",
    "embed_dim",
    "depths",
    "num_heads",
    "window_size",
    "mlp_ratio",
    "qkv_bias",
    "hidden_act",
    "layer_norm_eps",
    "use_absolute_embeddings",
    "num_labels",
  ):
    assert getattr(reloaded.config, field) == getattr(torch_model.config, field), field
  x = ref.images(2, 32, seed=5)
  np.testing.assert_allclose(ref.logits(reloaded, x), ref.logits(torch_model, x), atol=1e-6, rtol=0)
  again, again_variables = lvm_jax.from_pretrained(tmp_path)
  assert again == model
  np.testing.assert_allclose(_logits(again, again_variables, x), ref.logits(torch_model, x), atol=1e-4, rtol=0)


def test_base_model_checkpoint_loads_without_head(tmp_path):
  # SwinModel's names carry no "swin." prefix; from_pretrained strips it from the table.
  config = {k: v for k, v in SMALL.items() if k != "num_labels"}
  torch_model = _reference(config, seed=6, cls=SwinModel)
  torch_model.save_pretrained(tmp_path)
  model, variables = lvm_jax.from_pretrained(tmp_path)
  assert model.num_classes == 0
  x = ref.images(2, 32, seed=6)
  with torch.no_grad():
    expected = torch_model(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).pooler_output.numpy()
  np.testing.assert_allclose(_logits(model, variables, x), expected, atol=1e-4, rtol=0)


def test_checkpoint_with_relative_position_index_buffers_loads(small, tmp_path):
  # Released checkpoints (saved by older transformers) also store each block's relative_position_index.
  torch_model, tensors, _, _ = small
  with_index = dict(tensors)
  for name in [n for n in tensors if n.endswith("relative_position_bias_table")]:
    with_index[name.replace("bias_table", "index")] = np.zeros((16, 16), np.int64)
  save_file(with_index, str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text(json.dumps(torch_model.config.to_dict()))
  model, variables = lvm_jax.from_pretrained(tmp_path)
  x = ref.images(1, 32, seed=7)
  np.testing.assert_allclose(_logits(model, variables, x), ref.logits(torch_model, x), atol=1e-4, rtol=0)
