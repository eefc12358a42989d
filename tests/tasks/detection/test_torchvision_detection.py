"""torchvision's RetinaNet v1/v2 and FCOS state dicts converted to our detectors give torchvision's FPN maps, head
outputs and final detections (reference fixtures from tests/fixtures/torchvision/make_detector_fixtures.py, made
with torchvision 0.29.1 and weights rebuilt here from their names and shapes)."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from lvm_jax import WeightsMismatchError
from lvm_jax.models import registry
from lvm_jax.tasks.detection import anchors as anchor_ops
from lvm_jax.tasks.detection import postprocess
from lvm_jax.weights import files
from lvm_jax.weights import torchvision_detection as tvd
from tests.fixtures.torchvision.random_state_dict import random_state_dict

DETECTORS = Path(__file__).resolve().parents[2] / "fixtures" / "torchvision" / "detectors"
MANIFEST = json.loads((DETECTORS / "MANIFEST.json").read_text())
ARCHS = ("retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2", "fcos_resnet50_fpn")
LEVELS = 5
HEAD_TOLERANCE = 1e-4  # largest |ours - torchvision's| per value; measured: 7e-6 (values up to 11)
# A box is exp(regression) times an anchor of up to 724 pixels, so rounding in the regression moves it most: measured
# 3e-4 pixels (make_detector_fixtures.py checks the detections stay the same when the outputs move by 3e-5).
BOX_TOLERANCE = 2e-3


def reference(arch: str) -> dict:
  with np.load(DETECTORS / f"{arch}.npz") as data:
    return dict(data)


def pyramid_and_heads(module, images):
  pyramid = module.pyramid(images)
  return pyramid, module.head(pyramid)


def assert_same_detections(arch: str, outputs: dict, ref: dict):
  """postprocess.py on our head outputs and the anchors for the canvas gives torchvision's detections."""
  settings = MANIFEST[arch]["postprocess"]
  canvas = tuple(settings["image_size"])
  family_anchors = anchor_ops.fcos_anchors if arch.startswith("fcos") else anchor_ops.retinanet_anchors
  anchors = family_anchors(canvas)
  for level in range(LEVELS):  # torchvision's AnchorGenerator on this canvas, strides canvas // feature size
    np.testing.assert_array_equal(anchors[level], ref[f"anchors_{level}"])
  detect = postprocess.fcos_detections if arch.startswith("fcos") else postprocess.retinanet_detections
  ours = detect(
    outputs,
    anchors,
    canvas,
    score_threshold=settings["score_thresh"],
    topk_candidates=settings["topk_candidates"],
    nms_threshold=settings["nms_thresh"],
    detections_per_img=settings["detections_per_img"],
  )
  np.testing.assert_array_equal(ours["count"], ref["num_detections"])
  for image, count in enumerate(ref["num_detections"]):
    np.testing.assert_array_equal(ours["labels"][image, :count], ref["labels"][image, :count])
    np.testing.assert_allclose(ours["scores"][image, :count], ref["scores"][image, :count], atol=1e-5)
    np.testing.assert_allclose(ours["boxes"][image, :count], ref["boxes"][image, :count], atol=BOX_TOLERANCE)


@pytest.mark.parametrize("arch", ARCHS)
def test_converted_detector_matches_torchvision(arch, tmp_path):
  state = random_state_dict(MANIFEST[arch]["state_dict"])
  if arch == ARCHS[0]:  # once through a file (a second each way for 136 MB), the architecture read off it
    save_file(state, str(tmp_path / "model.safetensors"))
    model, variables = tvd.load_torchvision_detector(tmp_path / "model.safetensors")
  else:
    model, variables = tvd.convert_state_dict(state, arch)
  assert model.num_classes == 91

  ref = reference(arch)
  pyramid, outputs = jax.jit(lambda v, x: model.apply(v, x, method=pyramid_and_heads))(variables, ref["input"])
  for level in range(LEVELS):
    np.testing.assert_allclose(pyramid[level], ref[f"fpn_{level}"], atol=HEAD_TOLERANCE, rtol=0)
    for key in outputs:
      np.testing.assert_allclose(outputs[key][level], ref[f"{key}_{level}"], atol=HEAD_TOLERANCE, rtol=0)
  assert sorted(outputs) == sorted(["cls_logits", "box_regression"] + (["centerness"] if "fcos" in arch else []))
  assert_same_detections(arch, outputs, ref)

  # The same table converts back: torchvision's state dict, less BatchNorm's counters.
  back = tvd.to_torchvision_state_dict(model, variables, arch)
  assert sorted(back) == sorted(k for k in state if not k.endswith("num_batches_tracked"))
  for name, value in back.items():
    np.testing.assert_array_equal(value, state[name], err_msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_parameter_counts_are_torchvisions(arch):
  variables = registry.abstract_variables(tvd.build_detector(arch))
  count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(variables["params"]))
  # torchvision's published num_params of its COCO weights (FrozenBatchNorm2d buffers are not parameters).
  assert count == MANIFEST[arch]["published_num_params"] == MANIFEST[arch]["num_params"]
  if arch == "retinanet_resnet50_fpn":
    assert count == 34_014_999


