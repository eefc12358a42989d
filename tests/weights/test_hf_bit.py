"""BiT ResNetV2 to and from Hugging Face transformers (BitForImageClassification / BitModel), against transformers
itself on torch: the pre-activation BiT and the post-activation, "SAME"-padded ResNet of the ViT hybrids."""

import json

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import BitConfig, BitForImageClassification, BitModel

import lvm_jax
from lvm_jax.models.resnetv2 import ResNetV2
from lvm_jax.normalization import OPENAI_CLIP
from lvm_jax.weights import bit as converter
from lvm_jax.weights import mapping
from tests import torch_reference as ref
from tests.models.test_registry import PUBLISHED_PARAMS

# Four stages (two units in the second), 8 groups so that 8-channel layers normalise. 32x32 inputs reach 1x1.
TINY = dict(embedding_size=16, hidden_sizes=[32, 32, 64, 64], depths=[1, 2, 1, 1], num_groups=8, num_labels=5)
# The ViT hybrids' ResNet, as transformers builds it for them.
HYBRID_STYLE = dict(layer_type="bottleneck", global_padding="SAME", embedding_dynamic_padding=True)
STYLES = {"preact": {}, "hybrid": HYBRID_STYLE}


def _reference(config: dict, seed: int = 0, cls=BitForImageClassification):
  torch.manual_seed(seed)
  return ref.randomize(cls(BitConfig(**config)), seed=seed, scale=0.2)


def _logits(model, variables, x, cpu_kernels=False):
  # The pre-activation parity runs lvm_jax's CPU kernels (Winograd, 1x1 as matmul), as users' CPU runs do; the
  # others the plain XLA path, which compiles in about half the time.
  with lvm_jax.use_cpu_kernels(cpu_kernels):
    return np.asarray(jax.jit(model.apply)(variables, x))


def _pooled(torch_model, x):
  with torch.no_grad():
    out = torch_model(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).pooler_output
  return out.flatten(1).numpy()


@pytest.fixture(scope="module", params=sorted(STYLES))
def tiny(request, tmp_path_factory):
  folder = tmp_path_factory.mktemp(f"bit_{request.param}")
  torch_model = _reference({**TINY, **STYLES[request.param]})
  torch_model.save_pretrained(folder)
  return request.param, folder, torch_model, lvm_jax.load_checkpoint(str(folder))


def test_logits_match_transformers(tiny):
  # The hybrid style at 45x45: TensorFlow's SAME padding puts an odd input's extra pixel at the end.
  style, _, torch_model, ckpt = tiny
  model = ckpt.model
  assert (model.preact, model.padding) == {"preact": (True, "symmetric"), "hybrid": (False, "SAME")}[style]
  assert (model.stem_channels(), model.widths, model.depths, model.groups) == (16, (32, 32, 64, 64), (1, 2, 1, 1), 8)
  x = ref.images(2, {"preact": 32, "hybrid": 45}[style], seed=1)
  expected = ref.logits(torch_model, x)
  np.testing.assert_allclose(_logits(model, ckpt.variables, x, style == "preact"), expected, atol=1e-4, rtol=0)
  assert np.abs(expected).max() > 0.5 and not np.allclose(expected[0], expected[1])


def test_saved_tensors_are_exactly_the_checkpoint(tiny):
  style, folder, _, ckpt = tiny
  tensors = load_file(str(folder / "model.safetensors"))
  saved = mapping.save_tensors(converter.hf_table(ckpt.model), jax.tree.map(np.asarray, ckpt.variables))
  assert sorted(saved) == sorted(tensors)
  assert ("bit.norm.weight" in saved) == (style == "preact")  # the final norm of pre-activation units
  assert ("bit.encoder.stages.0.layers.0.downsample.norm.weight" in saved) == (style == "hybrid")
  for name, value in tensors.items():
    np.testing.assert_array_equal(saved[name], value, err_msg=name)


def test_save_pretrained_round_trips_through_transformers(tiny, tmp_path):
  _, _, torch_model, ckpt = tiny
  labels = ["cat", "dog", "bird", "fish", "frog"]
  lvm_jax.save_pretrained(ckpt.model, ckpt.variables, tmp_path, labels=labels)
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["model_type"] == "bit" and config["architectures"] == ["BitForImageClassification"]
  reloaded = BitForImageClassification.from_pretrained(tmp_path).eval()
  assert reloaded.config.id2label[3] == "fish"
  fields = ("hidden_sizes", "depths", "embedding_size", "layer_type", "global_padding", "embedding_dynamic_padding")
  for field in fields + ("num_groups", "num_labels"):
    assert getattr(reloaded.config, field) == getattr(torch_model.config, field), field
  for name, value in torch_model.state_dict().items():  # nothing re-initialised on load
    np.testing.assert_array_equal(reloaded.state_dict()[name].numpy(), value.numpy(), err_msg=name)
  x = ref.images(2, 32, seed=3)
  np.testing.assert_allclose(ref.logits(reloaded, x), ref.logits(torch_model, x), atol=1e-6, rtol=0)
  again, _ = lvm_jax.from_pretrained(tmp_path)
  assert again == ckpt.model


