"""BiT ResNetV2: every variant's parameter count and feature shapes, the parameter tree of both unit types, weight
standardisation and padding, features, stochastic depth, dtypes, axis names and the parameter groups the optimizer
reads."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lvm_jax
from lvm_jax.models import layers
from lvm_jax.models.resnetv2 import ResNetV2, StdConv
from lvm_jax.tasks.detection import backbones
from lvm_jax.train import optimizer as opt
from tests.models.test_registry import PUBLISHED_PARAMS

# Four stages of 8, 4, 2 and 1 positions a side at 32x32 inputs; 8 groups so that 8-channel layers normalise.
SMALL = dict(image_size=32, depths=(1, 2, 1, 1), widths=(32, 32, 64, 64), stem_width=16, groups=8, num_classes=10)
COUNTS = {name: count for name, count in PUBLISHED_PARAMS.items() if name.startswith("bit_")}


def _images(size=32, batch=2, seed=1):
  return jax.random.normal(jax.random.key(seed), (batch, size, size, 3))


def _shapes(model, size=32):
  return nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)))))


def _random_variables(model, size=32, seed=0):
  """Noise of the model's shapes: cheaper than compiling init, and init's numbers would test nothing here."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    scale = path[-1].key == "scale"  # norms around one
    return (scale + 0.2 * rng.standard_normal(leaf.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, _shapes(model, size))


@functools.cache
def _compiled(model):
  """Everything the tests read of one model, in one program (compiling dominates these tests' time): logits in
  float32 and bfloat16, features, and the headless model's pooled features."""

  def outputs(variables, x):
    body = {"params": {k: v for k, v in variables["params"].items() if k != "head"}}
    return dict(
      logits=model.apply(variables, x),
      bf16=model.clone(dtype=jnp.bfloat16).apply(variables, x),
      features=model.apply(variables, x, return_features=True),
      headless=model.clone(num_classes=0).apply(body, x),
    )

  return jax.jit(outputs)


@pytest.fixture(scope="module")
def small():
  model = ResNetV2(**SMALL)
  variables = _random_variables(model)
  x = _images()
  with lvm_jax.use_cpu_kernels(False):  # compiles faster; tests/weights/test_hf_bit.py runs the CPU kernels' form
    return model, x, variables, _compiled(model)(variables, x)


def test_the_bit_release_is_registered():
  # BiT-S and BiT-M were released at these six sizes.
  assert (
    lvm_jax.list_models("bit_*")
    == sorted(COUNTS)
    == sorted(["bit_r50x1", "bit_r50x3", "bit_r101x1", "bit_r101x3", "bit_r152x2", "bit_r152x4"])
  )
  assert lvm_jax.create_model("bit_r101x3").depths == (3, 4, 23, 3)
  r152x4 = lvm_jax.create_model("bit_r152x4")
  assert (r152x4.depths, r152x4.width_factor, r152x4.stem_channels()) == ((3, 8, 36, 3), 4, 256)


def test_feature_shapes_of_a_wide_variant():
  # Every variant's parameter count is checked in tests/models/test_registry.py (and against transformers in
  # tests/weights/test_hf_bit.py); R50x3's stem is 192 channels wide, its stages 768 ... 6144.
  model = lvm_jax.create_model("bit_r50x3")
  x = jnp.zeros((2, 224, 224, 3))
  logits, variables = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x))
  assert logits.shape == (2, 1000) and model.stem_channels() == 192
  features = jax.eval_shape(lambda v: model.apply(v, x, return_features=True), variables)
  c = 256 * model.width_factor
  assert {k: v.shape for k, v in features.items()} == {
    "stride_4": (2, 56, 56, c),
    "stride_8": (2, 28, 28, 2 * c),
    "stride_16": (2, 14, 14, 4 * c),
    "stride_32": (2, 7, 7, 8 * c),
    "pooled": (2, 8 * c),
  }
  assert model.feature_channels() == {k: v.shape[-1] for k, v in features.items() if k != "pooled"}


def test_channel_rounding_is_timms_and_transformers():
  # make_divisible(v, 8): nearest multiple of 8, at least 8, bumped up when rounding loses more than 10%.
  assert [layers.make_divisible(v) for v in (64, 192, 3 * 256 / 4, 12, 4, 20, 1.5 * 64)] == [
    64,
    192,
    192,
    16,
    8,
    24,
    96,
  ]


