"""Detector backbones: the stride-8/16/32 maps of each family at a non-square canvas, ViTDet's simple feature pyramid
against the same layers in torch, parameter groups, and checkpoints used as loaded."""

import pathlib

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lvm_jax.models.vit import VisionTransformer
from lvm_jax.tasks.detection import backbones
from lvm_jax.train import optimizer

FIXTURES = pathlib.Path(__file__).parents[2] / "fixtures" / "timm"
TINY_VIT = dict(image_size=32, patch_size=16, width=32, depth=2, mlp_dim=64, num_heads=2)
SPECS = {
  "resnet": {"model": "resnet18", "model_args": dict(stage_sizes=(1, 1, 1, 1), width=8)},
  "swin": {
    "model": "swin_t",
    "model_args": dict(image_size=64, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=2),
  },
  "vit": {"model": "vit_ti16", "model_args": TINY_VIT, "pyramid": {"channels": 24}},
  "convnext": {"model": "convnext_tiny", "model_args": dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))},
  "efficientnet": {"model": "efficientnet_b0", "model_args": dict(width_multiplier=0.25, depth_multiplier=0.3)},
  "mobilenet_v2": {"model": "mobilenet_v2", "model_args": dict(width_mult=0.25)},
  "bit": {"model": "bit_r50x1", "model_args": dict(depths=(1, 1, 1, 1), widths=(128, 128, 256, 256), stem_width=32)},
  # the ResNet of the hybrid at stride 8, two-pixel patches: a stride-16 grid, as R50+ViT-B/16's
  "vit_hybrid": {
    "model": "vit_b16_r50",
    "model_args": dict(TINY_VIT, patch_size=2, resnet_depths=(1, 1), resnet_width=32),
    "pyramid": {"channels": 24},
  },
}
CANVAS = (2, 64, 96, 3)  # non-square: 8x12 at stride 8, 4x6 at 16, 2x3 at 32


def abstract(backbone, x):
  return nn.meta.unbox(jax.eval_shape(lambda x: backbone.init(jax.random.key(0), x, return_features=True), x))


