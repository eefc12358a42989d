"""BiT ResNetV2 and the ViT hybrids from timm folders and Google's .npz releases, against the logits timm computed
for the same files (fixtures bit, bit_npz, vit_hybrid, vit_hybrid_npz, made by tests/fixtures/timm/make_timm_fixtures.py
with timm's own folder and npz loaders)."""

import functools
import json
import pathlib

import jax
import numpy as np
import pytest

import lvm_jax
from lvm_jax.models import registry
from lvm_jax.models.vit import VisionTransformer
from lvm_jax.weights import bit, files, mapping, timm
from lvm_jax.weights import vit as vit_weights

FIXTURES = pathlib.Path(__file__).parent.parent / "fixtures" / "timm"
MANIFEST = json.loads((FIXTURES / "MANIFEST.json").read_text())


def reference(name):
  with np.load(FIXTURES / name / "reference.npz") as data:
    return {k: data[k] for k in data.files}


@functools.cache
def _compiled(model):
  return jax.jit(lambda v, x: (model.apply(v, x), model.apply(v, x, return_features=True)))


def run(model, variables, x):
  # The plain XLA path compiles in about half the time of the CPU kernels' form (Winograd), which the transformers
  # parity tests (tests/weights/test_hf_bit.py) run.
  with lvm_jax.use_cpu_kernels(False):
    return _compiled(model)(variables, x)


def test_bit_folder_logits_and_stage_features_match_timm():
  ckpt = lvm_jax.load_checkpoint(FIXTURES / "bit")
  model = ckpt.model
  # resnetv2_50x1_bit's units, narrowed by the folder's model_args (channels, stem_chs)
  assert (model.depths, model.widths, model.stem_channels(), model.preact, model.padding) == (
    (3, 4, 6, 3),
    (128, 128, 128, 128),
    32,
    True,
    "symmetric",
  )
  ref = reference("bit")
  logits, features = run(model, ckpt.variables, ref["input"])
  np.testing.assert_allclose(logits, ref["logits"], atol=1e-4, rtol=0)
  for i, stride in enumerate((8, 16, 32)):  # timm's stages 1..3, before the final norm
    # The pre-activation trunk is never normalised and grows to ~40 here: float32 rounding relative to that.
    expected = ref[f"features_{i}"]
    np.testing.assert_allclose(features[f"stride_{stride}"], expected, atol=3e-5 * np.abs(expected).max(), rtol=0)
  # BiT's inputs: [-1, 1] (timm's pretrained_cfg: Inception mean/std)
  assert (ckpt.preprocessing.mean, ckpt.preprocessing.std) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def test_bit_npz_logits_match_timm_load_of_the_same_file():
  ckpt = lvm_jax.load_checkpoint(FIXTURES / "bit_npz" / "model.npz")
  model = ckpt.model
  assert type(model).__name__ == "ResNetV2" and model.num_classes == 10 and model.depths == (1, 1, 1, 1)
  assert (model.stem_channels(), model.widths, model.width_factor) == (32, (128, 128, 128, 128), 1)
  ref = reference("bit_npz")
  logits, _ = run(model, ckpt.variables, ref["input"])
  np.testing.assert_allclose(logits, ref["logits"], atol=1e-4, rtol=0)
  assert ckpt.preprocessing == lvm_jax.Preprocessing(size=(224, 224), interpolation="bilinear")  # [-1, 1]


def test_bit_npz_architecture_is_read_off_the_shapes():
  # A BiT-M-R50x3.npz as released (21,843 classes), as shapes: the registered variant, width factor and all.
  model = lvm_jax.create_model("bit_r50x3", num_classes=21843)
  shapes = mapping.flatten(registry.abstract_variables(model))
  names = {t.name: np.empty(shapes[t.path].shape, np.float32) for t in bit.npz_table(model)}
  assert bit.is_npz(names) and lvm_jax.ResNetV2(**bit.npz_model_args(names)) == model
  assert "resnet/block4/unit03/c/standardized_conv2d/kernel" in names
  assert "resnet/block2/unit01/a/proj/standardized_conv2d/kernel" in names
  assert names["resnet/head/conv2d/kernel"].shape == (6144, 21843)  # loads from [1, 1, 6144, 21843] too


