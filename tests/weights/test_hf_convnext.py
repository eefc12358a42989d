"""ConvNeXt to and from Hugging Face transformers (ConvNextForImageClassification / ConvNextModel), against
transformers itself on torch. Checkpoints are read as saved on disk (save_pretrained's names)."""

import dataclasses
import json

import jax
import numpy as np
import PIL.Image
import pytest
import skimage.data
import torch
from safetensors.numpy import load_file, save_file
from transformers import AutoImageProcessor, ConvNextConfig, ConvNextForImageClassification, ConvNextModel

import lvm_jax
from lvm_jax.models.convnext import ConvNeXt
from lvm_jax.normalization import IMAGENET_DEFAULT, IMAGENET_STANDARD
from lvm_jax.weights import convnext as converter
from lvm_jax.weights import mapping
from tests import torch_reference as ref
from tests.models.test_convnext import COUNTS

# Four stages with two blocks in the third; 32x32 inputs reach 1x1 at stride 32. layer_norm_eps is the final norm's
# (transformers fixes the others at 1e-6), set apart from 1e-6 so that the two epsilons cannot be swapped unseen.
TINY = dict(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 2, 1], image_size=32, layer_norm_eps=1e-3, num_labels=5)


def _reference(config: dict, seed: int = 0, cls=ConvNextForImageClassification):
  torch.manual_seed(seed)
  return ref.randomize(cls(ConvNextConfig(**config)), seed=seed)


def _logits(model, variables, x):
  return np.asarray(jax.jit(model.apply)(variables, x))


def _pooled(torch_model, x):
  with torch.no_grad():
    return torch_model(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).pooler_output.numpy()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  folder = tmp_path_factory.mktemp("convnext_tiny")
  torch_model = _reference(TINY)
  torch_model.save_pretrained(folder)
  ckpt = lvm_jax.load_checkpoint(str(folder))
  return folder, torch_model, ckpt


@pytest.mark.parametrize("height,width", [(32, 32), (45, 38)])
def test_logits_match_transformers(tiny, height, width):
  # 45x38 is no multiple of the stride: the stem and the downsampling drop the last rows/columns, as torch does.
  _, torch_model, ckpt = tiny
  model = ckpt.model
  assert (model.dims, model.depths, model.head_norm_eps, model.layer_norm_eps) == (
    (8, 16, 32, 64),
    (1, 1, 2, 1),
    1e-3,
    1e-6,
  )
  x = np.random.RandomState(height).randn(2, height, width, 3).astype(np.float32)
  expected = ref.logits(torch_model, x)
  np.testing.assert_allclose(_logits(model, ckpt.variables, x), expected, atol=1e-4, rtol=0)
  assert np.abs(expected).max() > 0.1 and not np.allclose(expected[0], expected[1])


def test_saved_tensors_are_exactly_the_checkpoint(tiny):
  folder, _, ckpt = tiny
  tensors = load_file(str(folder / "model.safetensors"))
  saved = mapping.save_tensors(converter.hf_table(ckpt.model), jax.tree.map(np.asarray, ckpt.variables))
  assert sorted(saved) == sorted(tensors)
  assert "convnext.encoder.stages.2.layers.1.layer_scale_parameter" in saved
  for name, value in tensors.items():
    assert saved[name].shape == value.shape, name
    np.testing.assert_array_equal(saved[name], value, err_msg=name)


def test_save_pretrained_round_trips_through_transformers(tiny, tmp_path):
  _, torch_model, ckpt = tiny
  labels = ["cat", "dog", "bird", "fish", "frog"]
  lvm_jax.save_pretrained(ckpt.model, ckpt.variables, tmp_path, labels=labels)
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["model_type"] == "convnext" and config["architectures"] == ["ConvNextForImageClassification"]
  reloaded = ConvNextForImageClassification.from_pretrained(tmp_path).eval()
  assert reloaded.config.id2label[3] == "fish"
  for field in ("hidden_sizes", "depths", "num_stages", "patch_size", "image_size", "layer_norm_eps", "num_labels"):
    assert getattr(reloaded.config, field) == getattr(torch_model.config, field), field
  for name, value in torch_model.state_dict().items():  # nothing re-initialised on load
    np.testing.assert_array_equal(reloaded.state_dict()[name].numpy(), value.numpy(), err_msg=name)
  x = ref.images(2, 32, seed=3)
  np.testing.assert_allclose(ref.logits(reloaded, x), ref.logits(torch_model, x), atol=1e-6, rtol=0)
  again, _ = lvm_jax.from_pretrained(tmp_path)
  assert again == ckpt.model


def test_base_model_loads_without_head_and_saves_as_convnext_model(tmp_path):
  # ConvNextModel's names carry no "convnext." prefix; its pooler output is what our headless model returns.
  config = {k: v for k, v in TINY.items() if k != "num_labels"}
  torch_model = _reference(config, seed=2, cls=ConvNextModel)
  torch_model.save_pretrained(tmp_path / "in")
  model, variables = lvm_jax.from_pretrained(tmp_path / "in")
  assert model.num_classes == 0
  x = ref.images(2, 32, seed=2)
  expected = _pooled(torch_model, x)
  np.testing.assert_allclose(_logits(model, variables, x), expected, atol=1e-4, rtol=0)
  lvm_jax.save_pretrained(model, variables, tmp_path / "out")
  assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["ConvNextModel"]
  np.testing.assert_allclose(_pooled(ConvNextModel.from_pretrained(tmp_path / "out").eval(), x), expected, atol=1e-6)


