"""Re-targeting variables to new heads and image sizes (lvm_jax.weights.pretrained.retarget)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lvm_jax.models.resnet import ResNet
from lvm_jax.models.swin import SwinTransformer
from lvm_jax.weights.pretrained import retarget


def _init(model, size):
  return nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, size, size, 3))))


def test_swin_at_384_gets_window_12_and_resized_bias_tables():
  model = SwinTransformer(
    image_size=224, window_size=7, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), num_classes=5
  )
  variables = _init(model, 224)
  block = lambda v: v["params"]["stage_0_block_0"]["attn"]
  target, new = retarget(model, variables, image_size=384)
  assert (target.image_size, target.window_size) == (384, 12)
  assert block(new)["relative_position_bias_table"].shape == (23 * 23, 1)
  np.testing.assert_array_equal(block(new)["query"]["kernel"], block(variables)["query"]["kernel"])
  np.testing.assert_array_equal(new["params"]["head"]["kernel"], variables["params"]["head"]["kernel"])
  assert jax.jit(target.apply)(new, jnp.zeros((1, 384, 384, 3))).shape == (1, 5)


def _torch_bicubic(table, new, antialias):
  """[g*g, heads] table resized on its g x g grid by torch's F.interpolate, in float64."""
  old, heads = int(round(table.shape[0] ** 0.5)), table.shape[1]
  grid = torch.from_numpy(table.T.reshape(1, heads, old, old).astype(np.float64))
  out = torch.nn.functional.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False, antialias=antialias)
  return out[0].numpy().reshape(heads, new * new).T


def _random_bias_tables(window, heads=(1, 2)):
  # window = image_size / 32, as the released Swins: retarget scales the window with the image size
  model = SwinTransformer(image_size=32 * window, window_size=window, embed_dim=16, depths=(1, 1), num_heads=heads)
  variables = _init(model, 32 * window)
  rng = np.random.default_rng(0)
  for stage in range(2):
    attn = variables["params"][f"stage_{stage}_block_0"]["attn"]
    table = attn["relative_position_bias_table"]
    attn["relative_position_bias_table"] = rng.standard_normal(table.shape).astype(np.float32)
  return model, variables


def test_resized_bias_tables_are_per_head_grids_resampled_bicubically():
  # A random table, so that a transposed grid, heads mixed or a linear filter shows (any resize keeps a constant).
  # The same filter as the position embeddings (antialiased bicubic, which is the plain bicubic kernel when
  # upsampling, with a = -0.5 as PIL): checks the layout [(2w-1)^2, heads] is resized per head on its grid.
  model, variables = _random_bias_tables(window=4)
  target, new = retarget(model, variables, image_size=32 * 6)
  assert target.window_size == 6
  for stage in range(2):
    table = variables["params"][f"stage_{stage}_block_0"]["attn"]["relative_position_bias_table"]
    resized = new["params"][f"stage_{stage}_block_0"]["attn"]["relative_position_bias_table"]
    np.testing.assert_allclose(resized, _torch_bicubic(table, 11, antialias=True), atol=1e-5, rtol=0)


@pytest.mark.xfail(
  strict=True,
  raises=AssertionError,
  reason="Microsoft's Swin (load_pretrained) and timm's "
  "resize_rel_pos_bias_table_simple resize bias tables with F.interpolate(mode='bicubic') without "
  "antialias, a cubic kernel with a = -0.75; lvm_jax.weights.transfer.resize_grid uses "
  "jax.image.resize's a = -0.5 (max difference ~0.3 on a unit-variance table)",
)
def test_resized_bias_tables_match_swins_bicubic():
  model, variables = _random_bias_tables(window=4)
  _, new = retarget(model, variables, image_size=32 * 6)
  for stage in range(2):
    table = variables["params"][f"stage_{stage}_block_0"]["attn"]["relative_position_bias_table"]
    resized = new["params"][f"stage_{stage}_block_0"]["attn"]["relative_position_bias_table"]
    np.testing.assert_allclose(resized, _torch_bicubic(table, 11, antialias=False), atol=1e-5, rtol=0)


def test_swin_with_a_custom_window_keeps_it():
  model = SwinTransformer(image_size=32, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2))
  target, _ = retarget(model, _init(model, 32), image_size=64)
  assert target.window_size == 4


def test_resnet_new_head_keeps_body_and_statistics():
  model = ResNet(stage_sizes=(1, 1), block="basic", width=8, num_classes=10)
  variables = _init(model, 32)
  target, new = retarget(model, variables, num_classes=3, seed=1)
  assert new["params"]["head"]["kernel"].shape == (16, 3)
  np.testing.assert_array_equal(new["batch_stats"]["stem_bn"]["mean"], variables["batch_stats"]["stem_bn"]["mean"])
  np.testing.assert_array_equal(new["params"]["stem_conv"]["kernel"], variables["params"]["stem_conv"]["kernel"])
  assert target.apply(new, jnp.zeros((2, 32, 32, 3))).shape == (2, 3)


def test_a_changed_body_is_an_error_naming_the_variable():
  from lvm_jax.weights import transfer

  model = ResNet(stage_sizes=(1, 1), block="basic", width=8, num_classes=10)
  other = model.clone(width=16)
  with pytest.raises(ValueError, match=r"Cannot transfer \S+: checkpoint has shape \(8,\), target model needs \(16,\)"):
    transfer.transfer(jax.tree.map(np.asarray, _init(model, 32)), model, other, jax.random.key(0))