def test_hybrid_folder_logits_match_timm():
  # vit_tiny_r_s16_p8: the ResNet's stem alone (timm keeps it as the backbone itself: conv, norm), 2x2 patches here.
  ckpt = lvm_jax.load_checkpoint(FIXTURES / "vit_hybrid")
  model = ckpt.model
  assert (model.resnet_depths, model.resnet_width, model.patch_size, model.patch_stride) == ((), 64, 2, 8)
  assert (model.image_size, model.width, model.depth, model.grid_size) == (32, 48, 2, 4)
  ref = reference("vit_hybrid")
  logits, features = run(model, ckpt.variables, ref["input"])
  np.testing.assert_allclose(logits, ref["logits"], atol=1e-4, rtol=0)
  assert features["grid"].shape == ref["features_1"].shape == (2, 4, 4, 48)
  with lvm_jax.use_cpu_kernels(False):
    blocks = jax.jit(lambda v, x: model.apply(v, x, return_blocks=(0, 1)))(ckpt.variables, ref["input"])
  for i, block in enumerate(blocks):  # each transformer block's tokens on the grid, as timm's
    np.testing.assert_allclose(block, ref[f"features_{i}"], atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def hybrid_npz():
  return lvm_jax.load_checkpoint(FIXTURES / "vit_hybrid_npz" / "model.npz")


def test_hybrid_npz_logits_match_timm_load_of_the_same_file(hybrid_npz):
  model = hybrid_npz.model
  assert isinstance(model, VisionTransformer) and (model.resnet_depths, model.resnet_width) == ((1, 1), 32)
  assert (model.patch_size, model.patch_stride, model.image_size, model.grid_size) == (1, 8, 32, 4)
  ref = reference("vit_hybrid_npz")
  logits, _ = run(model, hybrid_npz.variables, ref["input"])
  np.testing.assert_allclose(logits, ref["logits"], atol=1e-4, rtol=0)
  assert "conv_proj" not in str(jax.tree.structure(hybrid_npz.variables))  # our names: resnet/stage_0_block_0/...
  unit = hybrid_npz.variables["params"]["resnet"]["stage_1_block_0"]
  assert unit["proj_conv"]["kernel"].shape == (1, 1, 128, 256) and unit["conv2"]["kernel"].shape == (3, 3, 64, 64)


def test_hybrid_in_timm_names_gives_timm_logits(hybrid_npz):
  # The timm model that read the npz, as its state dict (patch_embed.backbone.stem.conv, ...stages.0.blocks.0...):
  # the same weights in timm's names and layouts.
  model = hybrid_npz.model
  tensors = timm.split_fused_qkv(files.read_safetensors(FIXTURES / "vit_hybrid_npz" / "model.safetensors"))
  assert "patch_embed.backbone.stages.1.blocks.0.downsample.norm.weight" in tensors
  variables = mapping.load_variables(
    vit_weights.timm_table(model), tensors, registry.abstract_variables(model), source="timm state dict"
  )
  ref = reference("vit_hybrid_npz")
  np.testing.assert_allclose(run(model, variables, ref["input"])[0], ref["logits"], atol=1e-4, rtol=0)


def test_r50_vit_b16_names_exactly_timms_tensors_and_has_its_parameter_count():
  # timm's vit_base_r50_s16_384 (the paper's R50+ViT-B/16 at 384), its state dict recorded in the manifest.
  full = MANIFEST["vit_hybrid_npz"]["full_size"]["vit_base_r50_s16_384"]
  args = vit_weights.timm_model_args("vit_base_r50_s16_384", {})
  model = VisionTransformer(**args, num_classes=1000)
  assert model == lvm_jax.create_model("vit_b16_r50", image_size=384)
  ours = mapping.flatten(registry.abstract_variables(model))
  assert sum(v.size for v in ours.values()) == full["num_params"] == 98_950_952
  fused = {}  # timm fuses query/key/value: our three kernels are one [3 * width, width] qkv weight
  for t in vit_weights.timm_table(model):
    shape = mapping.to_theirs(t, np.empty(ours[t.path].shape, np.float32)).shape
    name = t.name.replace(".attn.q.", ".attn.qkv.").replace(".attn.k.", ".attn.qkv.").replace(".attn.v.", ".attn.qkv.")
    fused[name] = (fused[name][0] + shape[0],) + shape[1:] if name != t.name and name in fused else shape
  assert fused == {k: tuple(v) for k, v in full["state_dict"].items()}


def test_npz_that_is_neither_vit_nor_bit_is_a_clear_error(tmp_path):
  np.savez(tmp_path / "other.npz", **{"resnet/block1/unit01/a/group_norm/gamma": np.ones(3, np.float32)})
  with pytest.raises(ValueError, match=r"neither a ViT checkpoint .* nor a BiT one \(no 'resnet/root_block/"):
    lvm_jax.load_checkpoint(tmp_path / "other.npz")


def test_bit_npz_with_a_missing_unit_names_it(tmp_path):
  with np.load(FIXTURES / "bit_npz" / "model.npz") as data:
    tensors = {k: data[k] for k in data.files if not k.startswith("resnet/block2/")}
  np.savez(tmp_path / "gap.npz", **tensors)
  with pytest.raises(ValueError, match=r"gap.npz: no consecutive resnet/block1, block2, ... units \(found blocks"):
    lvm_jax.load_checkpoint(tmp_path / "gap.npz")


def test_bit_npz_with_a_missing_tensor_names_it_and_the_file(tmp_path):
  name = "resnet/block1/unit01/c/standardized_conv2d/kernel"
  with np.load(FIXTURES / "bit_npz" / "model.npz") as data:
    tensors = {k: data[k] for k in data.files if k != name}
  np.savez(tmp_path / "holed.npz", **tensors)
  with pytest.raises(ValueError, match=rf"holed\.npz: missing tensor {name}$"):
    lvm_jax.load_checkpoint(tmp_path / "holed.npz")


def test_unknown_npz_overrides_are_clear_errors():
  with pytest.raises(TypeError, match=r"ResNetV2 has no argument 'drop_rate'; its arguments are: num_classes, "):
    lvm_jax.load_checkpoint(FIXTURES / "bit_npz" / "model.npz", drop_rate=0.1)
  with pytest.raises(TypeError, match=r"VisionTransformer has no argument 'widht'; its arguments are: "):
    lvm_jax.load_checkpoint(FIXTURES / "vit_hybrid_npz" / "model.npz", widht=8)


@pytest.mark.parametrize(
  "architecture,model_args,message",
  [
    ("resnetv2_50x1_bit", {"stem_type": "deep"}, r"model_args not supported: \{'stem_type': 'deep'\}"),
    ("resnetv2_50_bit", {}, "not a BiT ResNetV2 this loader knows"),
    ("resnetv2_50x1_bit", {"channels": [64, 128]}, "need 4 stage widths"),
    ("vit_base_r50_s16_384", {"padding_same": False}, "padding_same=False is not supported"),
    ("vit_base_r101_s16_384", {}, "not a ViT this loader knows"),
  ],
)
def test_unsupported_timm_configs_are_clear_errors(architecture, model_args, message):
  with pytest.raises(ValueError, match=message):
    timm.build_model({"architecture": architecture, "model_args": model_args}, "folder")