def test_shape_mismatch_is_a_weights_mismatch_error_naming_tensor_and_shapes(tiny, tmp_path):
  folder, torch_model, _ = tiny
  tensors = dict(load_file(str(folder / "model.safetensors")))
  tensors["convnext.encoder.stages.2.layers.0.dwconv.weight"] = np.zeros((32, 1, 5, 5), np.float32)
  del tensors["convnext.encoder.stages.1.downsampling_layer.1.bias"]
  save_file(tensors, str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text((folder / "config.json").read_text())
  with pytest.raises(lvm_jax.WeightsMismatchError) as err:
    lvm_jax.load_checkpoint(str(tmp_path))
  message = str(err.value)
  assert message.startswith(f"{tmp_path} does not fit the model:")
  assert (
    "shape mismatch for convnext.encoder.stages.2.layers.0.dwconv.weight: checkpoint has (32, 1, 5, 5), model "
    "params/stage_2_block_0/dwconv/kernel expects (7, 7, 1, 32) (conv layout)"
  ) in message
  assert (
    "missing convnext.encoder.stages.1.downsampling_layer.1.bias (for params/downsample_1/conv/bias, shape (16,))"
  ) in message


def test_convnext_tiny_224_config_json_is_the_registered_variant():
  # ConvNextConfig's defaults are facebook/convnext-tiny-224's architecture (its config.json lists them all).
  args = converter.hf_model_args(ConvNextConfig().to_dict())
  assert ConvNeXt(**args) == lvm_jax.create_model("convnext_tiny", head_norm_eps=1e-12)
  assert converter.hf_model_args({"model_type": "convnext"}) == args


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_every_variant_names_exactly_the_transformers_tensors_and_has_its_parameter_count(name):
  # Built on torch's meta device: shapes only, no memory and no initialisation.
  model = lvm_jax.create_model(name)
  with torch.device("meta"):
    torch_model = ConvNextForImageClassification(ConvNextConfig(**converter.hf_config(model), num_labels=1000))
  assert {t.name for t in converter.hf_table(model)} == set(torch_model.state_dict())
  assert sum(p.numel() for p in torch_model.parameters()) == COUNTS[name]


@pytest.mark.parametrize(
  "field,value,message",
  [
    ("hidden_act", "relu", "hidden_act='relu' is not supported"),
    ("num_channels", 1, "num_channels=1: only RGB"),
    ("num_stages", 3, r"depths=\[1, 1, 2, 1\], hidden_sizes=\[8, 16, 32, 64\] and num_stages=3"),
    ("patch_size", [4, 2], r"patch_size=\[4, 2\]: only square"),
  ],
)
def test_unsupported_config_values_name_the_field(field, value, message):
  with pytest.raises(ValueError, match=message):
    converter.hf_model_args({**TINY, field: value})


def test_hf_config_refuses_inner_norm_eps_transformers_cannot_hold():
  with pytest.raises(ValueError, match="layer_norm_eps=1e-05"):
    converter.hf_config(ConvNeXt(layer_norm_eps=1e-5))


def test_preprocessing_is_the_convnext_image_processor_s(tiny, tmp_path):
  folder, _, ckpt = tiny
  # facebook/convnext-tiny-224's preprocessor_config.json: the shorter side resized to 224 / crop_pct = 256, then a
  # 224 center crop.
  processor_config = {
    "crop_pct": 0.875,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "ConvNextFeatureExtractor",
    "image_mean": list(IMAGENET_DEFAULT[0]),
    "image_std": list(IMAGENET_DEFAULT[1]),
    "resample": 3,
    "size": 224,
  }
  expected = lvm_jax.Preprocessing(
    size=(224, 224), resize_shorter=256, interpolation="bicubic", mean=IMAGENET_DEFAULT[0], std=IMAGENET_DEFAULT[1]
  )
  with_processor = tmp_path / "ckpt"
  with_processor.mkdir()
  for name in ("config.json", "model.safetensors"):
    (with_processor / name).write_bytes((folder / name).read_bytes())
  (with_processor / "preprocessor_config.json").write_text(json.dumps(processor_config))
  preprocessing = lvm_jax.load_checkpoint(str(with_processor)).preprocessing
  assert preprocessing == expected
  image = PIL.Image.fromarray(skimage.data.chelsea())
  processor = AutoImageProcessor.from_pretrained(with_processor)
  theirs = processor(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
  np.testing.assert_allclose(preprocessing(image), theirs, atol=1e-5, rtol=0)
  # Without a preprocessor_config.json: ConvNextImageProcessor's defaults with the model's image size as the
  # shortest edge (32 / 0.875 -> 36, then a 32 crop).
  standard = dict(mean=IMAGENET_STANDARD[0], std=IMAGENET_STANDARD[1])
  assert ckpt.preprocessing == dataclasses.replace(expected, size=(32, 32), resize_shorter=36, **standard)