def test_preact_forward_and_parameter_tree(small):
  model, _, variables, out = small
  params = variables["params"]
  assert set(variables) == {"params"}  # GroupNorm only: no batch statistics
  units = ["stage_0_block_0", "stage_1_block_0", "stage_1_block_1", "stage_2_block_0", "stage_3_block_0"]
  assert sorted(params) == sorted(["head", "norm", "stem_conv", *units])  # no stem norm before pre-activation units
  first, second = params["stage_1_block_0"], params["stage_1_block_1"]
  assert sorted(first) == ["conv1", "conv2", "conv3", "norm1", "norm2", "norm3", "proj_conv"]
  assert sorted(second) == ["conv1", "conv2", "conv3", "norm1", "norm2", "norm3"]  # identity shortcut
  # a unit is 4x narrower inside; the pre-activation norm1 normalises the unit's input
  assert first["norm1"]["scale"].shape == (32,) and first["conv1"]["kernel"].shape == (1, 1, 32, 8)
  assert first["conv2"]["kernel"].shape == (3, 3, 8, 8) and first["conv3"]["kernel"].shape == (1, 1, 8, 32)
  assert first["proj_conv"]["kernel"].shape == (1, 1, 32, 32) and "bias" not in first["proj_conv"]
  assert params["stem_conv"]["kernel"].shape == (7, 7, 3, 16) and params["norm"]["scale"].shape == (64,)

  def unit(cin, mid, out, proj):
    return 2 * cin + cin * mid + 2 * mid + 9 * mid * mid + 2 * mid + mid * out + proj * cin * out

  expected = 147 * 16 + unit(16, 8, 32, 1) + unit(32, 8, 32, 1) + unit(32, 8, 32, 0) + unit(32, 16, 64, 1)
  expected += unit(64, 16, 64, 1) + 2 * 64 + 64 * 10 + 10
  assert sum(p.size for p in jax.tree.leaves(params)) == expected
  logits = out["logits"]
  assert logits.shape == (2, 10) and np.isfinite(logits).all() and not np.allclose(logits[0], logits[1])


def test_features_are_stage_outputs_and_pooled_the_normalised_mean_the_head_sees(small):
  model, _, variables, out = small
  features = out["features"]
  assert {k: v.shape for k, v in features.items()} == {
    "stride_4": (2, 8, 8, 32),
    "stride_8": (2, 4, 4, 32),
    "stride_16": (2, 2, 2, 64),
    "stride_32": (2, 1, 1, 64),
    "pooled": (2, 64),
  }
  params = variables["params"]
  # the last stage's output is the raw residual stream: the final GroupNorm + ReLU come before the pooling
  last = np.asarray(features["stride_32"], np.float64).reshape(2, 1, 8, 8)  # 8 groups of 8 channels, 1x1
  norm = (last - last.mean(axis=(1, 3), keepdims=True)) / np.sqrt(last.var(axis=(1, 3), keepdims=True) + 1e-5)
  norm = norm.reshape(2, 64) * params["norm"]["scale"] + params["norm"]["bias"]
  np.testing.assert_allclose(features["pooled"], np.maximum(norm, 0), atol=1e-5)
  head = params["head"]
  np.testing.assert_allclose(out["logits"], features["pooled"] @ head["kernel"] + head["bias"], atol=1e-5)
  assert "head" not in _shapes(model.clone(num_classes=0))["params"]
  np.testing.assert_allclose(out["headless"], features["pooled"], atol=1e-5)


def test_post_activation_units_with_same_padding():
  # The ViT hybrids' ResNet: a normalised stem, norms after the convolutions and on the projection, no final norm;
  # TensorFlow's SAME padding takes ceil(size / stride) positions from an odd input.
  model = ResNetV2(**{**SMALL, "preact": False, "padding": "SAME"})
  params = _shapes(model, 45)["params"]
  assert sorted(params) == sorted(["head", "stem_conv", "stem_norm", *(u.name for u in model.units())])
  assert sorted(params["stage_2_block_0"]) == sorted(
    ["conv1", "conv2", "conv3", "norm1", "norm2", "norm3", "proj_conv", "proj_norm"]
  )
  assert params["stage_2_block_0"]["norm1"]["scale"].shape == (16,)  # after conv1: the unit's inner width
  features = jax.eval_shape(
    lambda: model.init_with_output(jax.random.key(0), jnp.zeros((1, 45, 45, 3)), return_features=True)
  )[0]
  assert [features[f"stride_{s}"].shape[1] for s in (4, 8, 16, 32)] == [12, 6, 3, 2]  # 45 -> 23 -> 12 -> ...
  symmetric = jax.eval_shape(
    lambda: ResNetV2(**SMALL).init_with_output(jax.random.key(0), jnp.zeros((1, 45, 45, 3)), return_features=True)
  )[0]
  assert [symmetric[f"stride_{s}"].shape[1] for s in (4, 8, 16, 32)] == [12, 6, 3, 2]  # floor((n + 2p - k) / s) + 1


