"""EfficientNet to and from Hugging Face transformers (EfficientNetForImageClassification / EfficientNetModel), against
transformers itself on torch. Checkpoints are read as saved on disk (save_pretrained's names)."""

import json

import jax
import numpy as np
import PIL.Image
import pytest
import skimage.data
import torch
from safetensors.numpy import load_file, save_file
from transformers import AutoImageProcessor, EfficientNetConfig, EfficientNetForImageClassification, EfficientNetModel

import lvm_jax
from lvm_jax.models.efficientnet import EfficientNet
from lvm_jax.tasks.classify import Classifier
from lvm_jax.weights import efficientnet as converter
from lvm_jax.weights import mapping
from tests import torch_reference as ref
from tests.models.test_efficientnet import COUNTS

# Width 0.5 and depth 0.3: 16 stem channels, stages of 8, 16, 24, 40, 56, 96 (two blocks, the second residual) and
# 160 channels, a 640-wide head; 32x32 inputs reach 1x1. Block 2's stride-2 depthwise convolution pads symmetrically
# (depthwise_padding), the others as SAME does on even sides; the BatchNorm epsilon is not the default, so that a
# dropped one shows.
TINY = dict(
  width_coefficient=0.5,
  depth_coefficient=0.3,
  image_size=32,
  hidden_dim=640,
  depthwise_padding=[2],
  batch_norm_eps=2e-3,
  num_labels=5,
)
# transformers' conversion script: google/efficientnet-b0 .. b7 are EfficientNetConfig() with these fields changed.
RELEASED = {
  "efficientnet_b0": dict(
    hidden_dim=1280,
    width_coefficient=1.0,
    depth_coefficient=1.0,
    image_size=224,
    dropout_rate=0.2,
    depthwise_padding=[],
  ),  # fmt: skip
  "efficientnet_b1": dict(
    hidden_dim=1280,
    width_coefficient=1.0,
    depth_coefficient=1.1,
    image_size=240,
    dropout_rate=0.2,
    depthwise_padding=[16],
  ),  # fmt: skip
  "efficientnet_b2": dict(
    hidden_dim=1408,
    width_coefficient=1.1,
    depth_coefficient=1.2,
    image_size=260,
    dropout_rate=0.3,
    depthwise_padding=[5, 8, 16],
  ),  # fmt: skip
  "efficientnet_b3": dict(
    hidden_dim=1536,
    width_coefficient=1.2,
    depth_coefficient=1.4,
    image_size=300,
    dropout_rate=0.3,
    depthwise_padding=[5, 18],
  ),  # fmt: skip
  "efficientnet_b4": dict(
    hidden_dim=1792,
    width_coefficient=1.4,
    depth_coefficient=1.8,
    image_size=380,
    dropout_rate=0.4,
    depthwise_padding=[6],
  ),  # fmt: skip
  "efficientnet_b5": dict(
    hidden_dim=2048,
    width_coefficient=1.6,
    depth_coefficient=2.2,
    image_size=456,
    dropout_rate=0.4,
    depthwise_padding=[13, 27],
  ),  # fmt: skip
  "efficientnet_b6": dict(
    hidden_dim=2304,
    width_coefficient=1.8,
    depth_coefficient=2.6,
    image_size=528,
    dropout_rate=0.5,
    depthwise_padding=[31],
  ),  # fmt: skip
  "efficientnet_b7": dict(
    hidden_dim=2560,
    width_coefficient=2.0,
    depth_coefficient=3.1,
    image_size=600,
    dropout_rate=0.5,
    depthwise_padding=[18],
  ),  # fmt: skip
}


