"""ConvNeXt: every variant's shapes and parameter count, the parameter tree, features, stochastic depth, layer
scale, dtypes, axis names and the parameter groups the optimizer reads."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lvm_jax
from lvm_jax.models import layers
from lvm_jax.models.convnext import ConvNeXt, ConvNeXtBlock
from lvm_jax.train import optimizer as opt
from tests.models.test_registry import PUBLISHED_PARAMS

# Four stages of 8, 4, 2 and 1 positions a side at 32x32 inputs.
SMALL = dict(image_size=32, patch_size=4, depths=(1, 1, 2, 1), dims=(8, 16, 32, 64), num_classes=10)
# The published (timm / transformers, ImageNet-1k head) parameter counts.
COUNTS = {name: count for name, count in PUBLISHED_PARAMS.items() if name.startswith("convnext_")}


def _images(size=32, batch=2, seed=1):
  return jax.random.normal(jax.random.key(seed), (batch, size, size, 3))


def _shapes(model, size=32):
  return nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)))))


def _random_variables(model, size=32, seed=0):
  """Noise of the model's shapes: cheaper than compiling init, and init's numbers would test nothing here."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    scale = path[-1].key == "scale"  # norms around one
    return (scale + 0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, _shapes(model, size))


@pytest.fixture(scope="module")
def small():
  model = ConvNeXt(**SMALL)
  return model, _images(), _random_variables(model)


@functools.cache
def _compiled(model, train, return_features):
  return jax.jit(lambda v, x, rngs: model.apply(v, x, train=train, return_features=return_features, rngs=rngs))


def run(model, variables, x, *, train=False, return_features=False, rngs=None):
  return _compiled(model, train, return_features)(variables, x, rngs)


def test_the_four_sizes_of_the_paper_are_registered():
  assert (
    lvm_jax.list_models("convnext_*")
    == sorted(COUNTS)
    == [
      "convnext_base",
      "convnext_large",
      "convnext_small",
      "convnext_tiny",
    ]
  )


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_every_variant_has_the_published_parameter_count_and_feature_shapes(name):
  model = lvm_jax.create_model(name)
  dims = model.dims
  x = jnp.zeros((2, 224, 224, 3))
  logits, variables = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x))
  assert logits.shape == (2, 1000)
  assert sum(v.size for v in jax.tree.leaves(nn.meta.unbox(variables))) == COUNTS[name]
  features = jax.eval_shape(lambda v: model.apply(v, x, return_features=True), variables)
  assert {k: v.shape for k, v in features.items()} == {
    "stride_4": (2, 56, 56, dims[0]),
    "stride_8": (2, 28, 28, dims[1]),
    "stride_16": (2, 14, 14, dims[2]),
    "stride_32": (2, 7, 7, dims[3]),
    "pooled": (2, dims[3]),
  }
  assert model.feature_channels() == {k: v.shape[-1] for k, v in features.items() if k != "pooled"}


def test_variants_follow_the_paper():
  assert lvm_jax.create_model("convnext_tiny").depths == (3, 3, 9, 3)
  assert lvm_jax.create_model("convnext_small").depths == (3, 3, 27, 3)
  assert lvm_jax.create_model("convnext_base").dims == (128, 256, 512, 1024)
  large = lvm_jax.create_model("convnext_large")
  assert (large.dims, large.layer_scale_init, large.image_size) == ((192, 384, 768, 1536), 1e-6, 224)


def test_small_forward_and_parameter_tree(small):
  model, x, variables = small
  params = variables["params"]
  assert set(variables) == {"params"}  # LayerNorm only: no batch statistics
  assert sorted(params) == [
    "downsample_1",
    "downsample_2",
    "downsample_3",
    "head",
    "norm",
    "stage_0_block_0",
    "stage_1_block_0",
    "stage_2_block_0",
    "stage_2_block_1",
    "stage_3_block_0",
    "stem",
    "stem_norm",
  ]
  block = params["stage_2_block_1"]
  assert sorted(block) == ["dwconv", "layer_scale", "norm", "pwconv1", "pwconv2"]
  assert block["dwconv"]["kernel"].shape == (7, 7, 1, 32)  # depthwise: one input channel per group
  assert block["pwconv1"]["kernel"].shape == (32, 128) and block["pwconv2"]["kernel"].shape == (128, 32)
  assert block["layer_scale"].shape == (32,)
  assert params["stem"]["kernel"].shape == (4, 4, 3, 8)
  assert params["downsample_1"]["conv"]["kernel"].shape == (2, 2, 8, 16)
  assert params["downsample_1"]["norm"]["scale"].shape == (8,)  # normalizes the previous stage's width
  # each block: 49C + C depthwise, 2C norm, C*4C + 4C and 4C*C + C MLP, C layer scale
  blocks = lambda c: 8 * c * c + 58 * c
  downsample = lambda c: 2 * c + 4 * c * 2 * c + 2 * c
  expected = 48 * 8 + 8 + 16 + blocks(8) + blocks(16) + 2 * blocks(32) + blocks(64)
  expected += downsample(8) + downsample(16) + downsample(32) + 2 * 64 + 64 * 10 + 10
  assert sum(p.size for p in jax.tree.leaves(params)) == expected
  logits = run(model, variables, x)
  assert logits.shape == (2, 10) and np.isfinite(logits).all()
  assert not np.allclose(logits[0], logits[1])


