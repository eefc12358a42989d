"""Detection through the one trainer: configs/detection_digits.py:runlocal with the FCOS head trained, evaluated
with COCO AP, resumed after SIGTERM bit for bit, predicted from its workdir (printed and drawn); the COCO RetinaNet
v2 recipe's steps with the same losses on 1 and 8 devices under DP and FSDP (RetinaNet v1 trains in notebook 05);
config errors before anything compiles."""

import json
import os
import pathlib

import jax
import numpy as np
import PIL.Image
import pytest

from lvm_jax import normalization
from lvm_jax.data import pipeline
from lvm_jax.parallel import create_mesh, get_strategy
from lvm_jax.tasks.detection import model_builder
from lvm_jax.tasks.detection.task import Detection, DetectorSpec
from lvm_jax.train import checkpoints as checkpoints_lib
from lvm_jax.train import config as config_lib
from lvm_jax.train import reporting, setup, trainer
from lvm_jax.train.program import TrainProgram
from tests.train import trainer_cases
from tests.train.trainer_cases import flat, shared_compile_cache, sigterm_after_step

REPO = pathlib.Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
  with (
    pytest.MonkeyPatch.context() as monkeypatch,
    shared_compile_cache(str(tmp_path_factory.mktemp("jax_cache")), monkeypatch),
  ):
    yield


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  from lvm_jax.data import digits_detection

  data_dir = str(tmp_path_factory.mktemp("tfds"))
  digits_detection.prepare(data_dir)
  return data_dir


def recipe(data_dir, arg="runlocal", name="detection_digits", **overrides):
  return trainer_cases.recipe(data_dir, arg, REPO / "configs" / f"{name}.py", **overrides)


FCOS = "runlocal,head=fcos"  # centerness, center sampling, its own post-processing thresholds


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
  """The digits recipe's FCOS runlocal trained to its end: (workdir, final metrics)."""
  workdir = str(tmp_path_factory.mktemp("fcos"))
  return workdir, trainer.train_and_evaluate(recipe(data_dir, FCOS), workdir)


def test_runlocal_trains_and_evaluates_with_coco_metrics(trained):
  workdir, final = trained
  assert set(final["eval"]) == set(Detection.eval_metrics)
  assert all(-1.0 <= v <= 1.0 for v in final["eval"].values())
  lines = reporting.read_metrics(workdir)
  train = [m for m in lines if m["split"] == "train"]
  assert [m["step"] for m in train] == [2, 4]
  assert all(np.isfinite(m[k]) for m in train for k in ("loss", "classification", "bbox_regression", "bbox_ctrness"))
  assert [m["step"] for m in lines if m["split"] == "eval"] == [4]
  assert json.load(open(os.path.join(workdir, "class_names.json"))) == [str(i) for i in range(10)]
  model, spec, normalize = model_builder.load_description(workdir)
  assert (spec.head, spec.num_classes, spec.anchor_size) == ("fcos", 10, 16)
  assert normalize is not None and type(model).__name__ == "FCOS"


def test_eval_mode_gives_the_final_metrics_again(trained, data_dir):
  workdir, final = trained
  assert trainer.evaluate(recipe(data_dir, FCOS), workdir)["eval"] == pytest.approx(final["eval"])


def test_predict_prints_and_draws_the_detections_of_a_trained_run(trained, data_dir, tmp_path):
  workdir, _ = trained
  image = sorted(pathlib.Path(data_dir).glob("digits_detection/*/test/*"))[0]
  printed = Detection.predict(workdir, str(image), as_json=True, output=str(tmp_path / "boxes.png"))
  detections = json.loads(printed)
  assert isinstance(detections, list)
  for d in detections:
    assert d["label"] in [str(i) for i in range(10)] and 0.0 <= d["score"] <= 1.0
    x1, y1, x2, y2 = d["box"]
    width, height = PIL.Image.open(image).size
    assert 0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height
  drawn = np.asarray(PIL.Image.open(tmp_path / "boxes.png").convert("RGB"))
  assert drawn.shape[:2] == np.asarray(PIL.Image.open(image)).shape[:2]


