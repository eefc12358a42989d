"""Models from timm checkpoints, against logits and pixels timm computed (fixtures made by
tests/fixtures/timm/make_timm_fixtures.py)."""

import hashlib
import json
import pathlib
import shutil

import jax
import numpy as np
import PIL.Image
import pytest
import skimage.data

import lvm_jax

FIXTURES = pathlib.Path(__file__).parent.parent / "fixtures" / "timm"


def reference(name):
  with np.load(FIXTURES / name / "reference.npz") as data:
    return {k: data[k] for k in data.files}


@pytest.mark.parametrize(
  "name,pooling,class_token,fc_norm", [("vit_token", "token", True, False), ("vit_gap", "gap", False, True)]
)
def test_logits_match_timm(name, pooling, class_token, fc_norm):
  model, variables = lvm_jax.from_pretrained(FIXTURES / name)
  assert (model.pooling, model.class_token, model.fc_norm) == (pooling, class_token, fc_norm)
  assert (model.image_size, model.patch_size, model.width, model.depth) == (32, 8, 48, 2)
  ref = reference(name)
  np.testing.assert_allclose(model.apply(variables, ref["input"]), ref["logits"], atol=1e-4, rtol=0)


def test_token_grid_matches_timm_intermediates():
  # timm's last intermediate is the last block's output before the final norm; ours is after it,
  # so compare through the norm: equal up to the LayerNorm of the same tokens.
  model, variables = lvm_jax.from_pretrained(FIXTURES / "vit_token")
  ref = reference("vit_token")
  grid = model.apply(variables, ref["input"], return_features=True)["grid"]
  last = ref["features_1"]
  norm = variables["params"]["norm"]
  mean, var = last.mean(-1, keepdims=True), last.var(-1, keepdims=True)
  expected = (last - mean) / np.sqrt(var + 1e-6) * norm["scale"] + norm["bias"]
  np.testing.assert_allclose(grid, expected, atol=1e-4, rtol=0)


def test_timm_preprocessing_comes_from_pretrained_cfg():
  ckpt = lvm_jax.load_checkpoint(FIXTURES / "vit_token")
  assert ckpt.preprocessing.size == (32, 32)
  assert ckpt.preprocessing.interpolation == "bicubic"
  assert tuple(ckpt.preprocessing.mean) == (0.5, 0.5, 0.5)


PHOTOS = {
  "chelsea": lambda: skimage.data.chelsea(),
  "chelsea_portrait": lambda: np.ascontiguousarray(skimage.data.chelsea().transpose(1, 0, 2)),
}


@pytest.mark.parametrize("photo", sorted(PHOTOS))
@pytest.mark.parametrize("name", ["vit_token", "vit_gap", "swin", "resnet_basic", "resnet_bottleneck"])
def test_preprocessing_gives_the_pixels_of_timms_eval_transform(name, photo):
  # timm's resolve_data_config + create_transform on the model it loads from the folder, applied to a real photo:
  # resize of the shorter side to floor(size / crop_pct) (bicubic), center crop with round-half-even margins,
  # ToTensor, Normalize. One pixel level off is >= 0.0078 after normalization; float32 rounding is ~1e-7.
  pixels = PHOTOS[photo]()
  manifest = json.loads((FIXTURES / "MANIFEST.json").read_text())["preprocessing"]
  assert hashlib.sha256(pixels.tobytes()).hexdigest() == manifest["photos"][photo]["sha256"]
  stored = {cfg: fixture for fixture, c in manifest["fixtures"].items() for cfg in [fixture, *c["same_config"]]}
  with np.load(FIXTURES / "preprocessing.npz") as data:
    levels = data[f"{stored[name]}.{photo}"]
  preprocessing = lvm_jax.load_checkpoint(FIXTURES / name).preprocessing
  mean, std = (np.asarray(manifest["fixtures"][stored[name]]["data_config"][k], np.float32) for k in ("mean", "std"))
  timm_pixels = (levels.astype(np.float32) / np.float32(255) - mean) / std  # torchvision's float32 arithmetic
  np.testing.assert_allclose(preprocessing(PIL.Image.fromarray(pixels)), timm_pixels, atol=1e-5, rtol=0)


def test_unknown_timm_architecture_is_a_clear_error(tmp_path):
  shutil.copytree(FIXTURES / "vit_token", tmp_path / "ckpt")
  config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
  config["architecture"] = "xcit_tiny_12_p16_224.fb_in1k"
  (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="timm architecture 'xcit_tiny_12_p16_224.fb_in1k' is not supported"):
    lvm_jax.from_pretrained(tmp_path / "ckpt")


