"""Swin: shapes of every variant, windows and masks, features, stochastic depth, dtypes, axis names."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lvm_jax
from lvm_jax.models import layers
from lvm_jax.models.swin import SwinTransformer, relative_position_index, shifted_window_mask

# Two stages with real shifted windows: 8x8 then 4x4 tokens, window 4.
SMALL = dict(image_size=32, patch_size=4, window_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4), num_classes=10)
# Four stages (16, 8, 4, 2 tokens a side) to see all the feature strides.
FOUR_STAGES = dict(
  image_size=64, patch_size=4, window_size=2, embed_dim=16, depths=(1, 2, 2, 1), num_heads=(1, 2, 2, 4), num_classes=10
)


def _images(size=32, batch=2, width=None, seed=1):
  return jax.random.normal(jax.random.key(seed), (batch, size, width or size, 3))


def _random_variables(model, size=32, seed=0):
  """Variables of the model's shapes filled with noise: far cheaper than compiling init (XLA on CPU takes
  tens of ms per initialiser), and init's own numbers would not test anything here."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    scale = path[-1].key == "scale"  # norms around one
    return (scale + 0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, _shapes(model, size))


def _shapes(model, size):
  return nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)))))


@pytest.fixture(scope="module")
def small():
  model = SwinTransformer(**SMALL)
  return model, _images(), _random_variables(model)


@functools.cache
def _compiled(model, train, return_features):
  return jax.jit(lambda v, x, rngs: model.apply(v, x, train=train, return_features=return_features, rngs=rngs))


def run(model, variables, x, *, train=False, return_features=False, rngs=None):
  """model.apply, compiled once per model and mode (eager dispatch of every op is slower on CPU)."""
  return _compiled(model, train, return_features)(variables, x, rngs)