def test_features_are_stage_outputs_and_pooled_the_normalized_mean_the_head_sees(small):
  model, x, variables = small
  features = run(model, variables, x, return_features=True)
  assert {k: v.shape for k, v in features.items()} == {
    "stride_4": (2, 8, 8, 8),
    "stride_8": (2, 4, 4, 16),
    "stride_16": (2, 2, 2, 32),
    "stride_32": (2, 1, 1, 64),
    "pooled": (2, 64),
  }
  params = variables["params"]
  # the final norm follows the pooling (unlike Swin), with its own epsilon
  norm = nn.LayerNorm(epsilon=1e-6).apply({"params": params["norm"]}, features["stride_32"].mean(axis=(1, 2)))
  np.testing.assert_allclose(features["pooled"], norm, atol=1e-5)
  head = params["head"]
  np.testing.assert_allclose(run(model, variables, x), features["pooled"] @ head["kernel"] + head["bias"], atol=1e-5)
  headless = model.clone(num_classes=0)
  assert "head" not in _shapes(headless)["params"]
  body = {"params": {k: v for k, v in params.items() if k != "head"}}
  assert jax.eval_shape(lambda: headless.apply(body, x)).shape == (2, 64)


def test_stochastic_depth_grows_linearly_and_acts_only_in_training(small):
  base, x, variables = small
  model = base.clone(drop_path=0.4)
  rates = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, layers.DropPath):
      rates.append(context.module.rate)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):  # active while jit traces
    eval_out = jax.jit(model.apply)(variables, x)
  np.testing.assert_allclose(rates, [0.0, 0.1, 0.2, 0.3, 0.4], atol=1e-12)  # five blocks over all stages
  np.testing.assert_allclose(eval_out, run(base, variables, x), atol=1e-6)
  train = lambda seed: run(model, variables, x, train=True, rngs={"dropout": jax.random.key(seed)})
  assert not np.allclose(train(0), eval_out)
  assert not np.allclose(train(0), train(1))
  np.testing.assert_array_equal(train(3), train(3))


def test_init_sets_layer_scale_and_layer_scale_zero_leaves_it_out():
  # One block: compiling the whole model's initialisers takes seconds on CPU.
  block = ConvNeXtBlock(0.25, 0.0, 1e-6, jnp.float32, jnp.float32)
  init = jax.jit(lambda key: block.init(key, jnp.zeros((1, 4, 4, 8)), train=False))
  params = nn.meta.unbox(init(jax.random.key(0)))["params"]
  np.testing.assert_array_equal(params["layer_scale"], np.full(8, 0.25, np.float32))
  assert not np.any(params["pwconv1"]["bias"]) and np.std(params["pwconv1"]["kernel"]) > 0.01
  plain = _shapes(ConvNeXt(**{**SMALL, "layer_scale_init": 0.0}))["params"]
  assert "layer_scale" not in plain["stage_0_block_0"]


def test_bf16_compute_keeps_float32_params_and_tracks_float32(small):
  model, x, variables = small
  bf16 = model.clone(dtype=jnp.bfloat16)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(_shapes(bf16)))
  out16, out32 = run(bf16, variables, x), run(model, variables, x)
  assert out16.dtype == jnp.bfloat16
  error = np.abs(np.asarray(out16, np.float32) - out32).max()
  assert 0 < error < 0.05 * np.abs(out32).max() + 0.02


def test_params_carry_logical_axis_names():
  boxed = jax.eval_shape(lambda: ConvNeXt(**SMALL).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))["params"]
  block = boxed["stage_1_block_0"]
  assert block["dwconv"]["kernel"].names == (None, None, None, "embed")
  assert block["pwconv1"]["kernel"].names == ("embed", "mlp") and block["pwconv1"]["bias"].names == ("mlp",)
  assert block["pwconv2"]["kernel"].names == ("mlp", "embed")
  assert block["layer_scale"].names == ("embed",) and block["norm"]["scale"].names == ("embed",)
  assert boxed["stem"]["kernel"].names == (None, None, None, "embed")
  assert boxed["downsample_1"]["conv"]["kernel"].names == (None, None, "conv_in", "conv_out")
  assert boxed["head"]["kernel"].names == ("embed", "classes")
  leaves = jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.Partitioned))
  assert all(isinstance(v, nn.Partitioned) for v in leaves)  # every parameter has names


def test_layer_ids_and_weight_decay_mask():
  model = ConvNeXt(**SMALL)
  params = _shapes(model)["params"]
  ids, n = opt.layer_ids(params, model)
  assert n == 5 + 2
  assert ids["stem/kernel"] == ids["stem_norm/scale"] == 0
  blocks = ["stage_0_block_0", "stage_1_block_0", "stage_2_block_0", "stage_2_block_1", "stage_3_block_0"]
  assert [ids[f"{b}/dwconv/kernel"] for b in blocks] == [1, 2, 3, 4, 5]
  # a downsampling layer shares the id of the last block before it
  assert (ids["downsample_1/conv/kernel"], ids["downsample_2/norm/bias"], ids["downsample_3/conv/bias"]) == (1, 2, 4)
  assert ids["norm/scale"] == ids["head/kernel"] == 6
  assert model.layer_id("stage_4_block_0/dwconv/kernel") is None and model.layer_id("downsample_0/conv") is None
  mask = jax.tree_util.tree_flatten_with_path(opt.weight_decay_mask(params, model=model))[0]
  decayed = {"/".join(k.key for k in path) for path, d in mask if d}
  assert decayed == {p for p in ids if p.endswith("kernel")}  # no biases, norm scales or layer scales


def test_depths_and_dims_of_different_length_is_a_clear_error():
  with pytest.raises(ValueError, match=r"depths=\(1, 1, 2, 1\) and dims=\(8, 16\) must have one entry per stage"):
    _shapes(ConvNeXt(**{**SMALL, "dims": (8, 16)}))