def _reference(config: dict, seed: int = 0, cls=EfficientNetForImageClassification):
  """transformers' model with noise at a 1/sqrt(fan_in) scale in every weight, norm scales around one and the
  running statistics of random images (then perturbed): transformers' own init (std 0.02, BatchNorm scales too) or
  statistics that do not fit the activations leave logits that hardly depend on the input."""
  torch.manual_seed(seed)
  model = cls(EfficientNetConfig(**config))
  gen = torch.Generator().manual_seed(seed)
  norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  scales = {id(m.weight) for m in norms}
  with torch.no_grad():
    for p in model.parameters():
      noise = torch.randn(p.shape, generator=gen)
      if p.ndim > 1:
        p.copy_(noise / p[0].numel() ** 0.5)
      else:
        p.copy_(1 + 0.2 * noise if id(p) in scales else 0.2 * noise)
    for m in norms:
      m.reset_running_stats()
      m.momentum = None  # a cumulative average: one batch gives its own statistics
    model.train()(pixel_values=torch.randn((8, 3, 32, 32), generator=gen))
    for m in norms:
      m.momentum = 0.01
      m.running_mean.add_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
      m.running_var.clamp_(min=0.1).mul_(0.7 + 0.6 * torch.rand(m.running_var.shape, generator=gen))
  return model.eval()


def _logits(model, variables, x):
  return np.asarray(jax.jit(model.apply)(variables, x))


def _pooled(torch_model, x):
  with torch.no_grad():
    return torch_model(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).pooler_output.numpy()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  folder = tmp_path_factory.mktemp("efficientnet_tiny")
  torch_model = _reference(TINY)
  torch_model.save_pretrained(folder)
  ckpt = lvm_jax.load_checkpoint(str(folder))
  return folder, torch_model, ckpt


def test_logits_match_transformers(tiny):
  # 37x45: odd sides, where transformers' fixed padding and SAME part ways (the model pads as transformers does);
  # the 32x32 of the other tests are even all the way down.
  _, torch_model, ckpt = tiny
  model = ckpt.model
  assert (model.width_multiplier, model.depth_multiplier, model.bn_eps) == (0.5, 0.3, 2e-3)
  assert (model.padding, model.symmetric_blocks, model.num_classes) == ("transformers", (2,), 5)
  x = np.random.RandomState(0).randn(2, 37, 45, 3).astype(np.float32)
  expected = ref.logits(torch_model, x)
  np.testing.assert_allclose(_logits(model, ckpt.variables, x), expected, atol=1e-4, rtol=0)
  assert np.abs(expected).max() > 0.5 and np.abs(expected[0] - expected[1]).max() > 0.1


def test_saved_tensors_are_exactly_the_checkpoint(tiny):
  folder, _, ckpt = tiny
  tensors = load_file(str(folder / "model.safetensors"))
  saved = mapping.save_tensors(converter.hf_table(ckpt.model), jax.tree.map(np.asarray, ckpt.variables))
  assert sorted(saved) == sorted(n for n in tensors if not n.endswith("num_batches_tracked"))
  assert "efficientnet.encoder.blocks.6.squeeze_excite.expand.bias" in saved
  for name, value in saved.items():
    assert tensors[name].shape == value.shape, name
    np.testing.assert_array_equal(value, tensors[name], err_msg=name)


def test_save_pretrained_round_trips_through_transformers(tiny, tmp_path):
  _, torch_model, ckpt = tiny
  labels = ["cat", "dog", "bird", "fish", "frog"]
  lvm_jax.save_pretrained(ckpt.model, ckpt.variables, tmp_path, labels=labels)
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["model_type"] == "efficientnet" and config["architectures"] == ["EfficientNetForImageClassification"]
  reloaded = EfficientNetForImageClassification.from_pretrained(tmp_path).eval()
  assert reloaded.config.id2label[3] == "fish"
  for field in ("width_coefficient", "depth_coefficient", "hidden_dim", "depthwise_padding", "batch_norm_eps"):
    assert getattr(reloaded.config, field) == getattr(torch_model.config, field), field
  for name, value in torch_model.state_dict().items():  # nothing re-initialised on load
    if not name.endswith("num_batches_tracked"):
      np.testing.assert_array_equal(reloaded.state_dict()[name].numpy(), value.numpy(), err_msg=name)
  x = ref.images(2, 32, seed=3)
  np.testing.assert_allclose(ref.logits(reloaded, x), ref.logits(torch_model, x), atol=1e-6, rtol=0)
  again, _ = lvm_jax.from_pretrained(tmp_path)
  assert again == ckpt.model


