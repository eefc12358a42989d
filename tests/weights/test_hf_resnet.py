"""ResNet to and from Hugging Face transformers (ResNetForImageClassification / ResNetModel), against
transformers itself on torch. Checkpoints are read as saved on disk (save_pretrained's names)."""

import json

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import ResNetConfig, ResNetForImageClassification, ResNetModel

import lvm_jax
from lvm_jax.models import registry
from lvm_jax.models.resnet import VARIANTS, ResNet
from lvm_jax.weights import mapping
from lvm_jax.weights import resnet as converter
from tests import torch_reference as ref

# Basic blocks with stage widths that are not width * 2**stage, and a stage of two blocks (one without shortcut).
TINY = dict(embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 2, 1, 1], layer_type="basic", num_labels=5)
# microsoft/resnet-50's config.json. It predates transformers' downsample_in_bottleneck field (default false:
# stride in the 3x3, ResNet v1.5, as its model card says), so it does not list it.
RESNET50_CONFIG_JSON = {
  "architectures": ["ResNetForImageClassification"],
  "model_type": "resnet",
  "num_channels": 3,
  "embedding_size": 64,
  "hidden_sizes": [256, 512, 1024, 2048],
  "depths": [3, 4, 6, 3],
  "layer_type": "bottleneck",
  "hidden_act": "relu",
  "downsample_in_first_stage": False,
}


def calibrate(model: torch.nn.Module, size: int, seed: int) -> torch.nn.Module:
  """Running statistics of a deep random ResNet that keep its activations O(1), then perturbed.

  With identity statistics the residual sums of 16 bottlenecks reach logits of ~1e4, where float32 rounding
  alone exceeds 1e-4. One training-mode pass sets each BatchNorm's statistics to those of its inputs; a
  random -10%..+10% on the variances and 0.1 std on the means keeps them random (a swapped mean and
  variance, or statistics from the wrong layer, still change the logits).
  """
  gen = torch.Generator().manual_seed(seed)
  norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  with torch.no_grad():
    for m in norms:
      m.momentum = 1.0
    model.train()(pixel_values=torch.randn(4, 3, size, size, generator=gen))
    for m in norms:
      m.momentum = 0.1
      m.running_var.mul_(torch.exp(0.2 * (torch.rand(m.running_var.shape, generator=gen) - 0.5)))
      m.running_mean.add_(0.1 * m.running_var.sqrt() * torch.randn(m.running_mean.shape, generator=gen))
  return model.eval()


def load(folder, **overrides):
  """(model, variables) through this family's table alone, as hf.py uses it."""
  config = json.loads((folder / "config.json").read_text())
  tensors = load_file(str(folder / "model.safetensors"))
  model = ResNet(
    **converter.hf_model_args(config), num_classes=config.get("num_labels", len(config["id2label"])), **overrides
  )
  variables = mapping.load_variables(
    converter.hf_table(model),
    tensors,
    registry.abstract_variables(model),
    source=str(folder),
    ignore=converter.HF_IGNORE,
  )
  return model, variables, tensors


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  torch.manual_seed(0)
  torch_model = ref.randomize(ResNetForImageClassification(ResNetConfig(**TINY)))
  folder = tmp_path_factory.mktemp("resnet_tiny")
  torch_model.save_pretrained(folder)
  return folder, torch_model


def test_tiny_basic_logits_match_transformers(tiny):
  folder, torch_model = tiny
  model, variables, _ = load(folder)
  assert (model.block, model.width, model.stage_widths, tuple(model.stage_sizes)) == (
    "basic",
    8,
    (8, 16, 24, 32),
    (1, 2, 1, 1),
  )
  x = ref.images(2, 64)
  expected = ref.logits(torch_model, x)
  np.testing.assert_allclose(jax.jit(model.apply)(variables, x), expected, atol=1e-4, rtol=0)
  assert np.abs(expected).max() > 0.1


def test_full_size_microsoft_resnet_50_matches_transformers(tmp_path):
  config = ResNetConfig(
    depths=[3, 4, 6, 3],
    hidden_sizes=[256, 512, 1024, 2048],
    layer_type="bottleneck",
    embedding_size=64,
    downsample_in_bottleneck=False,
    num_labels=1000,
  )
  torch.manual_seed(1)
  torch_model = calibrate(ref.randomize(ResNetForImageClassification(config), seed=1, scale=0.02), 224, seed=1)
  torch_model.save_pretrained(tmp_path)
  model, variables, _ = load(tmp_path)
  assert model == lvm_jax.create_model("resnet50")
  x = ref.images(2, 224, seed=1)
  expected = ref.logits(torch_model, x)
  np.testing.assert_allclose(jax.jit(model.apply)(variables, x), expected, atol=1e-4, rtol=0)
  assert np.abs(expected).max() > 1.0 and expected.std() > 0.5  # logits of a realistic size, not near zero
  stats = variables["batch_stats"]["stage_3_block_2"]["bn3"]
  assert np.abs(stats["mean"]).max() > 0.1 and np.abs(stats["var"] - 1).max() > 0.1  # not identity statistics


def test_microsoft_resnet_50_config_json_is_the_resnet50_variant():
  assert converter.hf_model_args(RESNET50_CONFIG_JSON) == dict(VARIANTS["resnet50"], width=64, stage_widths=None)
  assert converter.hf_model_args({"model_type": "resnet"}) == converter.hf_model_args(RESNET50_CONFIG_JSON)