def test_swin_logits_and_stage_features_match_timm():
  model, variables = lvm_jax.from_pretrained(FIXTURES / "swin")
  assert (model.embed_dim, model.depths, model.num_heads, model.window_size) == (32, (2, 2), (2, 4), 4)
  ref = reference("swin")
  np.testing.assert_allclose(model.apply(variables, ref["input"]), ref["logits"], atol=1e-4, rtol=0)
  feats = model.apply(variables, ref["input"], return_features=True)
  np.testing.assert_allclose(feats["stride_4"], ref["features_0"], atol=1e-4, rtol=0)
  np.testing.assert_allclose(feats["stride_8"], ref["features_1"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name,block", [("resnet_basic", "basic"), ("resnet_bottleneck", "bottleneck")])
def test_resnet_logits_and_stage_features_match_timm(name, block):
  model, variables = lvm_jax.from_pretrained(FIXTURES / name)
  assert model.block == block and tuple(model.stage_sizes) == (1, 1, 1, 1)
  ref = reference(name)
  np.testing.assert_allclose(model.apply(variables, ref["input"]), ref["logits"], atol=1e-4, rtol=0)
  feats = model.apply(variables, ref["input"], return_features=True)
  for i, stride in enumerate((4, 8, 16, 32)):
    np.testing.assert_allclose(feats[f"stride_{stride}"], ref[f"features_{i}"], atol=1e-4, rtol=0)


def test_convnext_logits_and_stage_features_match_timm():
  model, variables = lvm_jax.from_pretrained(FIXTURES / "convnext")
  assert type(model).__name__ == "ConvNeXt" and (model.depths, model.dims) == ((1, 1, 2, 1), (8, 16, 32, 64))
  ref = reference("convnext")
  np.testing.assert_allclose(model.apply(variables, ref["input"]), ref["logits"], atol=1e-4, rtol=0)
  feats = model.apply(variables, ref["input"], return_features=True)
  for i, stride in enumerate((4, 8, 16, 32)):
    np.testing.assert_allclose(feats[f"stride_{stride}"], ref[f"features_{i}"], atol=1e-4, rtol=0)


@pytest.mark.parametrize(
  "name,padding,bn_eps", [("efficientnet", "symmetric", 1e-5), ("tf_efficientnet", "same", 1e-3)]
)
def test_efficientnet_logits_and_stage_features_match_timm(name, padding, bn_eps):
  # efficientnet_b0 (PyTorch-trained: torch's padding, eps 1e-5) and tf_efficientnet_b0 (TF SAME on 35x35 inputs,
  # eps 1e-3), both with timm's multipliers replaced by 0.2 and 0.3 (recorded in the fixtures' model_args).
  model, variables = lvm_jax.from_pretrained(FIXTURES / name)
  assert type(model).__name__ == "EfficientNet"
  assert (model.width_multiplier, model.depth_multiplier, model.padding, model.bn_eps) == (0.2, 0.3, padding, bn_eps)
  ref = reference(name)
  logits, feats = jax.jit(lambda v, x: (model.apply(v, x), model.apply(v, x, return_features=True)))(
    variables, ref["input"]
  )
  # Values reach ~100 in the last stage, and float32 rounding grows with them: timm's own float32 logits differ from
  # its float64 ones by ~1e-5 of the largest. Compared relative to each array's largest value.
  close = lambda ours, theirs: np.testing.assert_allclose(ours, theirs, atol=5e-5 * np.abs(theirs).max(), rtol=0)
  close(logits, ref["logits"])
  for i, stride in enumerate((4, 8, 16, 32)):
    close(feats[f"stride_{stride}"], ref[f"features_{i}"])


def test_efficientnet_model_args_timm_would_build_differently_are_refused(tmp_path):
  shutil.copytree(FIXTURES / "efficientnet", tmp_path / "ckpt")
  config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
  config["model_args"]["act_layer"] = "relu"
  (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r"timm EfficientNet model_args not supported .*\{'act_layer': 'relu'\}"):
    lvm_jax.from_pretrained(tmp_path / "ckpt")
  config["architecture"] = "efficientnet_b3_pruned"
  (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="'efficientnet_b3_pruned' is not an EfficientNet this loader knows"):
    lvm_jax.from_pretrained(tmp_path / "ckpt")