def test_base_model_loads_without_head_and_saves_as_efficientnet_model(tmp_path):
  # EfficientNetModel's names carry no "efficientnet." prefix; its pooler output is what our headless model returns.
  config = {k: v for k, v in TINY.items() if k != "num_labels"}
  torch_model = _reference(config, seed=2, cls=EfficientNetModel)
  torch_model.save_pretrained(tmp_path / "in")
  model, variables = lvm_jax.from_pretrained(tmp_path / "in")
  assert model.num_classes == 0
  x = ref.images(2, 32, seed=2)
  expected = _pooled(torch_model, x)
  np.testing.assert_allclose(_logits(model, variables, x), expected, atol=1e-4, rtol=0)
  lvm_jax.save_pretrained(model, variables, tmp_path / "out")
  assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["EfficientNetModel"]
  reloaded = EfficientNetModel.from_pretrained(tmp_path / "out").eval()
  np.testing.assert_allclose(_pooled(reloaded, x), expected, atol=1e-6)


def test_shape_mismatch_is_a_weights_mismatch_error_naming_tensor_and_shapes(tiny, tmp_path):
  folder, _, _ = tiny
  tensors = dict(load_file(str(folder / "model.safetensors")))
  tensors["efficientnet.encoder.blocks.2.depthwise_conv.depthwise_conv.weight"] = np.zeros((96, 1, 3, 3), np.float32)
  del tensors["efficientnet.encoder.top_bn.running_var"]
  save_file(tensors, str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text((folder / "config.json").read_text())
  with pytest.raises(lvm_jax.WeightsMismatchError) as err:
    lvm_jax.load_checkpoint(str(tmp_path))
  message = str(err.value)
  assert message.startswith(f"{tmp_path} does not fit the model:")
  assert (
    "shape mismatch for efficientnet.encoder.blocks.2.depthwise_conv.depthwise_conv.weight: checkpoint has "
    "(96, 1, 3, 3), model params/stage_2_block_0/dw_conv/kernel expects (5, 5, 1, 96) (conv layout)"
  ) in message
  assert "missing efficientnet.encoder.top_bn.running_var (for batch_stats/head_bn/var, shape (640,))" in message


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_configs_are_the_registered_variants_padded_as_same_at_their_size(name):
  # transformers' depthwise_padding lists are the blocks whose input is odd at the variant's resolution: padding
  # "transformers" with them is SAME at that size, and saving a registered ("same") variant gives them back.
  config = {**EfficientNetConfig(**RELEASED[name]).to_dict(), "model_type": "efficientnet"}
  args = converter.hf_model_args(config)
  registered = lvm_jax.create_model(name)
  assert EfficientNet(**args) == registered.clone(padding="transformers", symmetric_blocks=args["symmetric_blocks"])
  assert converter.hf_config(registered)["depthwise_padding"] == RELEASED[name]["depthwise_padding"]
  # Built on torch's meta device: shapes only, no memory and no initialisation.
  with torch.device("meta"):
    torch_model = EfficientNetForImageClassification(
      EfficientNetConfig(**converter.hf_config(registered), num_labels=1000)
    )
  assert sum(p.numel() for p in torch_model.parameters()) == COUNTS[name]
  names = {n for n in torch_model.state_dict() if not n.endswith("num_batches_tracked")}
  assert {t.name for t in converter.hf_table(registered)} == names


def test_defaults_of_a_bare_config_are_b7():
  assert EfficientNet(**converter.hf_model_args({"model_type": "efficientnet"})) == lvm_jax.create_model(
    "efficientnet_b7", padding="transformers"
  )


@pytest.mark.parametrize(
  "field,value,message",
  [
    ("hidden_act", "relu", "hidden_act='relu' is not supported"),
    ("num_channels", 1, "num_channels=1: only RGB"),
    ("pooling_type", "max", "pooling_type='max' is not supported"),
    ("kernel_sizes", [3] * 7, r"kernel_sizes=\[3, 3, 3, 3, 3, 3, 3\] is not supported; lvm_jax scales B0's stages"),
    ("hidden_dim", 1280, "hidden_dim=1280 differs from its head convolution's width 640"),
    ("width_coefficient", 0.25, "block 0 .* keeps 8 channels at stride 1, where transformers leaves out the residual"),
  ],
)
def test_unsupported_config_values_name_the_field(field, value, message):
  config = {**TINY, field: value}
  if field == "width_coefficient":
    config["hidden_dim"] = 320
  with pytest.raises(ValueError, match=message):
    converter.hf_model_args(config)


@pytest.mark.parametrize(
  "args,message",
  [
    (dict(padding="symmetric"), "padding='symmetric' .*only padding='same' or 'transformers' can be saved"),
    (dict(image_size=225), "odd image_size=225"),
  ],
)
def test_hf_config_refuses_paddings_transformers_cannot_hold(args, message):
  with pytest.raises(ValueError, match=message):
    converter.hf_config(EfficientNet(**args))


# google/efficientnet-b0's preprocessor_config.json as transformers' conversion script writes it (224, the Keras
# std, include_top: the Keras models divide by the std twice), with a crop and an offset added here.
PROCESSOR = {
  "image_processor_type": "EfficientNetImageProcessor",
  "size": {"height": 70, "width": 70},
  "do_center_crop": True,
  "crop_size": {"height": 64, "width": 64},
  "rescale_factor": 1 / 127.5,
  "rescale_offset": True,
  "include_top": True,
  "resample": 0,
  "image_mean": [0.485, 0.456, 0.406],
  "image_std": [0.47853944, 0.4732864, 0.47434163],
}


def test_preprocessing_is_the_efficientnet_image_processor_s(tiny, tmp_path):
  folder, _, ckpt = tiny
  for name in ("config.json", "model.safetensors"):
    (tmp_path / name).write_bytes((folder / name).read_bytes())
  (tmp_path / "preprocessor_config.json").write_text(json.dumps(PROCESSOR))
  preprocessing = lvm_jax.load_checkpoint(str(tmp_path)).preprocessing
  assert (preprocessing.size, preprocessing.resize_size, preprocessing.interpolation) == ((64, 64), (70, 70), "nearest")
  image = PIL.Image.fromarray(skimage.data.chelsea())
  processor = AutoImageProcessor.from_pretrained(tmp_path)
  theirs = processor(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
  assert theirs.min() < -5  # (x - mean) / std**2 with x in [-1, 1]
  np.testing.assert_allclose(preprocessing(image), theirs, atol=1e-5, rtol=0)
  # Without a preprocessor_config.json: EfficientNetImageProcessor's defaults at the model's size, include_top too.
  assert (ckpt.preprocessing.size, ckpt.preprocessing.resize_size) == ((32, 32), None)
  np.testing.assert_allclose(ckpt.preprocessing.std, (0.25, 0.25, 0.25))


def test_classifier_top5_equals_the_transformers_pipeline(tiny, tmp_path):
  from transformers import pipeline

  folder, _, _ = tiny
  for name in ("config.json", "model.safetensors"):
    (tmp_path / name).write_bytes((folder / name).read_bytes())
  (tmp_path / "preprocessor_config.json").write_text(
    json.dumps({**PROCESSOR, "size": {"height": 36, "width": 36}, "crop_size": {"height": 32, "width": 32}})
  )
  photo = tmp_path / "chelsea.png"
  PIL.Image.fromarray(skimage.data.chelsea()).save(photo)
  (predictions,) = Classifier(tmp_path)([photo], top_k=3)
  expected = pipeline("image-classification", model=str(tmp_path))(str(photo), top_k=3)
  assert [p.label for p in predictions] == [r["label"] for r in expected]
  np.testing.assert_allclose([p.probability for p in predictions], [r["score"] for r in expected], atol=1e-5)
