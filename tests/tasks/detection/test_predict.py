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

PHOTO_FIXTURE = (
  local_assets.REPO / "tests" / "fixtures" / "torchvision" / "detectors" / "retinanet_resnet50_fpn_photo.npz"
)


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
  example = predict.torchvision_transform(np.full((height, width, 3), 255, np.uint8), *predict.TORCHVISION_RESIZE)
  assert example["image"].shape == canvas + (3,) and tuple(example["extent"]) == resized
  rows, cols = resized
  white = (1 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  np.testing.assert_allclose(example["image"][:rows, :cols], np.broadcast_to(white, (rows, cols, 3)), rtol=1e-5)
  assert np.all(example["image"][rows:] == 0) and np.all(example["image"][:, cols:] == 0)  # zeros after normalizing
  np.testing.assert_allclose(example["scale"], [cols / width, rows / height] * 2, rtol=1e-6)


@pytest.mark.parametrize("height,width,sizes", [(37, 53, (64, 100)), (90, 70, (40, 60)), (30, 200, (64, 100))])
def test_the_transform_is_torchvisions_torch_ops(height, width, sizes):
  # torchvision's GeneralizedRCNNTransform in eval mode is these torch ops (normalize, then interpolate with
  # scale_factor and recompute_scale_factor=True, bilinear, align_corners=False, then zero padding to 32).
  torch = pytest.importorskip("torch")
  image = np.random.default_rng(height).integers(0, 256, (height, width, 3), dtype=np.uint8)
  example = predict.torchvision_transform(image, *sizes)
  x = torch.from_numpy(image).permute(2, 0, 1).float() / 255
  x = (x - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
  factor = min(sizes[0] / min(height, width), sizes[1] / max(height, width))
  options = dict(scale_factor=factor, mode="bilinear", recompute_scale_factor=True, align_corners=False)
  resized = torch.nn.functional.interpolate(x[None], **options)[0].permute(1, 2, 0).numpy()
  assert tuple(example["extent"]) == resized.shape[:2]
  np.testing.assert_allclose(
    example["image"][: resized.shape[0], : resized.shape[1]], resized, atol=1e-5
  )  # float32 rounding


@pytest.fixture(scope="module")
def retinanet_file(tmp_path_factory):
  """torchvision's retinanet_resnet50_fpn state dict layout with the parity fixtures' stand-in weights."""
  folder = tmp_path_factory.mktemp("torchvision")
  local_assets.write_torchvision_retinanet(folder)
  return folder / "retinanet_resnet50_fpn_coco.safetensors"


def test_detector_on_a_photo_is_torchvisions_whole_eval_forward(retinanet_file):
  # torchvision's RetinaNet on the photo: transform at 800 / 1333, network, post-processing, boxes mapped back
  # (tests/fixtures/torchvision/make_detector_fixtures.py, with the same stand-in weights).
  with np.load(PHOTO_FIXTURE) as data:
    expected = dict(data)
  found = predict.Detector.from_torchvision(retinanet_file)(skimage.data.chelsea())
  assert len(found) == len(expected["scores"]) == 300  # the cap binds: the order of the last ones counts too
  np.testing.assert_array_equal([d.index for d in found], expected["labels"])
  np.testing.assert_allclose([d.score for d in found], expected["scores"], atol=1e-5)  # measured 7e-7
  np.testing.assert_allclose([d.box for d in found], expected["boxes"], atol=2e-3)  # pixels; measured 1.5e-4


def test_main_predicts_and_draws_with_a_torchvision_checkpoint(run_main, retinanet_file, tmp_path):
  photo = tmp_path / "chelsea.jpg"
  PIL.Image.fromarray(skimage.data.chelsea()).save(photo)  # 300 x 451: on an 800 x 1216 canvas
  drawn = tmp_path / "boxes.png"
  args = [f"--pretrained={retinanet_file}", f"--image={photo}", f"--output={drawn}", "--min_score=0.06", "--json"]
  detections = json.loads(run_main("--mode=predict", *args))
  # The stand-in weights score a few anchors above 0.05 (random_state_dict.py), each named by its COCO id.
  assert detections and all(d["score"] >= 0.06 for d in detections)
  assert [d["score"] for d in detections] == sorted((d["score"] for d in detections), reverse=True)  # best first
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
  # Not a detector, so read as a classifier, and neither: the one line names the file and what each would have.
  message = exit_info.value.code
  assert message.startswith(f"error: {path} is not a torchvision classifier") and "fc.weight" in message
  assert torchvision_detection.CLS_LOGITS in message
  with pytest.raises(app.UsageError, match="--output and --min_score are for detectors"):
    run_main("--mode=predict", "--pretrained=google/vit-base-patch16-224", "--image=x.jpg", "--output=boxes.png")