def test_base_model_loads_without_head_and_saves_as_bit_model(tmp_path):
  # BitModel's names carry no "bit." prefix; its pooler output is what our headless model returns.
  config = {k: v for k, v in TINY.items() if k != "num_labels"}
  torch_model = _reference(config, seed=2, cls=BitModel)
  torch_model.save_pretrained(tmp_path / "in")
  model, variables = lvm_jax.from_pretrained(tmp_path / "in")
  assert model.num_classes == 0
  x = ref.images(2, 32, seed=2)
  expected = _pooled(torch_model, x)
  np.testing.assert_allclose(_logits(model, variables, x), expected, atol=1e-4, rtol=0)
  lvm_jax.save_pretrained(model, variables, tmp_path / "out")
  assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["BitModel"]
  np.testing.assert_allclose(_pooled(BitModel.from_pretrained(tmp_path / "out").eval(), x), expected, atol=1e-6)


def test_shape_mismatch_is_a_weights_mismatch_error_naming_tensor_and_shapes(tiny, tmp_path):
  style, folder, _, _ = tiny
  if style != "preact":
    pytest.skip("one style is enough")
  tensors = dict(load_file(str(folder / "model.safetensors")))
  tensors["bit.encoder.stages.1.layers.1.conv2.weight"] = np.zeros((8, 8, 1, 1), np.float32)
  del tensors["bit.encoder.stages.2.layers.0.norm1.bias"]
  save_file(tensors, str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text((folder / "config.json").read_text())
  with pytest.raises(lvm_jax.WeightsMismatchError) as err:
    lvm_jax.load_checkpoint(str(tmp_path))
  message = str(err.value)
  assert (
    "shape mismatch for bit.encoder.stages.1.layers.1.conv2.weight: checkpoint has (8, 8, 1, 1), model "
    "params/stage_1_block_1/conv2/kernel expects (3, 3, 8, 8) (conv layout)"
  ) in message
  assert "missing bit.encoder.stages.2.layers.0.norm1.bias (for params/stage_2_block_0/norm1/bias, shape (32,))" in (
    message
  )


def test_bit_50_config_json_is_the_registered_variant():
  # BitConfig's defaults are google/bit-50's architecture (BiT-M R50x1).
  args = converter.hf_model_args(BitConfig().to_dict())
  assert ResNetV2(**args) == lvm_jax.create_model("bit_r50x1")
  assert converter.hf_model_args({"model_type": "bit"}) == args


@pytest.mark.parametrize("name", ["bit_r50x1", "bit_r101x3"])
def test_variants_name_exactly_the_transformers_tensors_and_have_their_parameter_count(name):
  # Built on torch's meta device: shapes only, no memory and no initialisation. The same code names every variant;
  # all six counts are checked in tests/models/test_registry.py.
  model = lvm_jax.create_model(name)
  with torch.device("meta"):
    torch_model = BitForImageClassification(BitConfig(**converter.hf_config(model), num_labels=1000))
  state = torch_model.state_dict()
  assert {t.name for t in converter.hf_table(model)} == set(state)
  ours = mapping.flatten(lvm_jax.abstract_variables(model))
  # Layouts on uninitialised arrays: to_theirs only transposes and reshapes.
  shapes = {
    t.name: mapping.to_theirs(t, np.empty(ours[t.path].shape, np.float32)).shape for t in converter.hf_table(model)
  }
  assert shapes == {k: tuple(v.shape) for k, v in state.items()}
  assert sum(p.numel() for p in torch_model.parameters()) == PUBLISHED_PARAMS[name]


@pytest.mark.parametrize(
  "field,value,message",
  [
    ("hidden_act", "gelu", "hidden_act='gelu' is not supported"),
    ("width_factor", 3, "width_factor=3 is not supported; only 1 .transformers widens the stages"),
    ("output_stride", 16, "output_stride=16 is not supported"),
    ("layer_type", "bottleneck", "layer_type='bottleneck', global_padding=None, embedding_dynamic_padding=False"),
    ("depths", [1, 1], r"depths=\[1, 1\] and hidden_sizes=\[32, 32, 64, 64\]"),
  ],
)
def test_unsupported_config_values_name_the_field(field, value, message):
  with pytest.raises(ValueError, match=message):
    converter.hf_model_args({**TINY, field: value})


def test_hf_config_refuses_what_transformers_cannot_build():
  with pytest.raises(ValueError, match="gn_eps=1e-06, ws_eps=1e-08; transformers' Bit fixes them"):
    converter.hf_config(ResNetV2(gn_eps=1e-6))
  with pytest.raises(ValueError, match="this model has preact=True, padding='SAME'"):
    converter.hf_config(ResNetV2(padding="SAME"))


def test_preprocessing_without_a_processor_config_is_bit_image_processor_s_at_the_model_size(tiny):
  style, folder, _, ckpt = tiny
  if style != "preact":
    pytest.skip("one style is enough")
  # BitImageProcessor (what AutoImageProcessor picks for model_type "bit"): shortest edge, center crop, CLIP's
  # mean/std; at the model's size instead of its default 224.
  mean, std = OPENAI_CLIP
  expected = lvm_jax.Preprocessing(size=(224, 224), resize_shorter=224, interpolation="bicubic", mean=mean, std=std)
  assert ckpt.preprocessing == expected
  assert lvm_jax.load_checkpoint(str(folder), image_size=32).preprocessing.size == (32, 32)
