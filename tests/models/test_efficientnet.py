"""EfficientNet: every variant's shapes and parameter count, the scaling rules, the parameter tree, the three
paddings, features, BatchNorm statistics, stochastic depth, dtypes, axis names and the parameter groups."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lvm_jax
from lvm_jax.models import efficientnet, layers
from lvm_jax.models.efficientnet import EfficientNet, conv_padding
from lvm_jax.train import optimizer as opt
from tests.models.test_registry import PUBLISHED_PARAMS

# Width 0.25 and depth 0.3: stages of 8, 8, 16, 24, 32, 48, 80 channels and 1, 1, 1, 1, 1, 2, 1 blocks (the first
# and the seventh add their input back); 32x32 inputs reach 1x1 at stride 32.
SMALL = dict(image_size=32, width_multiplier=0.25, depth_multiplier=0.3, num_classes=10)
COUNTS = {name: count for name, count in PUBLISHED_PARAMS.items() if name.startswith("efficientnet_")}
# The paper's (width, depth, resolution, dropout).
PAPER = {
  "efficientnet_b0": (1.0, 1.0, 224, 0.2),
  "efficientnet_b1": (1.0, 1.1, 240, 0.2),
  "efficientnet_b2": (1.1, 1.2, 260, 0.3),
  "efficientnet_b3": (1.2, 1.4, 300, 0.3),
  "efficientnet_b4": (1.4, 1.8, 380, 0.4),
  "efficientnet_b5": (1.6, 2.2, 456, 0.4),
  "efficientnet_b6": (1.8, 2.6, 528, 0.5),
  "efficientnet_b7": (2.0, 3.1, 600, 0.5),
}


def _images(size=32, batch=2, seed=1):
  return jax.random.normal(jax.random.key(seed), (batch, size, size, 3))


def _shapes(model, size=32):
  return nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)))))


@functools.cache
def _compiled(model, train, return_features):
  def apply(v, x, rngs):
    return model.apply(
      v, x, train=train, return_features=return_features, rngs=rngs, mutable=["batch_stats"] if train else False
    )

  return jax.jit(apply)


def run(model, variables, x, *, train=False, return_features=False, rngs=None):
  return _compiled(model, train, return_features)(variables, x, rngs)


def _batch_statistics(model, variables, x):
  """The BatchNorm statistics of `x` itself, from the running ones one training step moves (by 1 - bn_momentum)."""
  updated = run(model, variables, x, train=True, rngs={"dropout": jax.random.key(0)})[1]["batch_stats"]
  m = model.bn_momentum
  return jax.tree.map(lambda new, old: (new - m * old) / (1 - m), updated, variables["batch_stats"])


def _random_variables(model, x, seed=0):
  """Noise of the model's shapes, kernels at a 1/sqrt(fan_in) scale, norm scales around one; running statistics
  those of `x`, perturbed, so that activations stay O(1) and depend on the input through every block (statistics
  that do not fit let SiLU and the excitation gates shrink the signal block after block)."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == "kernel":
      fan_in = math.prod(leaf.shape[:2]) if leaf.shape[-2] == 1 else math.prod(leaf.shape[:-1])  # depthwise: k*k
      return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(np.float32)
    if name == "scale":
      return (1.0 + 0.2 * rng.uniform(-1, 1, leaf.shape)).astype(np.float32)
    return (0.2 * rng.standard_normal(leaf.shape)).astype(np.float32)

  variables = jax.tree_util.tree_map_with_path(fill, _shapes(model, x.shape[1]))
  stats = _batch_statistics(model, variables, x)

  def perturb(path, stat):
    stat = np.asarray(stat)
    if path[-1].key == "var":  # floored: a channel nearly constant over the batch would be blown up
      return (np.maximum(stat, 0.1) * rng.uniform(0.7, 1.3, stat.shape)).astype(np.float32)
    return (stat + 0.1 * rng.standard_normal(stat.shape)).astype(np.float32)

  return {**variables, "batch_stats": jax.tree_util.tree_map_with_path(perturb, stats)}


@pytest.fixture(scope="module")
def small():
  # Eight images: statistics of two would be degenerate where the maps are 1x1.
  model, x = EfficientNet(**SMALL), _images(batch=8)
  return model, x, _random_variables(model, x)