def test_weight_standardisation_and_padding():
  x = np.asarray(_images(11, batch=1))
  kernel = np.asarray(jax.random.normal(jax.random.key(2), (3, 3, 3, 5))) * 0.3 + 0.7
  apply = lambda padding, w: jax.jit(StdConv(5, 3, strides=2, padding=padding).apply)({"params": {"kernel": w}}, x)
  out = apply("SAME", kernel)
  mean, var = kernel.mean(axis=(0, 1, 2)), kernel.var(axis=(0, 1, 2))
  standard = (kernel - mean) / np.sqrt(var + 1e-8)
  expected = jax.lax.conv_general_dilated(x, standard, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(out, expected, atol=1e-5)
  assert layers.same_padding((11, 224), 3, 2) == ((1, 1), (0, 1)) and layers.same_padding((224,), 7, 2) == ((2, 3),)
  assert layers.same_padding((224,), 1, 2) == ((0, 0),)
  symmetric = apply("symmetric", kernel)
  expected = jax.lax.conv_general_dilated(
    x, standard, (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  np.testing.assert_allclose(symmetric, expected, atol=1e-5)
  # scaling a kernel changes nothing: what weight standardisation is for
  np.testing.assert_allclose(apply("symmetric", 9 * kernel), symmetric, atol=1e-5)


def test_stochastic_depth_grows_linearly_over_all_units(small):
  base, x, variables, _ = small
  model = base.clone(drop_path=0.4)
  rates = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, layers.DropPath):
      rates.append((context.module.rate, kwargs["train"]))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):  # traced only: DropPath itself is tested with the other families
    jax.eval_shape(lambda: model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(0)}))
  assert rates == [(r, True) for r in np.linspace(0, 0.4, 5).tolist()]  # five units over all stages


def test_bf16_compute_keeps_float32_params_and_tracks_float32(small):
  model, _, _, out = small
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(_shapes(model.clone(dtype=jnp.bfloat16))))
  out16, out32 = out["bf16"], out["logits"]
  assert out16.dtype == jnp.bfloat16
  error = np.abs(np.asarray(out16, np.float32) - out32).max()
  assert 0 < error < 0.05 * np.abs(out32).max() + 0.02


def test_params_carry_logical_axis_names():
  model = ResNetV2(**{**SMALL, "preact": False})
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))["params"]
  unit = boxed["stage_1_block_0"]
  assert unit["conv2"]["kernel"].names == (None, None, "conv_in", "conv_out")
  assert unit["proj_norm"]["scale"].names == ("conv_out",) and unit["norm1"]["bias"].names == ("conv_out",)
  assert boxed["stem_conv"]["kernel"].names == (None, None, "conv_in", "conv_out")
  assert boxed["head"]["kernel"].names == ("embed", "classes") and boxed["head"]["bias"].names == ("classes",)
  leaves = jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.Partitioned))
  assert all(isinstance(v, nn.Partitioned) for v in leaves)  # every parameter has names


def test_layer_ids_and_weight_decay_mask():
  model = ResNetV2(**SMALL)
  params = _shapes(model)["params"]
  ids, n = opt.layer_ids(params, model)
  assert n == 5 + 2
  assert ids["stem_conv/kernel"] == 0
  units = ["stage_0_block_0", "stage_1_block_0", "stage_1_block_1", "stage_2_block_0", "stage_3_block_0"]
  assert [ids[f"{u}/conv2/kernel"] for u in units] == [1, 2, 3, 4, 5]
  assert ids["norm/scale"] == ids["head/kernel"] == 6
  assert model.layer_id("stage_1_block_2/conv1/kernel") is None and model.layer_id("pos_embed") is None
  mask = jax.tree_util.tree_flatten_with_path(opt.weight_decay_mask(params, model=model))[0]
  decayed = {"/".join(k.key for k in path) for path, d in mask if d}
  assert decayed == {p for p in ids if p.endswith("kernel")}  # no GroupNorm scales or biases, no head bias


def test_detection_backbone_gives_stride_8_16_32_maps_at_a_non_square_canvas():
  spec = {"model": "bit_r50x1", "model_args": dict(depths=(1, 1, 1, 1), widths=(32, 64, 64, 128), groups=8)}
  backbone, variables, _ = backbones.build_backbone(spec)
  assert variables is None and backbone.num_classes == 0
  x = jax.ShapeDtypeStruct((2, 64, 96, 3), np.float32)
  out, _ = jax.eval_shape(lambda x: backbone.init_with_output(jax.random.key(0), x, return_features=True), x)
  channels = backbones.feature_channels(backbone)
  assert [(out[f"stride_{s}"].shape, channels[f"stride_{s}"]) for s in (8, 16, 32)] == [
    ((2, 8, 12, 64), 64),
    ((2, 4, 6, 64), 64),
    ((2, 2, 3, 128), 128),
  ]


@pytest.mark.parametrize(
  "args,message",
  [
    (dict(widths=(32, 64)), r"depths=\(1, 2, 1, 1\) and widths=\(32, 64\) must have one entry per stage"),
    (dict(padding="same"), r"padding must be one of \('symmetric', 'SAME'\), got 'same'"),
  ],
)
def test_inconsistent_arguments_are_clear_errors(args, message):
  with pytest.raises(ValueError, match=message):
    _shapes(ResNetV2(**{**SMALL, **args}))