@pytest.mark.parametrize("name", lvm_jax.list_models("swin_*"))
def test_every_variant_gives_logits_and_features_of_the_right_shape(name):
  model = lvm_jax.create_model(name, num_classes=7)
  size, width = model.image_size, model.embed_dim
  x = jnp.zeros((2, size, size, 3))
  logits, variables = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x))
  assert logits.shape == (2, 7)
  features = jax.eval_shape(lambda v: model.apply(v, x, return_features=True), variables)
  assert {k: v.shape for k, v in features.items()} == {
    "stride_4": (2, size // 4, size // 4, width),
    "stride_8": (2, size // 8, size // 8, 2 * width),
    "stride_16": (2, size // 16, size // 16, 4 * width),
    "stride_32": (2, size // 32, size // 32, 8 * width),
    "pooled": (2, 8 * width),
  }
  table = variables["params"]["stage_3_block_1"]["attn"]["relative_position_bias_table"]
  assert table.value.shape == ((2 * model.window_size - 1) ** 2, model.num_heads[3])


def test_variants_follow_the_paper():
  assert lvm_jax.create_model("swin_t").depths == (2, 2, 6, 2)
  assert lvm_jax.create_model("swin_b").embed_dim == 128
  assert lvm_jax.create_model("swin_l").num_heads == (6, 12, 24, 48)
  big = lvm_jax.create_model("swin_l_384")
  assert (big.image_size, big.window_size, big.embed_dim) == (384, 12, 192)


def test_small_forward_and_parameter_tree(small):
  model, x, variables = small
  assert set(variables) == {"params"}
  params = variables["params"]
  assert sorted(params) == [
    "head",
    "merge_0",
    "norm",
    "patch_embed",
    "patch_norm",
    "stage_0_block_0",
    "stage_0_block_1",
    "stage_1_block_0",
    "stage_1_block_1",
  ]
  attn = params["stage_1_block_1"]["attn"]
  assert sorted(attn) == ["key", "out", "query", "relative_position_bias_table", "value"]
  assert attn["relative_position_bias_table"].shape == (49, 4)
  assert attn["query"]["kernel"].shape == (64, 4, 16)
  assert params["merge_0"]["reduction"]["kernel"].shape == (128, 64) and "bias" not in params["merge_0"]["reduction"]
  assert params["merge_0"]["norm"]["scale"].shape == (128,)
  assert params["stage_0_block_0"]["mlp"]["fc1"]["kernel"].shape == (32, 128)
  count = sum(p.size for p in jax.tree.leaves(params))
  # patch embed 48*32+32, patch norm 64; 2 blocks of width 32 (4*(32*32+32) attention, 49*2 table, 2 norms,
  # MLP 32*128+128+128*32+32); merge 2*128 + 128*64; 2 blocks of width 64 (table 49*4); final norm; head
  block = lambda c, h: 4 * (c * c + c) + 49 * h + 4 * c + (c * 4 * c + 4 * c) + (4 * c * c + c)
  assert count == 48 * 32 + 32 + 64 + 2 * block(32, 2) + 2 * 128 + 128 * 64 + 2 * block(64, 4) + 128 + 64 * 10 + 10
  logits = run(model, variables, x)
  assert logits.shape == (2, 10) and np.isfinite(logits).all()
  assert not np.allclose(logits[0], logits[1])


def test_features_are_stage_outputs_and_pooled_their_normalized_mean():
  model = SwinTransformer(**FOUR_STAGES)
  x, variables = _images(64), _random_variables(model, 64)
  features = run(model, variables, x, return_features=True)
  assert {k: v.shape for k, v in features.items()} == {
    "stride_4": (2, 16, 16, 16),
    "stride_8": (2, 8, 8, 32),
    "stride_16": (2, 4, 4, 64),
    "stride_32": (2, 2, 2, 128),
    "pooled": (2, 128),
  }
  params = variables["params"]
  norm = nn.LayerNorm(epsilon=1e-5).apply({"params": params["norm"]}, features["stride_32"])
  np.testing.assert_allclose(features["pooled"], norm.mean(axis=(1, 2)), atol=1e-5)


def test_num_classes_zero_returns_the_features_the_head_sees(small):
  model, x, variables = small
  headless = model.clone(num_classes=0)
  assert "head" not in _shapes(headless, 32)["params"]
  pooled = run(headless, {"params": {k: v for k, v in variables["params"].items() if k != "head"}}, x)
  assert pooled.shape == (2, 64)
  head = variables["params"]["head"]  # the head sees exactly the pooled features
  np.testing.assert_allclose(run(model, variables, x), pooled @ head["kernel"] + head["bias"], atol=1e-5)


def test_relative_position_index_covers_every_offset_once():
  index = relative_position_index(3, 3)
  assert index.shape == (9, 9)
  assert sorted(set(index.ravel())) == list(range(25))
  assert (np.diag(index) == 12).all()  # zero offset is the middle of the 5x5 table
  # token 0 (top-left) seeing token 8 (bottom-right): offset (-2, -2), the first table entry
  assert index[0, 8] == 0 and index[8, 0] == 24
  # a window shrunk to 2 reads the central 3x3 offsets of a window-3 table
  assert sorted(set(relative_position_index(2, 3).ravel())) == [6, 7, 8, 11, 12, 13, 16, 17, 18]


def test_shifted_window_mask_separates_regions():
  mask = shifted_window_mask(4, 4, window=2, shift=1)
  assert mask.shape == (4, 4, 4)
  assert set(np.unique(mask)) == {0.0, -100.0}
  assert not mask[0].any()  # the top-left window holds one region
  # the bottom-right window holds four regions of one token each: every token sees itself only
  np.testing.assert_array_equal(mask[3], np.where(np.eye(4, dtype=bool), 0.0, -100.0))
  # top-right window: columns 2 and 3 are different regions, rows 0 and 1 the same
  np.testing.assert_array_equal(mask[1] == 0, np.array([[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]], bool))


def test_odd_blocks_shift_their_windows(small):
  # The same weights with every block unshifted give other logits: the shift is really applied
  # (HF parity checks that it is applied right).
  model, x, variables = small
  logits = run(model, variables, x)
  with nn.intercept_methods(_no_shift):  # active while jit traces
    unshifted = jax.jit(model.apply)(variables, x)
  assert np.abs(logits - unshifted).max() > 1e-3


def _no_shift(next_fun, args, kwargs, context):
  if type(context.module).__name__ == "SwinBlock" and context.method_name == "__call__" and context.module.shift:
    clone = context.module.clone(shift=False, parent=None)
    return clone.apply({"params": context.module.variables["params"]}, *args, **kwargs)
  return next_fun(*args, **kwargs)


def test_small_stage_shrinks_the_window_and_reads_the_middle_of_the_table(small):
  # 8x8 inputs: stages of 2x2 and 1x1 tokens, both smaller than the window of 4, so each is one unshifted
  # window of its own size. Built with window 2 and the central 3x3 of every 7x7 table, the network is
  # the same.
  model, _, variables = small
  x = _images(8)
  params = jax.tree.map(np.asarray, variables["params"])
  for name in params:
    if "block" in name:
      table = params[name]["attn"]["relative_position_bias_table"]
      params[name]["attn"]["relative_position_bias_table"] = table.reshape(7, 7, -1)[2:5, 2:5].reshape(9, -1)
  small_window = model.clone(window_size=2)
  np.testing.assert_allclose(run(model, variables, x), run(small_window, {"params": params}, x), atol=1e-5)
  # and the table really matters there: another central crop gives other logits
  params["stage_0_block_0"]["attn"]["relative_position_bias_table"] += 1.0 * np.arange(9)[:, None]
  assert np.abs(run(model, variables, x) - run(small_window, {"params": params}, x)).max() > 1e-3


def test_inputs_not_a_multiple_of_patch_or_window_are_padded(small):
  model, _, variables = small
  x = jax.random.normal(jax.random.key(3), (2, 34, 42, 3))  # 9x11 patches (padded), windows padded to 12x12
  features = run(model, variables, x, return_features=True)
  assert features["stride_4"].shape == (2, 9, 11, 32) and features["stride_8"].shape == (2, 5, 6, 64)
  assert np.isfinite(features["pooled"]).all()


def test_stochastic_depth_grows_linearly_and_acts_only_in_training(small):
  base, x, variables = small
  model = base.clone(drop_path=0.3)
  rates = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, layers.DropPath):
      rates.append(context.module.rate)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):  # active while jit traces
    eval_a = jax.jit(model.apply)(variables, x)
  # four blocks, two residual branches each: 0, 0.1, 0.2, 0.3
  np.testing.assert_allclose(rates, np.repeat([0.0, 0.1, 0.2, 0.3], 2), atol=1e-12)
  np.testing.assert_allclose(eval_a, run(base, variables, x), atol=1e-6)
  train = lambda seed: run(model, variables, x, train=True, rngs={"dropout": jax.random.key(seed)})
  assert not np.allclose(train(0), eval_a)
  assert not np.allclose(train(0), train(1))
  np.testing.assert_array_equal(train(3), train(3))


def test_bf16_compute_keeps_float32_params_and_tracks_float32(small):
  model, x, variables = small
  bf16 = model.clone(dtype=jnp.bfloat16)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(_shapes(bf16, 32)))
  out16, out32 = run(bf16, variables, x), run(model, variables, x)
  assert out16.dtype == jnp.bfloat16
  error = np.abs(np.asarray(out16, np.float32) - out32).max()
  assert 0 < error  # the bf16 path really ran: it rounds apart from float32
  np.testing.assert_allclose(np.asarray(out16, np.float32), out32, atol=0.05 * np.abs(out32).max() + 0.02)
  feats = jax.eval_shape(lambda v: bf16.apply(v, x, return_features=True), variables)
  assert feats["stride_8"].dtype == jnp.bfloat16


def test_qkv_bias_false_keeps_the_output_projection_bias():
  model = SwinTransformer(**SMALL, qkv_bias=False)
  x, variables = _images(), _random_variables(SwinTransformer(**SMALL, qkv_bias=False))
  attn = variables["params"]["stage_0_block_0"]["attn"]
  assert "bias" not in attn["query"] and "bias" not in attn["key"] and "bias" not in attn["value"]
  assert attn["out"]["bias"].shape == (32,)
  assert np.isfinite(run(model, variables, x)).all()


def test_params_carry_logical_axis_names():
  model = SwinTransformer(**SMALL)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))["params"]
  attn = boxed["stage_0_block_0"]["attn"]
  assert attn["query"]["kernel"].names == ("embed", "heads", "kv")
  assert attn["out"]["kernel"].names == ("heads", "kv", "embed")
  assert attn["relative_position_bias_table"].names == (None, "heads")
  assert boxed["merge_0"]["reduction"]["kernel"].names == ("mlp", "embed")
  assert boxed["patch_embed"]["kernel"].names == (None, None, None, "embed")
  assert boxed["head"]["kernel"].names == ("embed", "classes")
  unboxed = jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.Partitioned))
  assert all(isinstance(v, nn.Partitioned) for v in unboxed)  # every parameter has names


def test_depths_and_heads_of_different_length_is_a_clear_error():
  with pytest.raises(ValueError, match=r"depths=\(2, 2\) and num_heads=\(2,\) must have one entry per stage"):
    _shapes(SwinTransformer(**{**SMALL, "num_heads": (2,)}), 32)


def test_stochastic_depth_grows_linearly_over_all_blocks_as_in_the_reference_code():
  import torch
  from lvm_jax.models import layers

  # Swin's and timm's code: [x.item() for x in torch.linspace(0, drop_path_rate, sum(depths))].
  np.testing.assert_allclose(layers.drop_path_rates(0.2, 12), torch.linspace(0, 0.2, 12).numpy(), atol=1e-7)
  assert layers.drop_path_rates(0.1, 1) == [0.0]