def test_sigterm_then_restart_ends_bit_for_bit_as_an_uninterrupted_run(data_dir, tmp_path, trained):
  reference, _ = trained
  workdir = str(tmp_path / "interrupted")
  with sigterm_after_step(workdir, 2) as sent:
    first = trainer.train_and_evaluate(recipe(data_dir, FCOS), workdir)
  assert sent.is_set() and first == {}
  trainer.train_and_evaluate(recipe(data_dir, FCOS), workdir)

  def final_state(w):
    with checkpoints_lib.CheckpointManager(os.path.join(w, "checkpoints"), async_save=False) as checkpoints:
      return flat(checkpoints.restore_arrays(4))

  expected, resumed = final_state(reference), final_state(workdir)
  assert expected.keys() == resumed.keys()
  for key in expected:
    np.testing.assert_array_equal(resumed[key], expected[key], err_msg=key)


def test_coco_v2_recipe_gives_one_devices_losses_on_eight_devices_under_dp_and_fsdp(data_dir):
  # The COCO RetinaNet v2 recipe's runlocal (GroupNorm heads, GIoU, large-scale jitter, step decay) trained for two
  # steps on 1 device and on 8 under DP and FSDP.
  config = config_lib.validate(recipe(data_dir, "model=retinanet_v2,runlocal", "detection_coco"))
  run = setup.build(config)
  assert (run.task.spec.head, run.task.spec.version, run.config.optimizer.schedule.decay) == (
    "retinanet",
    "v2",
    "steps",
  )
  batches = list(pipeline.train_dataset(run.train_source, config.data.pp_train, global_batch_size=16, seed=0).take(2))
  batches = [{k: np.asarray(v) for k, v in b.items()} for b in batches]

  def losses(mesh_shape, strategy, devices):
    program = TrainProgram.create(
      task=run.task,
      model=run.model,
      optimizer=dict(run.config.optimizer, schedule=dict(run.config.optimizer.schedule, total_steps=4)),
      mesh=create_mesh(mesh_shape, devices),
      strategy=get_strategy(strategy),
      input_shape=run.input_shape,
      normalize=run.step_config.normalize,
    )
    state, step, out = program.new_state(), program.train_step(), []
    for batch in batches:
      state, metrics = step(state, jax.device_put(batch, program.batch_sharding))
      out.append({k: float(metrics[k]) for k in ("loss", *run.task.train_metrics)})
    return out

  one = losses({"data": 1}, "dp", jax.devices()[:1])
  for mesh_shape, strategy in (({"data": 8}, "dp"), ({"fsdp": 8}, "fsdp")):
    for a, b in zip(one, losses(mesh_shape, strategy, jax.devices())):
      assert a.keys() == b.keys()
      for key in a:
        assert b[key] == pytest.approx(a[key], rel=2e-5, abs=1e-6), (strategy, key)


def test_classification_data_is_a_config_error(data_dir):
  config = recipe(data_dir, data__train=dict(kind="digits", split="train", data_dir=data_dir))
  with pytest.raises(ValueError, match="task='detection' needs detection data: data.train"):
    setup.build(config)


def test_a_pp_without_boxes_is_a_config_error(data_dir):
  config = recipe(data_dir, data__pp_train="det_decode|det_resize_pad(64)")
  with pytest.raises(ValueError, match="det_pad_boxes"):
    setup.build(config)


