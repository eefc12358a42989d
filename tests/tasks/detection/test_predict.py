"""Predicting with a torchvision detector checkpoint: `main.py --mode=predict --pretrained=<state dict> --image=F`,
on torchvision's transform (a trained run's predict is in test_task.py)."""

import json

import numpy as np
import PIL.Image
import pytest
import skimage.data
from absl import app

from lvm_jax.tasks.detection import predict
from lvm_jax.weights import files, torchvision_detection
from tests.notebooks import local_assets


@pytest.mark.parametrize(
  "height,width,resized,canvas",
  [
    # GeneralizedRCNNTransform(800, 1333): the shorter side to 800, sides rounded down, padded to multiples of 32.
    (480, 640, (800, 1066), (800, 1088)),
    (640, 480, (1066, 800), (1088, 800)),
    # 800 / 100 would make the longer side 16,000: the longer becomes 1333 instead (x 0.6665 -> 66 rows).
    (100, 2000, (66, 1333), (96, 1344)),
  ],
)
def test_images_are_put_on_the_canvas_torchvision_gives_them(height, width, resized, canvas):
  image = np.full((height, width, 3), 255, np.uint8)
  example = predict.prepare_like_torchvision(image, *predict.TORCHVISION_RESIZE)
  assert example["image"].shape == canvas + (3,)
  rows, cols = resized
  assert example["image"][: rows - 1, : cols - 1].min() == 255  # the image (its last row/column antialiased)
  assert np.all(example["image"][rows:] == 0) and np.all(example["image"][:, cols:] == 0)  # zero padding
  np.testing.assert_allclose(example["scale"], min(800 / min(height, width), 1333 / max(height, width)), rtol=1e-6)


@pytest.fixture(scope="module")
def retinanet_file(tmp_path_factory):
  """torchvision's retinanet_resnet50_fpn state dict layout with the parity fixtures' stand-in weights."""
  folder = tmp_path_factory.mktemp("torchvision")
  local_assets.write_torchvision_retinanet(folder)
  return folder / "retinanet_resnet50_fpn_coco.safetensors"


def test_main_predicts_and_draws_with_a_torchvision_checkpoint(run_main, retinanet_file, tmp_path):
  photo = tmp_path / "chelsea.jpg"
  PIL.Image.fromarray(skimage.data.chelsea()).save(photo)  # 300 x 451: on an 800 x 1216 canvas
  drawn = tmp_path / "boxes.png"
  args = [f"--pretrained={retinanet_file}", f"--image={photo}", f"--output={drawn}", "--min_score=0.06", "--json"]
  detections = json.loads(run_main("--mode=predict", *args))
  # The stand-in weights score a few anchors above 0.05 (random_state_dict.py), each named by its COCO id.
  assert detections and all(d["score"] >= 0.06 for d in detections)
  assert sorted(d["score"] for d in detections) == sorted((d["score"] for d in detections))
  for d in detections:
    assert d["label"] == torchvision_detection.COCO_CATEGORIES[d["index"]]
    x1, y1, x2, y2 = d["box"]
    assert 0 <= x1 <= x2 <= 451 and 0 <= y1 <= y2 <= 300
  assert PIL.Image.open(drawn).size == (451, 300)
  assert not np.array_equal(np.asarray(PIL.Image.open(drawn).convert("RGB")), skimage.data.chelsea())


def test_checkpoints_that_are_not_detectors_are_named(run_main, tmp_path):
  path = tmp_path / "resnet.safetensors"
  files.write_safetensors({"fc.weight": np.zeros((2, 2), np.float32)}, path)
  with pytest.raises(SystemExit) as exit_info:
    run_main("--mode=predict", f"--pretrained={path}", "--image=x.jpg")
  assert (
    exit_info.value.code == f"error: {path} has no {torchvision_detection.CLS_LOGITS}: it is not a torchvision "
    "RetinaNet / FCOS state dict."
  )
  with pytest.raises(app.UsageError, match="--output and --min_score are for detectors"):
    run_main("--mode=predict", "--pretrained=google/vit-base-patch16-224", "--image=x.jpg", "--output=boxes.png")
