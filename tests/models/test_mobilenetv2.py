"""MobileNetV2: torchvision's layout (channels, strides, parameter count), the parameter tree and its axis names,
features, BatchNorm statistics, dropout and the parameter groups the optimizer reads. Parity with torchvision's
network on real weights is in tests/weights/test_torchvision.py."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lvm_jax
from lvm_jax.models import layers
from lvm_jax.models.mobilenetv2 import INVERTED_RESIDUAL_SETTING, MobileNetV2
from lvm_jax.tasks.detection import backbones, detector
from lvm_jax.train import optimizer as opt
from tests.models.test_registry import PUBLISHED_PARAMS

# Four of the seven stages, one block each (one with a residual), at a third of the width: every kind of block,
# all four strides, fast to compile.
SMALL_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 1, 2), (6, 64, 1, 2), (6, 96, 1, 1), (6, 160, 1, 2))
SMALL = dict(width_mult=0.35, inverted_residual_setting=SMALL_SETTING, num_classes=10, image_size=32)


def _shapes(model, size=32, boxed=False):
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
  return shapes if boxed else nn.meta.unbox(shapes)


def _images(size=32, batch=2, seed=1):
  return jax.random.normal(jax.random.key(seed), (batch, size, size, 3))


@pytest.fixture(scope="module")
def small():
  """Noise of the model's shapes (variances positive): cheaper than compiling init, whose numbers test nothing."""
  model = MobileNetV2(**SMALL)
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    noise = 0.3 * rng.standard_normal(leaf.shape)
    return (np.abs(noise) + 0.5 if path[-1].key in ("scale", "var") else noise).astype(np.float32)

  return model, jax.tree_util.tree_map_with_path(fill, _shapes(model))


def test_published_parameter_count_and_torchvision_layout():
  model = lvm_jax.create_model("mobilenet_v2")
  variables = _shapes(model, 224)
  assert sum(x.size for x in jax.tree.leaves(variables["params"])) == PUBLISHED_PARAMS["mobilenet_v2"] == 3_504_872
  assert model.inverted_residual_setting == INVERTED_RESIDUAL_SETTING and model.dropout == 0.2
  assert (model.bn_eps, model.bn_momentum) == (1e-5, 0.9)  # torch's BatchNorm2d defaults (momentum 0.1)
  specs = model.block_specs()
  assert len(specs) == 17
  assert [s.out_channels for s in specs] == [16, 24, 24, 32, 32, 32, 64, 64, 64, 64, 96, 96, 96, 160, 160, 160, 320]
  assert [s.strides for s in specs] == [1, 2, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 1, 2, 1, 1, 1]
  assert [s.residual for s in specs].count(True) == 10
  params = variables["params"]
  assert params["stem_conv"]["kernel"].shape == (3, 3, 3, 32)
  assert "expand_conv" not in params["stage_0_block_0"]  # expansion 1: depthwise first
  block = params["stage_1_block_0"]
  assert block["expand_conv"]["kernel"].shape == (1, 1, 16, 96) and block["dw_conv"]["kernel"].shape == (3, 3, 1, 96)
  assert block["project_conv"]["kernel"].shape == (1, 1, 96, 24)
  assert params["last_conv"]["kernel"].shape == (1, 1, 320, 1280) and params["head"]["kernel"].shape == (1280, 1000)
  assert set(variables["batch_stats"]["last_bn"]) == {"mean", "var"}


def test_width_multiplier_rounds_as_torchvision():
  assert [layers.make_divisible(v, 8) for v in (11.2, 32 * 0.5, 24 * 0.35, 1280 * 1.4, 3.0)] == [16, 16, 8, 1792, 8]
  model = MobileNetV2(width_mult=0.35)
  assert model.stem_width() == 16 and model.last_width() == 1280  # the last convolution only grows
  assert MobileNetV2(width_mult=1.4).last_width() == 1792