def test_a_torchvision_checkpoint_starts_the_whole_network_with_a_new_class_layer(data_dir, tmp_path):
  from lvm_jax.weights import torchvision_detection
  from tests.notebooks import local_assets

  local_assets.write_torchvision_retinanet(tmp_path)  # retinanet_resnet50_fpn's layout, 91 COCO outputs
  weights = str(tmp_path / "retinanet_resnet50_fpn_coco.safetensors")
  config = config_lib.validate(recipe(data_dir, detection__weights=weights, detection__anchor_size=32))
  start = model_builder.build(config, DetectorSpec(num_classes=10, anchor_size=32))  # the digits' 10 classes
  _, coco = torchvision_detection.load_torchvision_detector(weights)
  assert start.model.num_classes == 10 and start.mean_std == normalization.IMAGENET_DEFAULT
  started, converted = flat(start.variables), flat(coco)
  assert started.keys() == converted.keys()
  for key in started:
    if "cls_logits" in key:  # 9 anchors x 10 classes, initialised as the head initialises it
      assert started[key].shape[-1] == 90 and converted[key].shape[-1] == 9 * 91
    else:
      np.testing.assert_array_equal(started[key], converted[key], err_msg=key)
  with pytest.raises(ValueError, match="is a retinanet v1 checkpoint but the config asks for detection.head='fcos'"):
    model_builder.build(config, DetectorSpec(head="fcos", num_classes=10))


def test_unknown_head_is_a_config_error(data_dir):
  with pytest.raises(ValueError, match="detection.head='yolo'"):
    setup.build(recipe(data_dir, detection__head="yolo"))


def test_anchor_sizes_follow_torchvision_from_the_smallest():
  from lvm_jax.tasks.detection import anchors

  torchvision = DetectorSpec(anchor_size=32).anchors((96, 128))
  for ours, theirs in zip(torchvision, anchors.retinanet_anchors((96, 128))):
    np.testing.assert_array_equal(ours, theirs)
  for ours, theirs in zip(DetectorSpec(head="fcos").anchors((96, 128)), anchors.fcos_anchors((96, 128))):
    np.testing.assert_array_equal(ours, theirs)
  first = DetectorSpec(anchor_size=16).anchors((128, 128))[0][:9]  # P3's anchors at its first location
  sides = np.sqrt((first[:, 2] - first[:, 0]) * (first[:, 3] - first[:, 1]))
  np.testing.assert_allclose(np.sort(sides), np.repeat([16, 20, 25], 3), atol=1.0)  # int(16 * 2**(k/3))


@pytest.mark.parametrize(
  "name, arg", [("detection_coco", m) for m in ("retinanet", "retinanet_v2", "fcos")] + [("detection_kitti", None)]
)
def test_published_recipes_validate_and_runlocal_is_the_same_recipe(name, arg):
  full = config_lib.validate(recipe("", f"model={arg}" if arg else None, name))
  local = config_lib.validate(recipe("", f"model={arg},runlocal" if arg else "runlocal", name))
  assert full.task == local.task == "detection"
  assert (full.detection.head, full.detection.version) == (local.detection.head, local.detection.version)
  assert [op.split("(")[0] for op in full.data.pp_train.split("|")] == [
    op.split("(")[0] for op in local.data.pp_train.split("|")
  ]
  assert full.optimizer.name == local.optimizer.name == "sgd"
  assert full.optimizer.schedule.decay == local.optimizer.schedule.decay == "steps"
  assert full.data.train.kind == "tfds_detection" and full.data.batch_size == 16
  if name == "detection_coco":
    assert full.pretrained == "timm/resnet50.tv_in1k" and full.num_epochs == 26
    np.testing.assert_allclose(full.optimizer.schedule.boundaries, (16 / 26, 22 / 26))
  else:
    assert full.detection.weights.endswith("retinanet_resnet50_fpn_coco-eeacb38b.pth")


@pytest.mark.parametrize("backbone", ["swin", "vit"])
def test_digits_recipe_builds_on_swin_and_vit_backbones(data_dir, backbone):
  run = setup.build(recipe(data_dir, f"runlocal,backbone={backbone}"))
  kind = {"swin": "SwinTransformer", "vit": "ViTBackbone"}[backbone]
  assert type(run.model.backbone).__name__ == kind
  images = jax.ShapeDtypeStruct(run.input_shape, np.float32)
  outputs = jax.eval_shape(lambda v, x: run.model.apply(v, x, train=False), run.abstract_state.variables, images)
  sizes = [o.shape[1] for o in outputs["cls_logits"]]
  assert sizes == [a.shape[0] for a in run.task.spec.anchors(run.input_shape[1:3])]
