"""RetinaNet and FCOS heads: torchvision's output layout per level, its initialisation, and each version's layers."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvm_jax.tasks.detection import heads

SIZES = ((5, 7), (3, 4), (2, 2))  # odd, non-square levels
CHANNELS = 32  # the least GroupNorm(32) takes


def pyramid(batch=2, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.standard_normal((batch, h, w, CHANNELS)).astype(np.float32) for h, w in SIZES]


def numpy_variables(model, *inputs, seed=0):
  """The model's variables drawn by numpy, as jax.eval_shape(model.init) shapes them: kernels at He scale, norm
  scales and variances in [0.5, 1.5], the rest N(0, 0.1). (jax's random initialisers take seconds to compile on
  CPU; tests that only need some weights use these.)"""
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), *inputs))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == "kernel":
      return rng.normal(0, np.sqrt(2 / np.prod(leaf.shape[:-1])), leaf.shape).astype(np.float32)
    if name in ("scale", "var"):
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    return rng.normal(0, 0.1, leaf.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def output_shapes(model, *inputs):
  """{key: [shape per level]} of a head's or detector's outputs, traced without running (jax.eval_shape)."""
  outputs = jax.eval_shape(model.init_with_output, jax.random.key(0), *inputs)[0]
  return {key: [o.shape for o in levels] for key, levels in outputs.items()}


def param_shapes(model, *inputs):
  return nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), *inputs))["params"]


def test_flatten_level_is_torchvisions_layout():
  batch, h, w, anchors, k = 2, 3, 4, 3, 5
  torch_nchw = np.random.default_rng(0).standard_normal((batch, anchors * k, h, w)).astype(np.float32)
  # torchvision: view(N, A, K, H, W) -> permute(0, 3, 4, 1, 2) -> reshape(N, H*W*A, K)
  expected = torch_nchw.reshape(batch, anchors, k, h, w).transpose(0, 3, 4, 1, 2).reshape(batch, -1, k)
  ours = heads.flatten_level(jnp.asarray(torch_nchw.transpose(0, 2, 3, 1)), k)
  assert ours.dtype == jnp.float32
  np.testing.assert_array_equal(ours, expected)


def test_retinanet_init_is_torchvisions():
  head = heads.RetinaNetHead(num_classes=6, num_anchors=9)
  # An rbg key: the same initialisers, drawn by a generator that compiles in a third of threefry's time on CPU.
  params = nn.meta.unbox(jax.jit(head.init)(jax.random.key(0, impl="rbg"), pyramid()))["params"]
  # Every class starts at probability 0.01 (the bias), weights normal(0.01), other biases 0.
  np.testing.assert_allclose(params["cls_logits"]["bias"], -math.log(99.0), rtol=1e-6)
  np.testing.assert_allclose(np.std(params["cls_tower"]["conv_0"]["kernel"]), 0.01, rtol=0.05)
  np.testing.assert_allclose(np.std(params["box_regression"]["kernel"]), 0.01, rtol=0.05)
  np.testing.assert_array_equal(params["box_regression"]["bias"], 0.0)
  np.testing.assert_array_equal(params["box_tower"]["conv_3"]["bias"], 0.0)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_retinanet_head_outputs_and_layers(version):
  head = heads.RetinaNetHead(num_classes=6, num_anchors=9, version=version)
  shapes = output_shapes(head, pyramid())
  assert shapes == {
    "cls_logits": [(2, h * w * 9, 6) for h, w in SIZES],
    "box_regression": [(2, h * w * 9, 4) for h, w in SIZES],
  }
  params = param_shapes(head, pyramid())
  assert params["cls_logits"]["kernel"].shape == (3, 3, CHANNELS, 9 * 6)
  tower = params["box_tower"]
  if version == "v1":  # conv with bias + ReLU
    assert sorted(tower) == ["conv_0", "conv_1", "conv_2", "conv_3"]
    assert sorted(tower["conv_0"]) == ["bias", "kernel"]
  else:  # conv without bias + GroupNorm(32) + ReLU
    assert sorted(tower) == [f"{kind}_{i}" for kind in ("conv", "norm") for i in range(4)]
    assert sorted(tower["conv_0"]) == ["kernel"] and sorted(tower["norm_0"]) == ["bias", "scale"]


def test_fcos_head_outputs_and_layers():
  head = heads.FCOSHead(num_classes=6)
  features = pyramid()
  assert output_shapes(head, features) == {
    "cls_logits": [(2, h * w, 6) for h, w in SIZES],
    "box_regression": [(2, h * w, 4) for h, w in SIZES],
    "centerness": [(2, h * w, 1) for h, w in SIZES],
  }
  variables = numpy_variables(head, features)
  outputs = jax.jit(head.apply)(variables, features)
  # FCOS's distances go through a ReLU (torchvision's FCOSRegressionHead); centerness stays a logit.
  boxes = np.concatenate([np.ravel(o) for o in outputs["box_regression"]])
  centerness = np.concatenate([np.ravel(o) for o in outputs["centerness"]])
  assert boxes.min() == 0.0 and boxes.max() > 0.0
  assert centerness.min() < 0.0 < centerness.max()
  # Its tower convolutions keep a bias before the GroupNorm.
  assert sorted(variables["params"]["cls_tower"]["conv_2"]) == ["bias", "kernel"]
  assert "norm_3" in variables["params"]["box_tower"]


def test_head_weights_are_shared_across_levels():
  features = pyramid(batch=1)
  head = heads.RetinaNetHead(num_classes=3, num_anchors=2)
  variables = numpy_variables(head, features)
  # The same level fed alone gives the same outputs as within the pyramid: one set of weights for every level.
  alone, together = jax.jit(lambda v: (head.apply(v, features[1:2]), head.apply(v, features)))(variables)
  np.testing.assert_allclose(alone["cls_logits"][0], together["cls_logits"][1], atol=1e-5)


def test_bad_settings_are_named():
  with pytest.raises(ValueError, match="divisible by 32"):
    heads.FCOSHead(num_classes=3).init(jax.random.key(0), [jnp.zeros((1, 4, 4, 16))])
  with pytest.raises(ValueError, match="version"):
    heads.RetinaNetHead(num_classes=3, version="v3").init(jax.random.key(0), pyramid())
  with pytest.raises(ValueError, match="prior_probability"):
    heads.prior_bias(1.5)