def test_forward_features_and_head_see_the_pooled_last_map(small):
  model, variables = small
  x = _images(35)  # odd sizes: each stride-2 layer gives ceil(n / 2), as torch's padding 1
  both = lambda v, x: (model.apply(v, x, return_features=True), model.apply(v, x))
  features, logits = jax.jit(both)(variables, x)
  shapes = {k: v.shape for k, v in features.items()}
  assert shapes == {
    "stride_4": (2, 9, 9, 8),
    "stride_8": (2, 5, 5, 16),
    "stride_16": (2, 3, 3, 32),
    "stride_32": (2, 2, 2, 1280),
    "pooled": (2, 1280),
  }
  assert {k: v[-1] for k, v in shapes.items() if k != "pooled"} == model.feature_channels()
  np.testing.assert_allclose(features["pooled"], features["stride_32"].mean(axis=(1, 2)), rtol=1e-6, atol=1e-6)
  assert float(features["stride_32"].min()) >= 0 and float(features["stride_32"].max()) <= 6  # ReLU6
  head = variables["params"]["head"]
  np.testing.assert_allclose(logits, features["pooled"] @ head["kernel"] + head["bias"], rtol=1e-5, atol=1e-5)
  pooled = jax.eval_shape(lambda v, x: model.clone(num_classes=0).apply(v, x), variables, x)
  assert pooled.shape == (2, 1280)  # num_classes=0: the pooled features (the same computation as above)


def test_train_updates_batch_stats_and_dropout_acts_only_in_training(small):
  model, variables = small
  x = _images()
  train = jax.jit(
    lambda v, x, key: model.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": key}),
  )
  out_a, updates = train(variables, x, jax.random.key(1))
  out_b, _ = train(variables, x, jax.random.key(2))
  assert not np.allclose(out_a, out_b)  # dropout before the classifier
  before, after = variables["batch_stats"]["stem_bn"]["mean"], updates["batch_stats"]["stem_bn"]["mean"]
  assert not np.allclose(before, after)
  assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(variables["batch_stats"])
  evaluate = jax.jit(lambda v, x: model.apply(v, x))
  np.testing.assert_array_equal(evaluate(variables, x), evaluate(variables, x))


def test_every_parameter_has_logical_axis_names():
  boxed = _shapes(MobileNetV2(**SMALL), boxed=True)["params"]
  leaves = jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(v, nn.LogicallyPartitioned) and len(v.names) == v.value.ndim for v in leaves)
  block = boxed["stage_1_block_0"]
  assert block["expand_conv"]["kernel"].names == (None, None, "conv_in", "conv_out")
  assert block["dw_conv"]["kernel"].names == (None, None, None, "conv_out")
  assert block["dw_bn"]["scale"].names == ("conv_out",)
  assert boxed["head"]["kernel"].names == ("embed", "classes") and boxed["head"]["bias"].names == ("classes",)


def test_layer_ids_and_weight_decay_mask():
  model = MobileNetV2(**SMALL)
  params = _shapes(model)["params"]
  ids, n = opt.layer_ids(params, model)
  assert n == 7 + 2 == model.num_layer_ids()
  assert ids["stem_conv/kernel"] == ids["stem_bn/scale"] == 0
  blocks = [s.name for s in model.block_specs()]
  assert [ids[f"{b}/dw_conv/kernel"] for b in blocks] == list(range(1, 8))
  assert ids["last_conv/kernel"] == ids["last_bn/bias"] == ids["head/kernel"] == 8
  assert model.layer_id("stage_9_block_0/dw_conv/kernel") is None
  mask = jax.tree_util.tree_flatten_with_path(opt.weight_decay_mask(params, model=model))[0]
  decayed = {"/".join(k.key for k in path) for path, d in mask if d}
  assert decayed == {p for p in ids if p.endswith("kernel")}  # no biases or BatchNorm scales


def test_is_a_detection_backbone():
  backbone = backbones.build_backbone({"model": "mobilenet_v2", "model_args": {"width_mult": 0.35}}).module
  assert backbones.feature_channels(backbone) == {"stride_4": 8, "stride_8": 16, "stride_16": 32, "stride_32": 1280}
  model = detector.RetinaNet(backbone, num_classes=3, fpn_channels=16)
  shapes = _shapes(model, 64)
  assert "stage_6_block_0" in shapes["params"]["backbone"] and "batch_stats" in shapes
  ids, _ = opt.layer_ids(shapes["params"], model)
  assert ids["backbone/stem_conv/kernel"] == 0


def test_setting_rows_from_json_compare_equal():
  listed = MobileNetV2(inverted_residual_setting=[list(row) for row in INVERTED_RESIDUAL_SETTING])
  assert listed == MobileNetV2() and listed.inverted_residual_setting == INVERTED_RESIDUAL_SETTING


def test_bad_setting_is_a_clear_error():
  with pytest.raises(ValueError, match=r"strides must be 1 or 2"):
    MobileNetV2(inverted_residual_setting=((6, 24, 2, 3),)).block_specs()
  with pytest.raises(ValueError, match=r"rows of \(expansion, channels, blocks, stride\)"):
    MobileNetV2(inverted_residual_setting=((6, 24, 2),)).block_specs()
