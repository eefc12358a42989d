"""Detectors on our backbones: output shapes per FPN level, training-mode behaviour of frozen and ordinary
BatchNorm under jit, the parameter description the optimizer reads, and starting from a classifier's backbone."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvm_jax import logical_axes
from lvm_jax.models import layers
from lvm_jax.models.resnet import ResNet
from lvm_jax.models.swin import SwinTransformer
from lvm_jax.tasks.detection import anchors as anchor_ops
from lvm_jax.tasks.detection import detector
from lvm_jax.train import optimizer
from tests.tasks.detection.test_heads import numpy_variables, output_shapes

CANVAS = (72, 104)  # non-square; the stride-16 and -32 maps are 5x7 and 3x4, so the FPN upsamples to odd sizes
TINY_RESNET = dict(stage_sizes=(1, 1, 1, 1), width=8, stage_widths=(4, 4, 8, 8))


def tiny_resnet(frozen_batchnorm=True):
  return detector.resnet_backbone("resnet50", frozen_batchnorm=frozen_batchnorm, **TINY_RESNET)


def tiny_swin():
  return SwinTransformer(
    num_classes=0, image_size=64, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), window_size=4
  )


DETECTORS = {
  "retinanet_v1": lambda backbone: detector.RetinaNet(backbone, 5, version="v1", fpn_channels=32),
  "retinanet_v2": lambda backbone: detector.RetinaNet(backbone, 5, version="v2", fpn_channels=32),
  "fcos": lambda backbone: detector.FCOS(backbone, 5, fpn_channels=32),
}


def images(canvas=CANVAS, batch=2):
  return jnp.asarray(np.random.default_rng(0).standard_normal((batch, *canvas, 3)), jnp.float32)


@pytest.mark.parametrize("backbone, canvas", [(tiny_resnet, CANVAS), (tiny_swin, (64, 96))])
@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_outputs_per_level_match_the_anchors(name, backbone, canvas):
  shapes = output_shapes(DETECTORS[name](backbone()), images(canvas))
  if name == "fcos":
    per_level = [len(a) for a in anchor_ops.fcos_anchors(canvas)]
    assert shapes["centerness"] == [(2, n, 1) for n in per_level]
  else:
    per_level = [len(a) for a in anchor_ops.retinanet_anchors(canvas)]
  sizes = anchor_ops.feature_sizes(canvas)
  assert per_level == [h * w * (1 if name == "fcos" else 9) for h, w in sizes]
  assert shapes["cls_logits"] == [(2, n, 5) for n in per_level]
  assert shapes["box_regression"] == [(2, n, 4) for n in per_level]


def test_backbone_without_the_strides_is_named():
  class Strides4And8(nn.Module):
    @nn.compact
    def __call__(self, x, *, train=False, return_features=False):
      return {"stride_4": x, "stride_8": x}

  with pytest.raises(ValueError, match="missing stride_16, stride_32"):
    jax.eval_shape(detector.FCOS(Strides4And8(), 3).init, jax.random.key(0), images())


def test_frozen_batchnorm_is_batchnorm_with_fixed_statistics():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 3, 3, 6)).astype(np.float32)
  stats = {k: rng.uniform(0.5, 1.5, 6).astype(np.float32) for k in ("scale", "bias", "mean", "var")}
  frozen = layers.FrozenBatchNorm(epsilon=1e-3)
  variables = frozen.init(jax.random.key(0), x)
  assert "params" not in variables and sorted(variables["batch_stats"]) == ["bias", "mean", "scale", "var"]
  ours = frozen.apply({"batch_stats": stats}, x)
  reference = nn.BatchNorm(use_running_average=True, epsilon=1e-3).apply(
    {"params": {k: stats[k] for k in ("scale", "bias")}, "batch_stats": {k: stats[k] for k in ("mean", "var")}}, x
  )
  np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-6)
  # eps 0 (torchvision's COCO RetinaNet v1) divides by sqrt(var) alone.
  unbiased = layers.FrozenBatchNorm(epsilon=0.0).apply({"batch_stats": stats}, x)
  expected = (x - stats["mean"]) / np.sqrt(stats["var"]) * stats["scale"] + stats["bias"]
  np.testing.assert_allclose(unbiased, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("frozen_batchnorm", [True, False])
def test_jitted_training_forward_updates_only_ordinary_batchnorm(frozen_batchnorm):
  model = detector.RetinaNet(tiny_resnet(frozen_batchnorm), 3, fpn_channels=32)
  x = images((32, 48))
  variables = numpy_variables(model, x)
  train = jax.jit(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]))
  outputs, updates = train(variables)
  assert all(bool(jnp.all(jnp.isfinite(o))) for o in jax.tree.leaves(outputs))
  before = variables["batch_stats"]["backbone"]["stage_2_block_0"]["bn1"]
  after = updates["batch_stats"]["backbone"]["stage_2_block_0"]["bn1"]
  if frozen_batchnorm:  # torchvision's FrozenBatchNorm2d: no parameters, and training changes nothing
    assert "stem_bn" not in variables["params"]["backbone"]
    jax.tree.map(np.testing.assert_array_equal, after, before)
  else:  # an ordinary BatchNorm (v2) trains its affine and moves its running statistics
    assert "stem_bn" in variables["params"]["backbone"]
    assert not np.allclose(after["mean"], before["mean"])


def test_param_groups_delegate_to_the_backbone():
  model = DETECTORS["retinanet_v2"](tiny_resnet(frozen_batchnorm=False))
  params = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), images()))["params"]
  ids, count = optimizer.layer_ids(params, model)  # raises if any parameter has no id
  assert count == 6  # the backbone's: stem, 4 stages, last
  assert ids["backbone/stem_conv/kernel"] == 0
  assert ids["backbone/stage_3_block_0/conv2/kernel"] == 4
  assert ids["fpn/lateral_0/kernel"] == ids["head/cls_logits/bias"] == 5
  decays = {
    p: d
    for p, d in zip(optimizer.param_paths(params), jax.tree.leaves(optimizer.weight_decay_mask(params, model=model)))
  }
  assert decays["head/cls_tower/conv_0/kernel"] and decays["backbone/stage_0_block_0/conv1/kernel"]
  assert not decays["head/cls_tower/norm_0/scale"] and not decays["fpn/p6/bias"]
  assert not decays["backbone/stage_0_block_0/bn1/scale"]
  swin = detector.FCOS(tiny_swin(), 3)
  assert any(re.search(p, "backbone/stage_0_block_0/attn/relative_position_bias_table") for p in swin.no_weight_decay())


def test_every_parameter_carries_logical_axis_names():
  model = DETECTORS["retinanet_v2"](tiny_resnet(frozen_batchnorm=False))
  boxed = jax.eval_shape(model.init, jax.random.key(0), images())["params"]
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert len(leaves) > 50
  for leaf in leaves:  # the trainer's DP / FSDP strategies place parameters by these names
    assert isinstance(leaf, nn.LogicallyPartitioned), leaf
    assert len(leaf.names) == len(leaf.value.shape)
    assert set(leaf.names) - {None} <= set(logical_axes.NAMES)


def test_frozen_backbone_patterns_follow_torchvisions_trainable_layers():
  paths = [
    "backbone/stem_conv/kernel",
    "backbone/stage_0_block_2/conv1/kernel",
    "backbone/stage_1_block_0/conv1/kernel",
  ]
  paths += ["backbone/stage_3_block_2/conv3/kernel", "fpn/p6/kernel", "head/cls_logits/kernel"]

  def frozen(trainable_layers):
    patterns = detector.frozen_backbone_patterns(trainable_layers)
    return [p for p in paths if any(re.search(rx, p) for rx in patterns)]

  assert frozen(3) == paths[:2]  # torchvision's default: conv1 and layer1 frozen
  assert frozen(5) == []
  assert frozen(0) == paths[:4]
  with pytest.raises(ValueError, match="trainable_layers"):
    detector.frozen_backbone_patterns(6)


def test_load_backbone_from_a_classifier():
  classifier = ResNet(num_classes=10, **TINY_RESNET)
  classifier_vars = numpy_variables(classifier, images(), seed=1)
  model = DETECTORS["fcos"](tiny_resnet(frozen_batchnorm=True))
  fresh = numpy_variables(model, images())
  loaded = detector.load_backbone(fresh, classifier_vars)
  np.testing.assert_array_equal(
    loaded["params"]["backbone"]["stem_conv"]["kernel"], classifier_vars["params"]["stem_conv"]["kernel"]
  )
  # The frozen norm's scale moves from the classifier's params to batch_stats; the statistics stay there.
  for key, collection in (("scale", "params"), ("var", "batch_stats")):
    np.testing.assert_array_equal(
      loaded["batch_stats"]["backbone"]["stage_1_block_0"]["bn2"][key],
      classifier_vars[collection]["stage_1_block_0"]["bn2"][key],
    )
  np.testing.assert_array_equal(
    loaded["params"]["head"]["cls_logits"]["kernel"], fresh["params"]["head"]["cls_logits"]["kernel"]
  )
  wider = ResNet(num_classes=10, **{**TINY_RESNET, "width": 16})
  with pytest.raises(ValueError, match="stem_conv/kernel: backbone has"):
    detector.load_backbone(fresh, nn.meta.unbox(jax.eval_shape(wider.init, jax.random.key(0), images())))