@pytest.mark.parametrize("family", sorted(SPECS))
def test_every_family_gives_stride_8_16_32_maps_at_a_non_square_canvas(family):
  backbone, variables, mean_std = backbones.build_backbone(SPECS[family])
  assert variables is None and mean_std is None  # a registered model starts from its own init
  # Shapes as XLA would give them, traced without compiling (the jitted runs are in the tests below).
  x = jax.ShapeDtypeStruct(CANVAS, np.float32)
  out, _ = jax.eval_shape(lambda x: backbone.init_with_output(jax.random.key(0), x, return_features=True), x)
  channels = backbones.feature_channels(backbone)
  for stride in (8, 16, 32):
    key = f"stride_{stride}"
    assert out[key].shape == (2, 64 // stride, 96 // stride, channels[key]), key
  expected = {"resnet": (16, 32, 64), "swin": (32, 64, 128), "vit": (24, 24, 24), "convnext": (16, 32, 64)}
  expected["efficientnet"] = (16, 32, 80)
  expected.update(mobilenet_v2=(8, 24, 1280), bit=(128, 256, 256), vit_hybrid=(24, 24, 24))
  expected = expected[family]
  assert [channels[f"stride_{s}"] for s in (8, 16, 32)] == list(expected)


def torch_simple_feature_pyramid(params, grid, grid_stride, strides, eps=1e-6):
  """ViTDet's simple feature pyramid written with torch's layers (NCHW), on our parameters."""
  t = lambda a: torch.from_numpy(np.array(a, np.float32))
  conv = lambda k: t(np.asarray(k).transpose(3, 2, 0, 1))  # [kh, kw, in, out] -> [out, in, kh, kw]
  # Flax's ConvTranspose kernel is torch's [in, out, kh, kw] weight flipped in space.
  deconv = lambda k: t(np.asarray(k)[::-1, ::-1].transpose(2, 3, 0, 1))
  norm = lambda x, p: F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], t(p["scale"]), t(p["bias"]), eps).permute(
    0, 3, 1, 2
  )
  out = {}
  with torch.no_grad():
    for stride in strides:
      name, x = f"stride_{stride}", t(grid).permute(0, 3, 1, 2)
      ups = int(np.log2(grid_stride / stride)) if stride < grid_stride else 0
      for i in range(ups):
        if i:
          x = F.gelu(norm(x, params[f"{name}_up_norm_{i - 1}"]))
        up = params[f"{name}_up_{i}"]
        x = F.conv_transpose2d(x, deconv(up["kernel"]), t(up["bias"]), stride=2)
      if stride > grid_stride:
        x = F.max_pool2d(x, stride // grid_stride)
      x = norm(F.conv2d(x, conv(params[f"{name}_lateral"]["kernel"])), params[f"{name}_lateral_norm"])
      x = norm(F.conv2d(x, conv(params[f"{name}_output"]["kernel"]), padding=1), params[f"{name}_output_norm"])
      out[name] = x.permute(0, 2, 3, 1).numpy()
  return out


# Strides 8/16/32 from a stride-8 grid: identity, 2x and 4x max pooling; from a stride-32 grid: two 2x upsamplings
# (LayerNorm and GELU between), one, identity. A patch-16 ViT's pyramid (2x up, identity, 2x pool) uses only these.
@pytest.mark.parametrize("grid_stride", [8, 32])
def test_simple_feature_pyramid_is_vitdets_layers(grid_stride):
  pyramid = backbones.SimpleFeaturePyramid(grid_stride, channels=24)
  grid = jax.random.normal(jax.random.key(1), (2, 64 // grid_stride, 96 // grid_stride, 32))
  # Random parameters (norm scales around 1) instead of an init, which would be one more compile.
  leaves, tree = jax.tree.flatten(nn.meta.unbox(jax.eval_shape(pyramid.init, jax.random.key(0), grid))["params"])
  keys = jax.random.split(jax.random.key(2), len(leaves))
  draw = lambda leaf, k: (leaf.ndim == 1) + 0.2 * jax.random.normal(k, leaf.shape)
  params = jax.tree.unflatten(tree, [draw(leaf, k) for leaf, k in zip(leaves, keys)])
  out = jax.jit(pyramid.apply)({"params": params}, grid)
  expected = torch_simple_feature_pyramid(params, grid, grid_stride, (8, 16, 32))
  assert sorted(out) == sorted(expected) == ["stride_16", "stride_32", "stride_8"]
  for key, value in expected.items():
    assert out[key].shape == (2, 64 // int(key[7:]), 96 // int(key[7:]), 24)
    np.testing.assert_allclose(out[key], value, atol=2e-5, rtol=0, err_msg=key)


def test_vit_backbone_feeds_the_chosen_blocks_grid_to_its_pyramid():
  vit = VisionTransformer(**TINY_VIT, num_classes=0, dynamic_image_size=True)
  x = jax.random.normal(jax.random.key(1), CANVAS)
  last, first = backbones.ViTBackbone(vit, channels=24), backbones.ViTBackbone(vit, channels=24, block=0)
  variables = nn.meta.unbox(jax.jit(lambda x: last.init(jax.random.key(0), x, return_features=True))(x))
  params = variables["params"]
  # The last block's output before the final norm: the ViT stops there, so it has no final norm (nor head).
  assert set(params["vit"]) == {"patch_embed", "pos_embed", "cls_token", "block_0", "block_1"}
  assert set(abstract(first, x)["params"]["vit"]) == {"patch_embed", "pos_embed", "cls_token", "block_0"}

  @jax.jit  # one compile for all of it
  def run(variables, x):
    outs = [backbone.apply(variables, x, train=False, return_features=True) for backbone in (last, first)]
    # The pyramid on block 1's and block 0's grids, computed apart.
    grids = vit.apply({"params": variables["params"]["vit"]}, x, return_blocks=(1, 0))
    pyramid = backbones.SimpleFeaturePyramid(16, channels=24)
    return outs, [pyramid.apply({"params": variables["params"]["pyramid"]}, grid) for grid in grids]

  outs, expected = run(variables, x)
  for out, want in zip(outs, expected):
    for key in ("stride_8", "stride_16", "stride_32"):
      assert out[key].shape == (2, 64 // int(key[7:]), 96 // int(key[7:]), 24)
      np.testing.assert_allclose(out[key], want[key], atol=1e-5, rtol=0)
  assert not np.allclose(outs[0]["stride_16"], outs[1]["stride_16"], atol=1e-3)  # the blocks differ


def test_vit_backbone_describes_its_parameters_to_the_optimizer():
  backbone, _, _ = backbones.build_backbone(SPECS["vit"])
  params = abstract(backbone, np.zeros(CANVAS, np.float32))["params"]
  ids, count = optimizer.layer_ids(params, backbone)  # raises if any parameter has no id
  depth = TINY_VIT["depth"]
  assert count == depth + 2
  assert ids["vit/patch_embed/kernel"] == ids["vit/pos_embed"] == ids["vit/cls_token"] == 0
  assert ids["vit/block_0/mlp/fc1/kernel"] == 1 and ids["vit/block_1/attn/query/kernel"] == 2
  assert {i for path, i in ids.items() if path.startswith("pyramid/")} == {depth + 1}
  assert backbone.layer_id("neck/kernel") is None
  decayed = dict(
    zip(optimizer.param_paths(params), jax.tree.leaves(optimizer.weight_decay_mask(params, model=backbone)))
  )
  assert not decayed["vit/pos_embed"] and not decayed["vit/cls_token"] and not decayed["vit/block_0/norm1/scale"]
  assert not decayed["pyramid/stride_8_lateral_norm/scale"] and not decayed["pyramid/stride_8_up_0/bias"]
  assert decayed["pyramid/stride_8_lateral/kernel"] and decayed["vit/block_0/mlp/fc1/kernel"]


def test_pretrained_vit_parameters_are_used_as_loaded():
  # timm's tiny ViT, patch 8: the pyramid is identity at 8 and max pooling at 16 and 32.
  spec = {"pretrained": str(FIXTURES / "vit_token"), "pyramid": {"channels": 16}}
  backbone, variables, mean_std = backbones.build_backbone(spec)
  checkpoint = backbones.pretrained_lib.load_checkpoint(FIXTURES / "vit_token")
  assert mean_std == (checkpoint.preprocessing.mean, checkpoint.preprocessing.std)
  from_checkpoint = checkpoint.variables["params"]
  vit = variables["params"]["vit"]
  assert set(vit) == {"patch_embed", "pos_embed", "cls_token", "block_0", "block_1"}  # no final norm, no head
  for path, leaf in zip(optimizer.param_paths(vit), jax.tree.leaves(vit)):
    expected = from_checkpoint
    for key in path.split("/"):
      expected = expected[key]
    np.testing.assert_array_equal(leaf, expected, err_msg=path)
  x = jax.ShapeDtypeStruct((1, 32, 64, 3), np.float32)
  assert jax.tree.structure(variables) == jax.tree.structure(abstract(backbone, x))
  out = jax.eval_shape(lambda v, x: backbone.apply(v, x), variables, x)
  assert out["stride_8"].shape == (1, 4, 8, 16) and out["stride_32"].shape == (1, 1, 2, 16)


def test_pretrained_resnet_is_returned_as_loaded():
  backbone, variables, mean_std = backbones.build_backbone({"pretrained": str(FIXTURES / "resnet_basic")})
  checkpoint = backbones.pretrained_lib.load_checkpoint(FIXTURES / "resnet_basic")
  assert mean_std == (checkpoint.preprocessing.mean, checkpoint.preprocessing.std)
  loaded = checkpoint.variables
  assert "head" in loaded["params"] and "head" not in variables["params"]  # what a backbone does not use
  loaded = {**loaded, "params": {k: v for k, v in loaded["params"].items() if k != "head"}}
  assert jax.tree.structure(variables) == jax.tree.structure(loaded)
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(a, b)
  assert "batch_stats" in variables
  # These very weights give timm's stage outputs (tests/weights/test_timm.py), so the stride maps are timm's.
  assert backbones.feature_channels(backbone) == {"stride_4": 64, "stride_8": 16, "stride_16": 16, "stride_32": 16}


@pytest.mark.parametrize(
  "spec,message",
  [
    ({"model": "resnet18", "pretrained": "x"}, "exactly one of 'model'"),
    ({"model_args": {}}, "exactly one of 'model'"),
    ({"model": "resnet18", "neck": 1}, r"unknown keys \['neck'\]"),
    ({"model": "resnet18", "model_args": {"num_classes": 3}}, "leave num_classes out"),
    ({"model": "resnet18", "pyramid": {"channels": 8}}, "ResNet has its own stages"),
  ],
)
def test_bad_specs_are_clear_errors(spec, message):
  with pytest.raises(ValueError, match=message):
    backbones.build_backbone(spec)


def test_bad_vit_canvases_and_strides_are_clear_errors():
  vit = VisionTransformer(**TINY_VIT, num_classes=0, dynamic_image_size=True)
  with pytest.raises(ValueError, match="multiples of 32, got 48x64"):
    abstract(backbones.ViTBackbone(vit), np.zeros((1, 48, 64, 3), np.float32))
  with pytest.raises(ValueError, match="12 is not"):
    abstract(backbones.ViTBackbone(vit, strides=(8, 12)), np.zeros((1, 64, 64, 3), np.float32))
  with pytest.raises(ValueError, match="return_features=True"):
    backbones.ViTBackbone(vit).init(jax.random.key(0), np.zeros((1, 64, 64, 3), np.float32), return_features=False)
  with pytest.raises(TypeError, match="not VisionTransformer"):
    backbones.feature_channels(vit)
