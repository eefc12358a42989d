"""Re-targeting variables to new heads and image sizes (lvm_jax.weights.pretrained.retarget)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvm_jax.models.resnet import ResNet
from lvm_jax.models.swin import SwinTransformer
from lvm_jax.weights.pretrained import retarget


def _init(model, size):
  return nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, size, size, 3))))


def test_swin_at_384_gets_window_12_and_resized_bias_tables():
  model = SwinTransformer(image_size=224, window_size=7, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2),
                          num_classes=5)
  variables = _init(model, 224)
  block = lambda v: v["params"]["stage_0_block_0"]["attn"]
  table = np.asarray(block(variables)["relative_position_bias_table"]).copy()
  table[:] = 0.5  # a constant table must stay constant through the bicubic resize
  block(variables)["relative_position_bias_table"] = table
  target, new = retarget(model, variables, image_size=384)
  assert (target.image_size, target.window_size) == (384, 12)
  resized = block(new)["relative_position_bias_table"]
  assert resized.shape == (23 * 23, 1)
  np.testing.assert_allclose(resized, 0.5, atol=1e-6)
  np.testing.assert_array_equal(block(new)["query"]["kernel"], block(variables)["query"]["kernel"])
  np.testing.assert_array_equal(new["params"]["head"]["kernel"], variables["params"]["head"]["kernel"])
  assert target.apply(new, jnp.zeros((1, 384, 384, 3))).shape == (1, 5)


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