def test_the_eight_sizes_of_the_paper_are_registered():
  assert (
    lvm_jax.list_models("efficientnet_*") == sorted(COUNTS) == sorted(PAPER) == [f"efficientnet_b{i}" for i in range(8)]
  )


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_every_variant_has_the_published_parameter_count_and_feature_shapes(name):
  model = lvm_jax.create_model(name)
  size = model.image_size
  x = jnp.zeros((2, size, size, 3))
  both = lambda m, x: (m(x), m(x, return_features=True))
  with lvm_jax.use_cpu_kernels(False):  # their custom gradients double the tracing time, and shapes are the same
    (logits, features), variables = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x, method=both))
  assert logits.shape == (2, 1000)
  assert sum(v.size for v in jax.tree.leaves(nn.meta.unbox(variables["params"]))) == COUNTS[name]
  channels = model.feature_channels()
  # padding "same": every stride-2 layer gives ceil(n / 2)
  expected = {f"stride_{s}": (2, -(-size // s), -(-size // s), channels[f"stride_{s}"]) for s in (4, 8, 16, 32)}
  assert {k: v.shape for k, v in features.items()} == {**expected, "pooled": (2, model.channels(1280))}


def test_variants_follow_the_paper():
  for name, (width, depth, resolution, dropout) in PAPER.items():
    model = lvm_jax.create_model(name)
    assert (model.width_multiplier, model.depth_multiplier, model.image_size, model.dropout) == (
      width,
      depth,
      resolution,
      dropout,
    )
    assert (model.drop_path, model.padding, model.bn_eps) == (0.2, "same", 1e-3)

  def stages(model):
    specs = model.block_specs()
    depths = [sum(s.stage == i for s in specs) for i in range(7)]
    return depths, [s.out_channels for s in specs if s.index == 0], model.channels(32), model.channels(1280)

  b0, b7 = lvm_jax.create_model("efficientnet_b0"), lvm_jax.create_model("efficientnet_b7")
  assert stages(b0) == ([1, 2, 2, 3, 3, 4, 1], [16, 24, 40, 80, 112, 192, 320], 32, 1280)
  assert stages(b7) == ([4, 7, 7, 10, 10, 13, 4], [32, 48, 80, 160, 224, 384, 640], 64, 2560)
  spec = b0.block_specs()[1]  # stage 1's first block: 16 -> 96 expanded, 3x3 stride 2, 4-wide excitation
  assert (spec.in_channels, spec.expanded, spec.out_channels, spec.kernel_size, spec.strides, spec.se_channels) == (
    16,
    96,
    24,
    3,
    2,
    4,
  )
  # channels round to multiples of 8, never more than 10% down
  assert [EfficientNet(width_multiplier=1.1).channels(c) for c in (32, 40, 112, 1280)] == [32, 48, 120, 1408]
  assert EfficientNet(width_multiplier=0.25).channels(40) == 16  # 10 would round to 8, 20% down


def _expected_params(model) -> int:
  c = model.channels
  total = 27 * c(32) + 2 * c(32)
  for s in model.block_specs():
    mid = s.expanded
    total += (s.in_channels * mid + 2 * mid) if s.expand_ratio != 1 else 0
    total += s.kernel_size**2 * mid + 2 * mid  # depthwise and its norm
    total += 2 * mid * s.se_channels + s.se_channels + mid  # excitation, with biases
    total += mid * s.out_channels + 2 * s.out_channels
  last = model.block_specs()[-1].out_channels
  return total + last * c(1280) + 2 * c(1280) + c(1280) * model.num_classes + model.num_classes


def test_small_forward_and_parameter_tree(small):
  model, x, variables = small
  params, stats = variables["params"], variables["batch_stats"]
  names = [f"stage_{s}_block_0" for s in range(7)] + ["stage_5_block_1"]
  assert sorted(params) == sorted(names + ["head", "head_bn", "head_conv", "stem_bn", "stem_conv"])
  assert sorted(stats) == sorted(names + ["head_bn", "stem_bn"])
  assert sorted(params["stage_0_block_0"]) == ["dw_bn", "dw_conv", "project_bn", "project_conv", "se"]  # ratio 1
  block = params["stage_5_block_1"]  # 48 channels, expanded 6x
  assert sorted(block) == ["dw_bn", "dw_conv", "expand_bn", "expand_conv", "project_bn", "project_conv", "se"]
  assert block["expand_conv"]["kernel"].shape == (1, 1, 48, 288)
  assert block["dw_conv"]["kernel"].shape == (5, 5, 1, 288)  # depthwise: one input channel per group
  assert block["se"]["reduce"]["kernel"].shape == (1, 1, 288, 12) and block["se"]["expand"]["bias"].shape == (288,)
  assert block["project_conv"]["kernel"].shape == (1, 1, 288, 48)
  assert sorted(stats["stage_5_block_1"]["dw_bn"]) == ["mean", "var"]
  assert params["stem_conv"]["kernel"].shape == (3, 3, 3, 8) and params["head_conv"]["kernel"].shape == (1, 1, 80, 320)
  assert sum(p.size for p in jax.tree.leaves(params)) == _expected_params(model)
  logits = run(model, variables, x)
  assert logits.shape == (8, 10) and np.isfinite(logits).all() and 0.5 < np.abs(logits).max() < 100
  assert not np.allclose(logits[0], logits[1])


def test_features_are_the_last_block_at_each_stride_and_pooled_what_the_head_sees(small):
  model, x, variables = small
  features = run(model, variables, x, return_features=True)
  assert {k: v.shape for k, v in features.items()} == {
    "stride_4": (8, 8, 8, 8),
    "stride_8": (8, 4, 4, 16),
    "stride_16": (8, 2, 2, 32),
    "stride_32": (8, 1, 1, 80),
    "pooled": (8, 320),
  }
  assert model.feature_channels() == {k: v.shape[-1] for k, v in features.items() if k != "pooled"}
  head = variables["params"]["head"]
  np.testing.assert_allclose(run(model, variables, x), features["pooled"] @ head["kernel"] + head["bias"], atol=1e-5)
  headless = model.clone(num_classes=0)
  assert "head" not in _shapes(headless)["params"]
  body = {**variables, "params": {k: v for k, v in variables["params"].items() if k != "head"}}
  assert jax.eval_shape(lambda: headless.apply(body, x)).shape == (8, 320)


def test_padding_modes():
  # stride 1: k // 2 on both sides in every mode
  assert {conv_padding(m, (9, 10), 5, 1) for m in efficientnet.PADDINGS} == {((2, 2), (2, 2))}
  # stride 2: SAME follows each side's parity; transformers pads as SAME does for even sides unless told otherwise
  assert conv_padding("same", (9, 10), 3, 2) == ((1, 1), (0, 1))
  assert conv_padding("same", (9, 10), 5, 2) == ((2, 2), (1, 2))
  assert conv_padding("transformers", (9, 10), 5, 2) == ((1, 2), (1, 2))
  assert conv_padding("transformers", (9, 10), 5, 2, symmetric=True) == ((2, 2), (2, 2))
  assert conv_padding("symmetric", (9, 10), 3, 2) == ((1, 1), (1, 1))


def test_same_padding_equals_transformers_padding_with_the_odd_blocks_listed(small):
  model, _, variables = small
  # 36 -> 18 (stem) -> 9 (block 1) -> 5 (block 2: odd input) -> 3 (block 3: odd) -> 2 (block 5: odd)
  x = _images(36)
  listed = model.clone(padding="transformers", symmetric_blocks=(2, 3, 5))
  np.testing.assert_allclose(run(listed, variables, x), run(model, variables, x), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
  "args,message",
  [
    (dict(padding="valid"), r"padding must be one of \('same', 'symmetric', 'transformers'\), got 'valid'"),
    (dict(symmetric_blocks=(3,)), r"symmetric_blocks=\(3,\) applies to padding='transformers' only"),
  ],
)
def test_padding_arguments_are_checked(args, message):
  with pytest.raises(ValueError, match=message):
    _shapes(EfficientNet(**{**SMALL, **args}))


def test_train_normalizes_with_batch_statistics_and_updates_them_and_drops_blocks(small):
  model, x, variables = small
  train = lambda v, seed=0: run(model, v, x, train=True, rngs={"dropout": jax.random.key(seed)})
  logits, updates = train(variables)
  assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(variables["batch_stats"])
  assert not np.allclose(logits, run(model, variables, x))
  # Flax's momentum 0.99 (TF's) moves the running statistics 1% of the way to the batch's, which a second step on
  # the same batch (normalized by its own statistics again) shows: s2 - s1 = 0.99 (s1 - s0).
  again = train({**variables, "batch_stats": updates["batch_stats"]})[1]["batch_stats"]
  s0, s1, s2 = (jax.tree.leaves(s) for s in (variables["batch_stats"], updates["batch_stats"], again))
  for a, b, c in zip(s0, s1, s2):
    np.testing.assert_allclose(c - b, 0.99 * (b - a), rtol=1e-3, atol=1e-6)
  assert max(np.abs(b - a).max() for a, b in zip(s0, s1)) > 1e-3
  # dropout and stochastic depth draw from the "dropout" key
  assert not np.allclose(train(variables, 1)[0], logits)
  np.testing.assert_array_equal(train(variables, 0)[0], logits)


def test_stochastic_depth_grows_with_the_block_number():
  model = EfficientNet(**{**SMALL, "drop_path": 0.4})
  rates = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, layers.DropPath):
      rates.append((context.module.parent.name, context.module.rate))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    _shapes(model)
  # only the blocks that add their input back have a branch to drop: block n of 8 at 0.4 * n / 8
  assert [name for name, _ in rates] == ["stage_0_block_0", "stage_5_block_1"]
  np.testing.assert_allclose([rate for _, rate in rates], [0.0, 0.3], rtol=1e-12)


def test_bf16_compute_keeps_float32_params_and_tracks_float32(small):
  model, x, variables = small
  bf16 = model.clone(dtype=jnp.bfloat16)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(_shapes(bf16)))
  out16, out32 = run(bf16, variables, x), run(model, variables, x)
  assert out16.dtype == jnp.bfloat16
  error = np.abs(np.asarray(out16, np.float32) - out32).max()
  assert 0 < error < 0.05 * np.abs(out32).max() + 0.02


def test_params_carry_logical_axis_names():
  boxed = jax.eval_shape(lambda: EfficientNet(**SMALL).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))["params"]
  block = boxed["stage_5_block_0"]
  conv = (None, None, "conv_in", "conv_out")
  assert block["expand_conv"]["kernel"].names == conv and block["project_conv"]["kernel"].names == conv
  assert block["dw_conv"]["kernel"].names == (None, None, None, "conv_out")
  assert block["se"]["reduce"]["kernel"].names == conv and block["se"]["reduce"]["bias"].names == ("conv_out",)
  assert block["dw_bn"]["scale"].names == ("conv_out",)
  assert boxed["stem_conv"]["kernel"].names == conv and boxed["head_conv"]["kernel"].names == conv
  assert boxed["head"]["kernel"].names == ("embed", "classes")
  leaves = jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.Partitioned))
  assert all(isinstance(v, nn.Partitioned) for v in leaves)  # every parameter has names


def test_layer_ids_and_weight_decay_mask():
  model = EfficientNet(**SMALL)
  params = _shapes(model)["params"]
  ids, n = opt.layer_ids(params, model)
  assert n == 8 + 2
  assert ids["stem_conv/kernel"] == ids["stem_bn/scale"] == 0
  blocks = [s.name for s in model.block_specs()]
  assert [ids[f"{b}/dw_conv/kernel"] for b in blocks] == list(range(1, 9))
  assert ids["stage_5_block_1/se/expand/bias"] == 7
  assert ids["head_conv/kernel"] == ids["head_bn/bias"] == ids["head/kernel"] == 9
  assert model.layer_id("stage_5_block_2/dw_conv/kernel") is None and model.layer_id("blocks/0") is None
  mask = jax.tree_util.tree_flatten_with_path(opt.weight_decay_mask(params, model=model))[0]
  decayed = {"/".join(k.key for k in path) for path, d in mask if d}
  assert decayed == {p for p in ids if p.endswith("kernel")}  # no biases or norm scales
