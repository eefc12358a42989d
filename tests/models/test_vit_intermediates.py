"""ViT block outputs (return_blocks, as timm's forward_intermediates) and inputs of any size (dynamic_image_size),
against timm's own intermediates (fixtures made by tests/fixtures/timm/make_timm_fixtures.py)."""

import functools
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lvm_jax
from lvm_jax.models.vit import VisionTransformer
from lvm_jax.weights import transfer

FIXTURES = pathlib.Path(__file__).parent.parent / "fixtures" / "timm"
TINY = dict(num_classes=0, image_size=32, patch_size=8, width=32, depth=3, mlp_dim=64, num_heads=4)


def jitted(model):
  """model.apply compiled once per call signature: on CPU, op-by-op dispatch compiles every op and is slower."""
  return jax.jit(model.apply, static_argnames=("return_blocks", "normalize_blocks", "return_features"))


def initialized(model, x, **kwargs):
  return nn.meta.unbox(jax.jit(lambda x: model.init(jax.random.key(0), x, **kwargs))(x))


@functools.lru_cache(maxsize=None)
def pretrained(name, **overrides):
  return lvm_jax.from_pretrained(FIXTURES / name, **overrides)


def reference(name):
  with np.load(FIXTURES / name / "reference.npz") as data:
    return {k: data[k] for k in data.files}


@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("name", ["vit_token", "vit_gap"])
def test_blocks_match_timm_forward_intermediates(name, scan_layers):
  model, variables = pretrained(name, scan_layers=scan_layers)
  ref = reference(name)
  first, last = jitted(model)(variables, ref["input"], return_blocks=(0, 1))
  assert first.shape == last.shape == (2, 4, 4, 48)
  np.testing.assert_allclose(first, ref["features_0"], atol=1e-4, rtol=0)
  np.testing.assert_allclose(last, ref["features_1"], atol=1e-4, rtol=0)
  # Negative indices count from the end, and the order asked is the order returned.
  (only_last, only_first) = jitted(model)(variables, ref["input"], return_blocks=(-1, -2))
  np.testing.assert_allclose(only_last, ref["features_1"], atol=1e-4, rtol=0)
  np.testing.assert_allclose(only_first, ref["features_0"], atol=1e-4, rtol=0)


def test_normalized_last_block_is_the_feature_grid():
  model, variables = pretrained("vit_token")
  ref = reference("vit_token")
  (normalized,) = jitted(model)(variables, ref["input"], return_blocks=(-1,), normalize_blocks=True)
  grid = jitted(model)(variables, ref["input"], return_features=True)["grid"]
  np.testing.assert_allclose(normalized, grid, atol=1e-6, rtol=0)
  (raw,) = jitted(model)(variables, ref["input"], return_blocks=(-1,))
  assert np.abs(np.asarray(raw) - np.asarray(grid)).max() > 0.1  # the norm really applied, and only when asked


def test_blocks_match_the_scanned_model_and_later_blocks_do_not_run_or_exist():
  model = VisionTransformer(**TINY)
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  variables = initialized(model, x)
  scanned = {"params": lvm_jax.models.vit.stack_blocks(variables["params"])}
  per_layer = jitted(model)(variables, x, return_blocks=(1, 2, 1))
  stacked = jitted(model.clone(scan_layers=True))(scanned, x, return_blocks=(1, 2, 1))
  assert not np.allclose(per_layer[0], per_layer[1])  # different blocks, different grids
  for a, b in zip(per_layer, stacked):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(per_layer[0], per_layer[2])
  # Without scan, a model asked for block 1 stops there: its init has no later block, final norm or head.
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, return_blocks=(1,)), x)["params"]
  assert sorted(shapes) == ["block_0", "block_1", "cls_token", "patch_embed", "pos_embed"]
  (early,) = jitted(model)({"params": {k: variables["params"][k] for k in shapes}}, x, return_blocks=(1,))
  np.testing.assert_array_equal(early, per_layer[0])


@pytest.mark.parametrize(
  "kwargs,message",
  [
    (dict(return_blocks=(3,)), r"return_blocks=\(3,\): need one or more block indices in \[-3, 2\]"),
    (dict(return_blocks=(-4,)), r"in \[-3, 2\]"),
    (dict(return_blocks=()), "need one or more block indices"),
    (dict(return_blocks=(0,), return_features=True), "return_features or return_blocks, not both"),
  ],
)
def test_bad_block_requests_are_clear_errors(kwargs, message):
  model = VisionTransformer(**TINY)
  with pytest.raises(ValueError, match=message):
    model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), **kwargs)


def test_normalizing_blocks_of_an_fc_norm_model_is_a_clear_error():
  model = VisionTransformer(**{**TINY, "pooling": "gap", "class_token": False, "fc_norm": True})
  with pytest.raises(ValueError, match="fc_norm=True .* no per-token final norm"):
    model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), return_blocks=(0,), normalize_blocks=True)


def test_dynamic_image_size_resizes_position_embeddings_as_from_pretrained_does():
  model, variables = pretrained("vit_token", num_classes=0)
  x = jax.random.normal(jax.random.key(3), (1, 48, 48, 3))
  dynamic = model.clone(dynamic_image_size=True)
  # What from_pretrained(..., image_size=48) does: the table resized once, at load, for a static 48 px model.
  params = dict(variables["params"])
  params["pos_embed"] = transfer.resize_pos_embed(np.asarray(params["pos_embed"]), (1, 37, 48), num_prefix=1)
  static_48 = jitted(model.clone(image_size=48))({"params": params}, x)
  np.testing.assert_allclose(jitted(dynamic)(variables, x), static_48, atol=1e-5, rtol=0)


def test_dynamic_image_size_takes_non_square_inputs():
  model = VisionTransformer(**TINY, dynamic_image_size=True)
  x = jax.random.normal(jax.random.key(1), (2, 24, 40, 3))
  init = lambda x: model.init_with_output(jax.random.key(0), x, return_blocks=(0, -1))
  grids, variables = jax.jit(init)(x)
  assert nn.meta.unbox(variables)["params"]["pos_embed"].shape == (1, 17, 32)  # the table for image_size
  assert [g.shape for g in grids] == [(2, 3, 5, 32)] * 2
  assert np.isfinite(np.asarray(grids[1])).all() and not np.allclose(grids[0], grids[1])
  features, _ = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x, return_features=True), x)
  assert features["grid"].shape == (2, 3, 5, 32)
  with pytest.raises(ValueError, match="positive multiples of patch_size=8, got 24x36"):
    jax.eval_shape(lambda v, x: model.apply(v, x), variables, x[:, :, :36])