def test_coco_categories_are_torchvisions():
  assert list(tvd.COCO_CATEGORIES) == MANIFEST["coco_categories"]
  assert len(tvd.COCO_CATEGORIES) == 91 and tvd.COCO_CATEGORIES[1] == "person" and tvd.COCO_CATEGORIES[12] == "N/A"


def zeros_state_dict(arch: str) -> dict:
  """The state dict's shapes without memory (read-only broadcast zeros): enough for conversion errors."""
  return {k: np.broadcast_to(np.float32(0), shape) for k, shape in MANIFEST[arch]["state_dict"].items()}


def test_architecture_is_read_off_the_names():
  for arch in ARCHS:
    assert tvd.infer_architecture(MANIFEST[arch]["state_dict"]) == arch
  with pytest.raises(WeightsMismatchError, match="resnet.pth has no head.classification_head.cls_logits.weight"):
    tvd.infer_architecture({"fc.weight": np.zeros((2, 2))}, "resnet.pth")
  assert files.is_state_dict_file("https://download.pytorch.org/models/fcos_resnet50_fpn_coco-99b0c9b7.pth")
  assert files.is_state_dict_file("model.safetensors") and not files.is_state_dict_file("google/vit-base-patch16-224")


def test_mismatches_are_named():
  arch = "fcos_resnet50_fpn"
  state = zeros_state_dict(arch)
  del state["backbone.body.layer3.2.bn1.running_var"]
  state["backbone.fpn.layer_blocks.1.0.weight"] = np.zeros((256, 128, 3, 3), np.float32)
  state["head.regression_head.extra.weight"] = np.zeros((4,), np.float32)
  with pytest.raises(WeightsMismatchError) as error:
    tvd.convert_state_dict(state, arch, source="checkpoint.pth")
  message = str(error.value)
  assert "checkpoint.pth does not fit" in message
  assert "missing backbone.body.layer3.2.bn1.running_var" in message
  assert "shape mismatch for backbone.fpn.layer_blocks.1.0.weight: checkpoint has (256, 128, 3, 3)" in message
  assert "unexpected head.regression_head.extra.weight" in message


def test_num_classes_read_off_the_checkpoint():
  arch = "retinanet_resnet50_fpn"
  state = zeros_state_dict(arch)
  state["head.classification_head.cls_logits.weight"] = np.zeros((9 * 5, 256, 3, 3), np.float32)
  state["head.classification_head.cls_logits.bias"] = np.zeros((9 * 5,), np.float32)
  model, variables = tvd.convert_state_dict(state, arch)
  assert model.num_classes == 5 and variables["params"]["head"]["cls_logits"]["kernel"].shape == (3, 3, 256, 45)
  with pytest.raises(WeightsMismatchError, match="shape mismatch for head.classification_head.cls_logits.weight"):
    tvd.convert_state_dict(state, arch, num_classes=7)
  state["head.classification_head.cls_logits.weight"] = np.zeros((46, 256, 3, 3), np.float32)
  with pytest.raises(WeightsMismatchError, match="46 outputs, not a multiple of the 9 anchors"):
    tvd.convert_state_dict(state, arch)


def test_state_dict_files(tmp_path):
  torch = pytest.importorskip("torch")
  tensors = {"a.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a.bias": torch.ones(2)}
  torch.save(tensors, tmp_path / "model.pth")
  read = files.read_state_dict(tmp_path / "model.pth")
  np.testing.assert_array_equal(read["a.weight"], np.arange(6, dtype=np.float32).reshape(2, 3))
  with pytest.raises(ValueError, match="expected a .safetensors file"):
    files.read_state_dict(tmp_path / "model.ckpt")
  with pytest.raises(ValueError, match="Unknown torchvision detector 'retinanet_resnet101_fpn'"):
    tvd.build_detector("retinanet_resnet101_fpn")
