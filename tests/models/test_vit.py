"""ViT: variant decoding, shapes, pooling modes, features, dtypes and training-only randomness."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lvm_jax
from lvm_jax.models.vit import VisionTransformer, vit_args

SMALL = dict(image_size=32, patch_size=8, width=48, depth=2, mlp_dim=96, num_heads=3, num_classes=10)


def _init(model, size=32, batch=2):
  x = jax.random.normal(jax.random.key(1), (batch, size, size, 3))
  # init returns parameters boxed with their logical axis names; unbox for plain arrays
  return x, nn.meta.unbox(model.init({"params": jax.random.key(0), "dropout": jax.random.key(2)}, x))


def _with_random_head(variables):
  """The variables with a non-zero head: a fresh ViT head is zero, and its logits would compare 0 with 0."""
  head = variables["params"]["head"]
  kernel = jax.random.normal(jax.random.key(3), head["kernel"].shape)
  bias = jax.random.normal(jax.random.key(4), head["bias"].shape)
  return {**variables, "params": {**variables["params"], "head": {"kernel": kernel, "bias": bias}}}


def test_variant_string_decodes_to_paper_sizes():
  assert vit_args("B/16") == dict(patch_size=16, width=768, depth=12, mlp_dim=3072, num_heads=12)
  assert vit_args("L/32") == dict(patch_size=32, width=1024, depth=24, mlp_dim=4096, num_heads=16)
  with pytest.raises(ValueError, match="Unknown ViT variant 'X/16'"):
    vit_args("X/16")


@pytest.mark.parametrize("name", lvm_jax.list_models("vit_*"))
def test_every_variant_gives_logits_of_the_right_shape(name):
  model = lvm_jax.create_model(name, num_classes=7)
  out = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), jnp.zeros((2, 224, 224, 3)))[0])
  assert out.shape == (2, 7)


@pytest.mark.parametrize(
  "pooling,class_token,fc_norm",
  [("token", True, False), ("gap", False, False), ("gap", True, True), ("gap", False, True)],
)
def test_pooling_modes(pooling, class_token, fc_norm):
  model = VisionTransformer(**SMALL, pooling=pooling, class_token=class_token, fc_norm=fc_norm)
  x, variables = _init(model)
  variables = _with_random_head(variables)
  params = variables["params"]
  assert ("cls_token" in params) == class_token
  assert params["pos_embed"].shape == (1, 16 + class_token, 48)
  assert ("fc_norm" in params) == fc_norm and ("norm" in params) != fc_norm
  logits = model.apply(variables, x)
  assert logits.shape == (2, 10) and np.isfinite(logits).all()
  feats = model.apply(variables, x, return_features=True)
  assert feats["grid"].shape == (2, 4, 4, 48) and feats["pooled"].shape == (2, 48)
  if pooling == "gap" and not fc_norm:
    np.testing.assert_allclose(feats["pooled"], feats["grid"].mean(axis=(1, 2)), atol=1e-5)
  # the head sees exactly the pooled features
  head = params["head"]
  assert np.abs(logits).max() > 0.1
  np.testing.assert_allclose(logits, feats["pooled"] @ head["kernel"] + head["bias"], rtol=1e-5, atol=1e-5)


def test_no_embed_class_and_pre_logits():
  model = VisionTransformer(**SMALL, no_embed_class=True, representation_size=24)
  x, variables = _init(model)
  assert variables["params"]["pos_embed"].shape == (1, 16, 48)
  assert variables["params"]["pre_logits"]["kernel"].shape == (48, 24)
  pooled = model.apply(variables, x, return_features=True)["pooled"]
  assert pooled.shape == (2, 24) and np.abs(pooled).max() <= 1.0  # tanh


def test_num_classes_zero_returns_pooled_features():
  model = VisionTransformer(**{**SMALL, "num_classes": 0})
  x, variables = _init(model)
  assert "head" not in variables["params"]
  assert model.apply(variables, x).shape == (2, 48)


def test_wrong_image_size_is_a_clear_error():
  model = VisionTransformer(**SMALL)
  _, variables = _init(model)
  with pytest.raises(ValueError, match=r"built for 32x32 images .* got a 6x6 grid; build it with image_size=48"):
    model.apply(variables, jnp.zeros((1, 48, 48, 3)))


def test_pooling_typo_is_a_clear_error():
  with pytest.raises(ValueError, match="pooling must be 'token' or 'gap', got 'mean'"):
    _init(VisionTransformer(**SMALL, pooling="mean"))


def test_dropout_and_drop_path_act_only_in_training():
  # no head (it starts at zero, which would hide any difference): compare the pooled features
  model = VisionTransformer(**{**SMALL, "num_classes": 0}, dropout=0.1, drop_path=0.2)
  x, variables = _init(model)
  eval_a, eval_b = model.apply(variables, x), model.apply(variables, x)
  np.testing.assert_array_equal(eval_a, eval_b)
  train = lambda seed: model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(seed)})
  assert not np.allclose(train(0), eval_a)
  assert not np.allclose(train(0), train(1))
  np.testing.assert_array_equal(train(3), train(3))


def test_bf16_compute_keeps_float32_params_and_tracks_float32():
  model = VisionTransformer(**SMALL)
  x, variables = _init(model)
  variables = _with_random_head(variables)
  bf16 = model.clone(dtype=jnp.bfloat16)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(bf16.init(jax.random.key(0), x)))
  out16, out32 = bf16.apply(variables, x), model.apply(variables, x)
  assert out16.dtype == jnp.bfloat16
  error = np.abs(np.asarray(out16, np.float32) - out32).max()
  assert np.abs(out32).max() > 0.1 and 0 < error < 0.05 * np.abs(out32).max()  # bf16 really computed, and close


def test_params_carry_logical_axis_names():
  model = VisionTransformer(**SMALL)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  q = boxed["params"]["block_0"]["attn"]["query"]["kernel"]
  assert q.names == ("embed", "heads", "kv")
  assert boxed["params"]["block_0"]["mlp"]["fc1"]["kernel"].names == ("embed", "mlp")
  assert boxed["params"]["block_0"]["attn"]["out"]["kernel"].names == ("heads", "kv", "embed")
