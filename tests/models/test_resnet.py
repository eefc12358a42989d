"""ResNet: variant sizes, shapes, feature maps, BatchNorm statistics, dtypes, init and stochastic depth."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lvm_jax
from lvm_jax import kernels
from lvm_jax.models.resnet import VARIANTS, Conv, ResNet

# Exact variable counts at 1000 classes: params (the published counts of torchvision / timm) and the BatchNorm
# running statistics (2 per BN channel) in batch_stats.
COUNTS = {
  "resnet18": (11_689_512, 9_600),
  "resnet34": (21_797_672, 17_024),
  "resnet50": (25_557_032, 53_120),
  "resnet101": (44_549_160, 105_344),
  "resnet152": (60_192_808, 151_424),
}
BASIC = dict(stage_sizes=(1, 1, 1, 1), block="basic", width=8, num_classes=10)
BOTTLENECK = dict(stage_sizes=(1, 2, 1, 1), block="bottleneck", width=8, stage_widths=(4, 8, 8, 16), num_classes=10)


# Compiling random initialisers is the slow part on CPU (about a quarter second per tensor), so each small
# config is initialised once per module and tests that need other values edit the variables instead.
def _features(model, variables, x):
  return jax.jit(lambda v, x: model.apply(v, x, return_features=True))(variables, x)


def _init(model, size):
  x = jax.random.normal(jax.random.key(1), (2, size, size, 3))
  return x, nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), x))  # eager init runs op by op: seconds


@pytest.fixture(scope="module")
def basic():
  return _init(ResNet(**BASIC), 32)


@pytest.fixture(scope="module")
def bottleneck():
  return _init(ResNet(**BOTTLENECK), 64)


def _active(variables, seed=0):
  """The variables with every BatchNorm scale drawn around 1, so no residual branch is zero (as zero_init_last
  makes them at init) and dropping or rounding a branch shows in the output."""
  rng = np.random.RandomState(seed)
  return jax.tree_util.tree_map_with_path(
    lambda path, v: 1 + 0.2 * rng.randn(*v.shape).astype(np.float32) if path[-1].key == "scale" else v, variables
  )


def _count(variables, collection):
  return sum(x.size for x in jax.tree.leaves(variables.get(collection, {})))


def _shapes(tree):
  return {k: v.shape for k, v in tree.items()}


def test_every_variant_is_counted():
  assert sorted(COUNTS) == sorted(VARIANTS) == lvm_jax.list_models("resnet*")


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_variant_shapes_and_exact_sizes(name):
  model = lvm_jax.create_model(name)
  x = jnp.zeros((2, 224, 224, 3))

  def forward():
    variables = model.init(jax.random.key(0), x)
    return model.apply(variables, x), model.apply(variables, x, return_features=True), variables

  logits, features, variables = jax.eval_shape(forward)
  assert logits.shape == (2, 1000)
  variables = nn.meta.unbox(variables)
  assert (_count(variables, "params"), _count(variables, "batch_stats")) == COUNTS[name]
  out = 512 if VARIANTS[name]["block"] == "basic" else 2048
  assert _shapes(features) == {
    "stride_4": (2, 56, 56, out // 8),
    "stride_8": (2, 28, 28, out // 4),
    "stride_16": (2, 14, 14, out // 2),
    "stride_32": (2, 7, 7, out),
    "pooled": (2, out),
  }


def test_small_basic_forward_head_sees_pooled_last_stage(basic):
  x, variables = basic
  model = ResNet(**BASIC)
  logits = jax.jit(model.apply)(variables, x)
  assert logits.shape == (2, 10) and np.isfinite(logits).all()
  feats = _features(model, variables, x)
  assert _shapes(feats) == {
    "stride_4": (2, 8, 8, 8),
    "stride_8": (2, 4, 4, 16),
    "stride_16": (2, 2, 2, 32),
    "stride_32": (2, 1, 1, 64),
    "pooled": (2, 64),
  }
  np.testing.assert_allclose(feats["pooled"], feats["stride_32"].mean(axis=(1, 2)), atol=1e-6)
  head = variables["params"]["head"]
  np.testing.assert_allclose(logits, feats["pooled"] @ head["kernel"] + head["bias"], atol=1e-5)
  assert np.abs(logits).max() > 1e-3  # a fresh head is not zero


def test_bottleneck_features_with_custom_stage_widths(bottleneck):
  x, variables = bottleneck
  feats = _features(ResNet(**BOTTLENECK), variables, x)
  assert _shapes(feats) == {
    "stride_4": (2, 16, 16, 16),
    "stride_8": (2, 8, 8, 32),
    "stride_16": (2, 4, 4, 32),
    "stride_32": (2, 2, 2, 64),
    "pooled": (2, 64),
  }
  params = variables["params"]
  # v1.5: the stride-2 block keeps its 1x1 at full resolution and downsamples in the 3x3.
  block = params["stage_1_block_0"]
  assert block["conv1"]["kernel"].shape == (1, 1, 16, 8) and block["conv2"]["kernel"].shape == (3, 3, 8, 8)
  assert block["shortcut_conv"]["kernel"].shape == (1, 1, 16, 32)
  # a projection only where channels or resolution change: stage_0 (8 -> 16 channels) yes, the second block not
  assert "shortcut_conv" in params["stage_0_block_0"] and "shortcut_conv" not in params["stage_1_block_1"]
  # resolution halves in the 3x3 (stride 2 over padding 1), as torch computes floor((n + 2 - 3) / 2) + 1
  assert _features(ResNet(**BOTTLENECK), variables, x[:, :50, :50])["stride_32"].shape[1:3] == (2, 2)


def test_num_classes_zero_returns_pooled_features(basic):
  x, variables = basic
  model = ResNet(**{**BASIC, "num_classes": 0})
  assert "head" not in jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  body = {
    "params": {k: v for k, v in variables["params"].items() if k != "head"},
    "batch_stats": variables["batch_stats"],
  }
  np.testing.assert_array_equal(
    model.apply(body, x), ResNet(**BASIC).apply(variables, x, return_features=True)["pooled"]
  )


def test_two_stage_model_returns_two_feature_maps():
  model = ResNet(stage_sizes=(1, 1), block="bottleneck", width=8, stage_widths=(2, 4), num_classes=3)
  x = jnp.zeros((2, 32, 32, 3))
  feats = jax.eval_shape(lambda: model.apply(model.init(jax.random.key(0), x), x, return_features=True))
  assert _shapes(feats) == {"stride_4": (2, 8, 8, 8), "stride_8": (2, 4, 4, 16), "pooled": (2, 16)}


def test_train_updates_batch_stats_and_eval_does_not(basic):
  x, variables = basic
  model = ResNet(**BASIC)
  _, unchanged = model.apply(variables, x, train=False, mutable=["batch_stats"])
  jax.tree.map(np.testing.assert_array_equal, unchanged["batch_stats"], variables["batch_stats"])

  out, updated = model.apply(variables, x, train=True, mutable=["batch_stats"])
  # the stem's statistics move 10% (momentum 0.9) towards the batch statistics of the stem convolution
  kernel = variables["params"]["stem_conv"]["kernel"]
  y = jax.lax.conv_general_dilated(x, kernel, (2, 2), ((3, 3), (3, 3)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
  stem = updated["batch_stats"]["stem_bn"]
  np.testing.assert_allclose(stem["mean"], 0.1 * y.mean(axis=(0, 1, 2)), atol=1e-5)
  np.testing.assert_allclose(stem["var"], 0.9 + 0.1 * y.var(axis=(0, 1, 2)), atol=1e-4)
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), updated["batch_stats"], variables["batch_stats"])
  assert all(jax.tree.leaves(changed))  # every BatchNorm, in every block and shortcut
  # training normalizes with the batch's statistics, evaluation with the running ones
  assert np.abs(out - model.apply(variables, x)).max() > 1e-3


def test_train_without_mutable_batch_stats_is_an_error(basic):
  x, variables = basic
  with pytest.raises(Exception, match="batch_stats"):
    ResNet(**BASIC).apply(variables, x, train=True)


def test_bfloat16_compute_stays_close_to_float32(basic):
  x, variables = basic
  variables = _active(variables)
  expected = ResNet(**BASIC).apply(variables, x)
  bf16 = ResNet(**BASIC, dtype=jnp.bfloat16)
  logits = bf16.apply(variables, x)
  assert logits.dtype == jnp.bfloat16
  error = np.abs(np.asarray(logits, np.float32) - expected).max()
  assert 0 < error < 0.05 * np.abs(expected).max()
  # parameters and running statistics stay float32 by default
  shapes = jax.eval_shape(bf16.init, jax.random.key(0), x)
  assert {v.dtype for v in jax.tree.leaves(nn.meta.unbox(shapes))} == {jnp.dtype(jnp.float32)}


def test_stochastic_depth_changes_training_outputs_only(basic):
  x, variables = basic
  variables = _active(variables)
  plain, dropped = ResNet(**BASIC), ResNet(**BASIC, drop_path=0.5)
  np.testing.assert_array_equal(dropped.apply(variables, x), plain.apply(variables, x))

  def train(model, seed):
    return model.apply(variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(seed)})[0]

  reference = train(plain, 0)
  np.testing.assert_array_equal(train(plain, 1), reference)
  # each example keeps or drops each branch at random: a few keys give several different outputs
  outputs = [np.asarray(train(dropped, seed)) for seed in range(4)]
  assert max(np.abs(out - reference).max() for out in outputs) > 1e-3
  assert len({out.tobytes() for out in outputs}) > 1
  np.testing.assert_array_equal(train(dropped, 3), outputs[3])


def test_initialisation_follows_timm(bottleneck):
  params = bottleneck[1]["params"]
  for name, block in params.items():
    if name.startswith("stage_"):
      assert not np.any(block["bn3"]["scale"]), name  # zero_init_last
      np.testing.assert_array_equal(block["bn2"]["scale"], 1.0)
  tiny = dict(stage_sizes=(1,), block="basic", width=4, num_classes=2)
  _, plain = _init(ResNet(**tiny, zero_init_last=False), 16)
  np.testing.assert_array_equal(plain["params"]["stage_0_block_0"]["bn2"]["scale"], 1.0)
  # He normal, fan_out: std sqrt(2 / (k * k * out)); the 3x3x8x8 kernel has 576 entries
  kernel = np.asarray(params["stage_1_block_0"]["conv2"]["kernel"])
  assert 0.8 < kernel.std() / np.sqrt(2 / (3 * 3 * 8)) < 1.2
  # torch.nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for the head kernel and bias
  bound = 1 / np.sqrt(64)
  for leaf in (params["head"]["kernel"], params["head"]["bias"]):
    assert np.abs(leaf).max() <= bound and np.abs(leaf).max() > 0.5 * bound


def test_every_parameter_has_logical_axis_names():
  boxed = jax.eval_shape(ResNet(**BASIC).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  leaves = jax.tree.leaves(boxed["params"], is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(v, nn.LogicallyPartitioned) and len(v.names) == v.value.ndim for v in leaves)
  params = boxed["params"]
  assert params["stem_conv"]["kernel"].names == (None, None, "conv_in", "conv_out")
  assert params["stage_1_block_0"]["bn1"]["scale"].names == ("conv_out",)
  assert params["head"]["kernel"].names == ("embed", "classes")


def test_configuration_errors_are_clear():
  x = jnp.zeros((1, 32, 32, 3))
  with pytest.raises(ValueError, match=r"block must be one of \('basic', 'bottleneck'\), got 'preact'"):
    ResNet(**{**BASIC, "block": "preact"}).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"stage_widths=\(8, 16\) and stage_sizes=\(1, 1, 1, 1\)"):
    ResNet(**{**BASIC, "stage_widths": (8, 16)}).init(jax.random.key(0), x)


@pytest.mark.parametrize("size, strides", [(1, 1), (1, 2), (3, 1), (3, 2), (7, 2)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_conv_equals_flax_conv_with_torch_padding(size, strides, dtype):
  """Each path of Conv (matrix product, Winograd, lax.conv) against nn.Conv: same parameter, same result; with
  the CPU kernels off, always lax.conv."""
  x = jax.random.normal(jax.random.key(0), (2, 7, 9, 12))
  pad = size // 2
  kw = dict(strides=(strides, strides), padding=((pad, pad), (pad, pad)), dtype=dtype)
  conv = nn.Conv(5, (size, size), use_bias=False, **kw)
  variables = conv.init(jax.random.key(1), x)
  module = Conv(5, (size, size), **kw)
  np.testing.assert_array_equal(module.init(jax.random.key(1), x)["params"]["kernel"], variables["params"]["kernel"])
  expected = conv.apply(variables, x)
  for enabled in (True, False):
    with kernels.use_cpu_kernels(enabled):
      out = module.apply(variables, x)
      program = str(jax.make_jaxpr(lambda v, x: module.apply(v, x))(variables, x))
    assert out.shape == expected.shape == (2, -(-7 // strides), -(-9 // strides), 5) and out.dtype == dtype
    fast = enabled and size > 1 and strides == 1 and dtype == jnp.float32 or enabled and size == 1
    assert ("conv_general_dilated" in program) != fast
    np.testing.assert_allclose(
      np.asarray(out, np.float32),
      np.asarray(expected, np.float32),
      rtol=1e-5 if dtype == jnp.float32 else 2e-2,
      atol=1e-5 if dtype == jnp.float32 else 2e-2,
    )


def test_conv_and_norm_are_arguments(basic):
  """A kernel choice touches no block code: nn.Conv in place of Conv, and a norm of one's own, build the same
  variables and give the same outputs, every layer through them."""
  x, variables = basic
  variables = _active(variables)

  class RecordingNorm(nn.BatchNorm):
    pass

  model = ResNet(**BASIC, conv=functools.partial(nn.Conv, use_bias=False), norm=RecordingNorm)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, nn.meta.unbox(shapes)) == jax.tree.map(jnp.shape, variables)
  seen = []

  def record(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and isinstance(context.module, (nn.Conv, RecordingNorm)):
      seen.append(type(context.module).__name__)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    out = model.apply(variables, x)
  assert seen.count("Conv") == seen.count("RecordingNorm") == 1 + 2 * 4 + 3  # stem, two a block, 3 shortcuts
  np.testing.assert_allclose(out, ResNet(**BASIC).apply(variables, x), rtol=1e-5, atol=1e-5 * np.abs(out).max())