def test_saved_tensors_are_exactly_the_checkpoint(tiny):
  folder, _ = tiny
  model, variables, tensors = load(folder)
  saved = mapping.save_tensors(converter.hf_table(model), variables)
  expected = {name: value for name, value in tensors.items() if not name.endswith("num_batches_tracked")}
  assert sorted(saved) == sorted(expected)
  assert any(name.endswith("running_var") for name in saved) and "classifier.1.weight" in saved
  for name, value in expected.items():
    assert saved[name].shape == value.shape, name
    np.testing.assert_array_equal(saved[name], value, err_msg=name)


def test_mismatching_checkpoint_names_tensor_and_both_shapes(tiny):
  folder, _ = tiny
  model, _, tensors = load(folder)
  tensors = dict(tensors)
  tensors["resnet.encoder.stages.2.layers.0.layer.1.convolution.weight"] = np.zeros((24, 25, 3, 3), np.float32)
  del tensors["resnet.encoder.stages.1.layers.0.shortcut.normalization.running_var"]
  with pytest.raises(mapping.WeightsMismatchError) as err:
    mapping.load_variables(
      converter.hf_table(model), tensors, registry.abstract_variables(model), source="ckpt", ignore=converter.HF_IGNORE
    )
  message = str(err.value)
  assert (
    "shape mismatch for resnet.encoder.stages.2.layers.0.layer.1.convolution.weight: checkpoint has "
    "(24, 25, 3, 3), model params/stage_2_block_0/conv2/kernel expects (3, 3, 24, 24)"
  ) in message
  assert (
    "missing resnet.encoder.stages.1.layers.0.shortcut.normalization.running_var "
    "(for batch_stats/stage_1_block_0/shortcut_bn/var, shape (16,))"
  ) in message


def test_from_pretrained_and_save_pretrained_round_trip_through_transformers(tiny, tmp_path):
  folder, torch_model = tiny
  model, variables = lvm_jax.from_pretrained(folder)
  x = ref.images(3, 64, seed=3)
  np.testing.assert_allclose(jax.jit(model.apply)(variables, x), ref.logits(torch_model, x), atol=1e-4, rtol=0)
  labels = ["cat", "dog", "bird", "fish", "frog"]
  lvm_jax.save_pretrained(model, variables, tmp_path / "out", labels=labels)
  reloaded = ResNetForImageClassification.from_pretrained(tmp_path / "out").eval()
  assert reloaded.config.id2label[3] == "fish"
  for name, value in torch_model.state_dict().items():  # nothing re-initialised on load, BatchNorm stats included
    if not name.endswith("num_batches_tracked"):
      np.testing.assert_array_equal(reloaded.state_dict()[name].numpy(), value.numpy(), err_msg=name)
  np.testing.assert_allclose(ref.logits(reloaded, x), ref.logits(torch_model, x), atol=1e-6, rtol=0)


def test_base_model_gives_pooled_features_and_saves_as_resnet_model(tmp_path):
  config = ResNetConfig(embedding_size=8, hidden_sizes=[16, 32], depths=[1, 1], layer_type="bottleneck")
  torch.manual_seed(2)
  torch_model = ref.randomize(ResNetModel(config), seed=2)
  torch_model.save_pretrained(tmp_path / "in")
  model, variables = lvm_jax.from_pretrained(tmp_path / "in")
  assert model.num_classes == 0 and model.stage_widths == (4, 8)
  x = ref.images(2, 32, seed=2)
  with torch.no_grad():
    expected = torch_model(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).pooler_output
  np.testing.assert_allclose(model.apply(variables, x), expected.numpy()[:, :, 0, 0], atol=1e-4, rtol=0)
  lvm_jax.save_pretrained(model, variables, tmp_path / "out")
  assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["ResNetModel"]
  with torch.no_grad():
    reloaded = ResNetModel.from_pretrained(tmp_path / "out").eval()
    got = reloaded(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).pooler_output
  np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
  "field,value,message",
  [
    ("layer_type", "preactivation", "layer_type='preactivation' is not supported"),
    ("hidden_act", "gelu", "hidden_act='gelu' is not supported"),
    ("downsample_in_bottleneck", True, "downsample_in_bottleneck=true"),
    ("downsample_in_first_stage", True, "downsample_in_first_stage=true"),
    ("num_channels", 1, "num_channels=1"),
    ("hidden_sizes", [256, 512, 1024, 2050], "hidden_sizes=.*multiples of 4"),
  ],
)
def test_unsupported_config_values_name_the_field(field, value, message):
  with pytest.raises(ValueError, match=message):
    converter.hf_model_args({**RESNET50_CONFIG_JSON, field: value})


def test_hf_config_rebuilds_the_same_architecture():
  model = ResNet(stage_sizes=(2, 1), block="bottleneck", width=16, stage_widths=(4, 8), num_classes=7)
  config = converter.hf_config(model)
  assert config["hidden_sizes"] == [16, 32] and config["embedding_size"] == 16 and config["depths"] == [2, 1]
  assert ResNet(**converter.hf_model_args(config), num_classes=7) == model
  names = {t.name for t in converter.hf_table(model)}
  torch_names = set(ResNetForImageClassification(ResNetConfig(**config, num_labels=7)).state_dict())
  assert names == {n for n in torch_names if not n.endswith("num_batches_tracked")}
  with pytest.raises(ValueError, match="bn_eps=0.001"):
    converter.hf_config(ResNet(bn_eps=1e-3))
