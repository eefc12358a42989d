"""The ViT hybrids (R50+ViT-B/16): a ResNetV2 stem before the patch embedding; parameter counts against timm, the
parameter tree, the token grid it gives at every input size, parameter groups, and fine-tuning at another size."""

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lvm_jax
from lvm_jax.models.vit import VisionTransformer
from lvm_jax.train import optimizer as opt

# timm's vit_tiny_r_s16_p8 (the ResNet's stem, then 2x2 patches) at 32x32: a 4x4 grid.
TIMM_HYBRID = pathlib.Path(__file__).parent.parent / "fixtures" / "timm" / "vit_hybrid"
# A ResNet of two one-unit stages (stride 8) under a two-block ViT: 4x4 tokens at 32x32.
TINY = dict(
  image_size=32,
  patch_size=1,
  width=32,
  depth=2,
  mlp_dim=64,
  num_heads=2,
  num_classes=5,
  resnet_depths=(1, 1),
  resnet_width=32,
)


def _init(model, height, width=None, **kwargs):
  x = jnp.zeros((1, height, width or height, 3))
  return jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x, **kwargs))


def test_r50_vit_b16_is_the_papers_hybrid_with_timms_parameter_counts():
  model = lvm_jax.create_model("vit_b16_r50")
  assert (model.resnet_depths, model.resnet_width, model.patch_size, model.patch_stride) == ((3, 4, 9), 64, 1, 16)
  assert (model.width, model.depth, model.num_heads, model.grid_size) == (768, 12, 12, 14)
  # timm vit_base_r50_s16_224 / vit_base_r50_s16_384 at 1000 classes (the 384 one is the paper's released model)
  for size, count in ((224, 98_659_112), (384, 98_950_952)):
    logits, variables = _init(model.clone(image_size=size), size)
    assert logits.shape == (1, 1000)
    assert sum(v.size for v in jax.tree.leaves(nn.meta.unbox(variables))) == count
  params = nn.meta.unbox(variables)["params"]
  resnet = params["resnet"]
  units = [f"stage_{s}_block_{i}" for s, n in enumerate((3, 4, 9)) for i in range(n)]
  assert sorted(resnet) == sorted(["stem_conv", "stem_norm", *units])  # no final norm, no head
  assert resnet["stage_2_block_0"]["proj_conv"]["kernel"].shape == (1, 1, 512, 1024)
  assert params["patch_embed"]["kernel"].shape == (1, 1, 1024, 768)  # one token per stride-16 position
  assert params["pos_embed"].shape == (1, 1 + 24 * 24, 768)


@pytest.fixture(scope="module")
def tiny():
  return VisionTransformer(**TINY)


def test_token_grid_and_blocks_at_the_resnet_stride(tiny):
  features, _ = _init(tiny, 32, return_features=True)
  assert features["grid"].shape == (1, 4, 4, 32) and features["pooled"].shape == (1, 32)
  blocks, _ = _init(tiny, 32, return_blocks=(0, -1))
  assert [b.shape for b in blocks] == [(1, 4, 4, 32)] * 2
  # stem only: stride 4 times the patch
  stem_only = tiny.clone(resnet_depths=(), patch_size=2)
  assert stem_only.patch_stride == 8 and _init(stem_only, 32, return_features=True)[0]["grid"].shape == (1, 4, 4, 32)
  scanned = _init(tiny.clone(scan_layers=True), 32)[1]["params"]
  assert sorted(scanned) == ["blocks", "cls_token", "head", "norm", "patch_embed", "pos_embed", "resnet"]


def test_input_size_is_checked_against_the_patch_stride(tiny):
  with pytest.raises(ValueError, match=r"built for 32x32 images \(a 4x4 patch grid\) got a 6x6 grid; .*image_size=48"):
    _init(tiny, 48)
  dynamic = tiny.clone(dynamic_image_size=True)
  assert _init(dynamic, 48, 64, return_features=True)[0]["grid"].shape == (1, 6, 8, 32)
  with pytest.raises(ValueError, match="positive multiples of patch_stride=8, got 36x36"):
    _init(dynamic, 36)
  # 36 // 8 is the built grid, but the SAME-padded ResNet would give 5x5 tokens: refused, not resized silently
  with pytest.raises(ValueError, match="multiples of patch_stride=8: image_size=32, got 36x36"):
    _init(tiny, 36)
  with pytest.raises(ValueError, match="multiples of patch_stride=8: image_size=36, got 32x32"):
    _init(tiny.clone(image_size=36), 32)


def test_resnet_params_carry_logical_axis_names_and_belong_to_the_embedding_layer(tiny):
  boxed = _init(tiny, 32)[1]["params"]
  unit = boxed["resnet"]["stage_1_block_0"]
  assert unit["conv2"]["kernel"].names == (None, None, "conv_in", "conv_out")
  assert unit["proj_norm"]["scale"].names == ("conv_out",)
  leaves = jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.Partitioned))
  assert all(isinstance(v, nn.Partitioned) for v in leaves)
  ids, n = opt.layer_ids(nn.meta.unbox(boxed), tiny)
  assert n == 4 and ids["resnet/stem_conv/kernel"] == ids["resnet/stage_1_block_0/conv3/kernel"] == 0
  assert ids["patch_embed/kernel"] == 0 and ids["block_1/mlp/fc1/kernel"] == 2 and ids["head/kernel"] == 3
  mask = jax.tree_util.tree_flatten_with_path(opt.weight_decay_mask(nn.meta.unbox(boxed), model=tiny))[0]
  decayed = {"/".join(k.key for k in path) for path, d in mask if d}
  assert "resnet/stage_0_block_0/conv1/kernel" in decayed and "resnet/stage_0_block_0/norm1/scale" not in decayed


def test_fine_tuning_at_another_size_resizes_the_position_embeddings_only():
  ckpt = lvm_jax.load_checkpoint(TIMM_HYBRID)
  with lvm_jax.use_cpu_kernels(False):  # the new model's init is compiled: the plain XLA form compiles faster
    model, variables = lvm_jax.from_pretrained(TIMM_HYBRID, image_size=64, num_classes=3)
  assert (model.image_size, model.grid_size, model.num_classes, model.resnet_depths) == (64, 8, 3, ())
  params, before = variables["params"], ckpt.variables["params"]
  assert params["pos_embed"].shape == (1, 1 + 8 * 8, 48)
  np.testing.assert_array_equal(params["pos_embed"][:, 0], before["pos_embed"][:, 0])  # the class token's
  jax.tree.map(np.testing.assert_array_equal, params["resnet"], before["resnet"])
  np.testing.assert_array_equal(params["patch_embed"]["kernel"], before["patch_embed"]["kernel"])
  logits = jax.eval_shape(lambda: model.apply(variables, jnp.zeros((2, 64, 64, 3))))
  assert logits.shape == (2, 3)


def test_save_pretrained_refuses_a_hybrid_transformers_cannot_hold(tiny, tmp_path):
  variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), nn.meta.unbox(_init(tiny, 32)[1]))
  with pytest.raises(ValueError, match="transformers 5 has no ViT hybrid"):
    lvm_jax.save_pretrained(tiny, variables, tmp_path)
