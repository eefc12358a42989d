"""The recipes under configs/: the published settings they promise, their command-line overrides, and each one's
runlocal variant trained end to end (tiny model, built-in digits, 4 steps) through the real trainer."""

import importlib.util
import json
import math
import pathlib

import jax
import numpy as np
import PIL.Image
import pytest
from absl import flags
from ml_collections import config_flags
from sklearn.datasets import load_digits

import lvm_jax
from lvm_jax.data import pp, sources
from lvm_jax.train import checkpoints as checkpoints_lib
from lvm_jax.train import config as config_lib
from lvm_jax.train import optimizer as optimizer_lib
from lvm_jax.train import reporting, setup, trainer, workdir_checkpoint

REPO = pathlib.Path(__file__).parents[2]
IMAGENET_RECIPES = ("vit_b16_imagenet", "resnet50_imagenet", "swin_t_imagenet")
FINETUNE_RECIPES = ("finetune_tfds", "finetune_folder")
RECIPES = IMAGENET_RECIPES + FINETUNE_RECIPES
IMAGENET_TRAIN = 1_281_167


def load_recipe(name: str):
  spec = importlib.util.spec_from_file_location(f"recipe_{name}", REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(name: str, arg=None):
  return load_recipe(name).get_config(arg)


def op_names(spec) -> list[str]:
  return [op.pp_name for op in pp.parse(spec)]


def warmup_steps(epochs: float, batch_size: int) -> int:
  return math.ceil(epochs * IMAGENET_TRAIN / batch_size)


# ------------------------------------------------------------------------------------- the full recipes


@pytest.mark.parametrize("arg", [None, "runlocal"])
@pytest.mark.parametrize("name", RECIPES)
def test_recipe_validates_and_its_pp_parses(name, arg):
  config = config_lib.validate(get_config(name, arg))
  assert op_names(config.data.pp_train) and op_names(config.data.pp_eval)
  optimizer_lib.read_config(config.optimizer)
  for block in (config.data.train, config.data.eval):
    assert block.kind in ("tfds", "folder")


@pytest.mark.parametrize("name", RECIPES)
def test_runlocal_is_the_same_recipe_at_toy_size(name):
  full, local = (config_lib.validate(get_config(name, arg)) for arg in (None, "runlocal"))
  assert op_names(local.data.pp_train) == op_names(full.data.pp_train)
  assert op_names(local.data.pp_eval) == op_names(full.data.pp_eval)
  assert (local.model, local.label_smoothing, local.data.normalize) == (
    full.model,
    full.label_smoothing,
    full.data.normalize,
  )
  assert local.data.train.kind == full.data.train.kind and local.data.eval.kind == full.data.eval.kind
  for key in ("name", "momentum", "nesterov", "weight_decay", "clip_norm", "b1", "b2", "eps"):
    assert local.optimizer.get(key) == full.optimizer.get(key), key
  assert local.optimizer.schedule.decay == full.optimizer.schedule.decay
  assert local.data.batch_size == 16 and local.num_steps == 4
  assert local.log_every_steps == 2 and local.checkpoint_every_steps == 2


def test_resnet50_is_the_90_epoch_sgd_recipe():
  c = config_lib.validate(get_config("resnet50_imagenet"))
  assert c.model == "resnet50" and c.num_classes == 1000 and c.model_args.zero_init_last
  assert c.data.batch_size == 1024 and c.num_epochs == 90 and c.num_steps == 0
  opt = c.optimizer
  assert (opt.name, opt.lr, opt.momentum, opt.nesterov, opt.weight_decay) == ("sgd", 0.4, 0.9, True, 1e-4)
  assert opt.get("no_decay") is None  # the default: no decay on biases and BatchNorm scales
  assert (opt.schedule.warmup_steps, opt.schedule.decay, opt.schedule.end_lr_fraction) == (6256, "cosine", 0.0)
  assert opt.schedule.warmup_steps == warmup_steps(5, 1024)
  assert opt.get("clip_norm") is None and opt.get("ema_decay") is None
  assert c.label_smoothing == 0.1
  assert op_names(c.data.pp_train) == ["decode_inception_crop", "flip_lr"]
  assert c.data.pp_eval == "decode|resize_small(256)|central_crop(224)"
  assert (c.data.train.name, c.data.train.split, c.data.eval.split) == ("imagenet2012", "train", "validation")


def test_resnet50_batch_argument_scales_lr_and_warmup():
  c = get_config("resnet50_imagenet", "batch_size=256")
  assert c.data.batch_size == 256 and c.optimizer.lr == pytest.approx(0.1)
  assert c.optimizer.schedule.warmup_steps == warmup_steps(5, 256)


def test_vit_b16_is_deit_b():
  c = config_lib.validate(get_config("vit_b16_imagenet"))
  assert c.model == "vit_b16" and c.model_args.to_dict() == {"drop_path": 0.1}
  assert c.data.batch_size == 1024 and c.num_epochs == 300
  opt = c.optimizer
  assert (opt.name, opt.lr, opt.weight_decay, opt.b1, opt.b2) == ("adamw", 1e-3, 0.05, 0.9, 0.999)
  assert opt.get("clip_norm") is None and opt.get("ema_decay") is None
  assert opt.schedule.warmup_steps == warmup_steps(5, 1024) and opt.schedule.decay == "cosine"
  assert opt.lr * opt.schedule.end_lr_fraction == pytest.approx(1e-5)
  assert c.data.pp_train == (
    "decode_inception_crop(224, method='bicubic')|flip_lr|randaugment(2, 9)|"
    "onehot(1000, smoothing=0.1)|mixup_cutmix(0.8, 1.0, switch_prob=0.5)"
  )
  assert op_names(c.data.pp_eval) == ["decode", "center_crop_fraction"]
  assert c.data.normalize == "imagenet"
  assert get_config("vit_b16_imagenet", "batch_size=4096").optimizer.lr == pytest.approx(5e-4 * 4096 / 512)


def test_swin_t_is_the_papers_recipe():
  c = config_lib.validate(get_config("swin_t_imagenet"))
  assert c.model == "swin_t" and c.model_args.to_dict() == {"drop_path": 0.2}
  assert c.data.batch_size == 1024 and c.num_epochs == 300
  opt = c.optimizer
  assert (opt.name, opt.lr, opt.weight_decay, opt.clip_norm) == ("adamw", 1e-3, 0.05, 5.0)
  assert opt.get("ema_decay") is None
  assert opt.schedule.warmup_steps == warmup_steps(20, 1024) and opt.schedule.decay == "cosine"
  assert opt.lr * opt.schedule.end_lr_fraction == pytest.approx(1e-5)
  assert op_names(c.data.pp_train) == ["decode_inception_crop", "flip_lr", "randaugment", "onehot", "mixup_cutmix"]
  assert "onehot(1000, smoothing=0.1)" in c.data.pp_train and "mixup_cutmix(0.8, 1.0" in c.data.pp_train


def test_finetune_tfds_is_the_vit_transfer_recipe():
  c = config_lib.validate(get_config("finetune_tfds"))
  assert c.pretrained == "google/vit-base-patch16-224" and c.image_size == 384 and c.num_classes is None
  assert c.data.normalize is None and c.data.batch_size == 512
  assert (c.data.train.name, c.data.train.split, c.data.eval.split) == ("oxford_iiit_pet", "train[:90%]", "train[90%:]")
  assert c.num_steps == 500 and c.optimizer.schedule.warmup_steps == 100
  opt = c.optimizer
  assert (opt.name, opt.lr, opt.momentum, opt.weight_decay, opt.clip_norm) == ("sgd", 0.003, 0.9, 0.0, 1.0)
  assert c.data.pp_train == "decode_inception_crop(384)|flip_lr"
  assert c.data.pp_eval == "decode|resize_small(448)|central_crop(384)"

  c = get_config("finetune_tfds", "dataset=cifar100,image_size=224,pretrained=timm/some_vit")
  assert (c.data.train.name, c.data.train.split, c.num_steps, c.optimizer.lr) == (
    "cifar100",
    "train[:98%]",
    10_000,
    0.01,
  )
  assert (c.image_size, c.pretrained) == (224, "timm/some_vit")
  assert get_config("finetune_tfds", "eval_on_test").data.eval.split == "test"
  assert get_config("finetune_tfds", "dataset=imagenet2012,eval_on_test").data.eval.split == "validation"
  with pytest.raises(ValueError, match="dataset='mnist' is not one of"):
    get_config("finetune_tfds", "dataset=mnist")


def test_finetune_folder_arguments():
  c = config_lib.validate(get_config("finetune_folder", "root=/data/photos,eval_split=val"))
  assert (c.data.train.root, c.data.eval.root) == ("/data/photos", "/data/photos")
  assert (c.data.train.split, c.data.eval.split) == ("train", "val")
  assert c.num_steps == 2_500 and c.optimizer.lr == 0.01 and c.optimizer.clip_norm == 1.0
  assert c.data.normalize is None and c.image_size == 384 and c.data.batch_size == 512


def parse_flags(*args):
  """FLAGS.config after a command line `main.py ARGS` (main.py's --config, in fresh FlagValues: the override
  flags config_flags defines while parsing stay defined, so the global FLAGS cannot parse two recipes)."""
  argv = ["main.py", *args]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


@pytest.mark.parametrize(
  "name,key,value",
  [
    ("resnet50_imagenet", "data_dir", "/data/tfds"),
    ("vit_b16_imagenet", "manual_dir", "/data/manual"),
    ("swin_t_imagenet", "download", True),
    ("finetune_tfds", "data_dir", "/data/tfds"),
    ("finetune_folder", "root", "/data/photos"),
    ("finetune_folder", "holdout_fraction", 0.2),
    ("finetune_folder", "layout", "classes"),
  ],
)
def test_command_line_sets_a_source_argument_in_both_blocks(name, key, value):
  config = parse_flags(f"--config={REPO / 'configs' / name}.py", f"--config.data.train.{key}={value}")
  assert config.data.train[key] == value and config.data.eval[key] == value
  assert config_lib.validate(config).data.eval[key] == value


# A value for every key of the optimizer block, none of them any recipe's own.
OPTIMIZER_FLAGS = dict(
  name="lamb",
  lr=0.5,
  b1=0.8,
  b2=0.95,
  eps=1e-7,
  momentum=0.5,
  nesterov=True,
  weight_decay=0.02,
  clip_norm=2.0,
  layer_decay=0.75,
  frozen=("^head/",),
  no_decay=("bias$",),
  accumulate_steps=3,
  ema_decay=0.9999,
  **{
    "schedule.warmup_steps": 7,
    "schedule.total_steps": 90,
    "schedule.decay": "linear",
    "schedule.end_lr_fraction": 0.01,
    "schedule.boundaries": (0.5, 0.75),
    "schedule.factor": 0.2,
  },
)
# Every recipe under configs/, the digits demo and any added later included.
ALL_RECIPES = sorted(path.stem for path in (REPO / "configs").glob("*.py") if path.stem != "common")


def test_the_flags_cover_every_optimizer_key():
  block = config_lib.defaults().optimizer
  assert set(OPTIMIZER_FLAGS) == (set(block) - {"schedule"}) | {f"schedule.{key}" for key in block.schedule}


@pytest.mark.parametrize("arg", [None, "runlocal"])
@pytest.mark.parametrize("name", ALL_RECIPES)
def test_command_line_sets_any_optimizer_key(name, arg):
  flag_text = {key: repr(value) if isinstance(value, tuple) else value for key, value in OPTIMIZER_FLAGS.items()}
  config = parse_flags(
    f"--config={REPO / 'configs' / name}.py" + (f":{arg}" if arg else ""),
    *(f"--config.optimizer.{key}={value}" for key, value in flag_text.items()),
  )
  opt = config_lib.validate(config).optimizer
  assert {key: opt[key] for key in OPTIMIZER_FLAGS if "." not in key} == {
    key: value for key, value in OPTIMIZER_FLAGS.items() if "." not in key
  }
  assert {f"schedule.{key}": value for key, value in opt.schedule.items()} == {
    key: value for key, value in OPTIMIZER_FLAGS.items() if "." in key
  }
  optimizer_lib.read_config(opt)


def test_command_line_layout_reads_class_folders_with_subfolders(tmp_path):
  # root/<class>/<sub>/*.png: layout "auto" cannot tell these class folders from split folders.
  for label, name in enumerate(("ant", "bee")):
    for sub in ("day", "night"):
      for i in range(5):
        (tmp_path / name / sub).mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(np.full((4, 4, 3), 80 * label, np.uint8)).save(tmp_path / name / sub / f"{i}.png")
  recipe = f"--config={REPO / 'configs' / 'finetune_folder.py'}:root={tmp_path}"
  assert parse_flags(recipe).data.train.layout == "auto"
  with pytest.raises(ValueError, match=r"set layout='classes'.*--config.data.train.layout=classes"):
    sources.make_source(**parse_flags(recipe).data.train)
  config = config_lib.validate(
    parse_flags(recipe, "--config.data.train.layout=classes", "--config.data.train.holdout_fraction=0.5")
  )
  train, held = (sources.make_source(**block) for block in (config.data.train, config.data.eval))
  assert train.layout == held.layout == "classes" and train.class_names == held.class_names == ["ant", "bee"]
  assert train.num_examples + held.num_examples == 20 and set(held.labels) == set(train.labels) == {0, 1}


def test_command_line_sets_pretrained_and_image_size():
  config = parse_flags(
    f"--config={REPO / 'configs' / 'finetune_folder.py'}:runlocal",
    "--config.pretrained=/models/vit",
    "--config.image_size=64",
  )
  assert (config.pretrained, config.image_size) == ("/models/vit", 64)


# ------------------------------------------------------------------------- runlocal, trained end to end


def check_run(workdir: pathlib.Path, num_steps: int = 4, log_every: int = 2) -> None:
  train = reporting.read_metrics(str(workdir), "train")
  assert [e["step"] for e in train] == list(range(log_every, num_steps + 1, log_every))
  assert all(math.isfinite(e["loss"]) for e in train)
  evals = reporting.read_metrics(str(workdir), "eval")
  assert [e["step"] for e in evals] == [num_steps] and math.isfinite(evals[0]["loss"])
  assert 0.0 <= evals[0]["top1"] <= 1.0
  assert (workdir / reporting.CONFIG_FILE).is_file()
  with checkpoints_lib.CheckpointManager(str(workdir / workdir_checkpoint.CHECKPOINT_DIR), async_save=False) as saved:
    assert saved.latest_step() == num_steps


@pytest.mark.parametrize("name", IMAGENET_RECIPES)
def test_imagenet_recipe_runlocal_trains(name, digits_dir, tmp_path):
  config = get_config(name, "runlocal")
  config.data.train.data_dir = digits_dir  # the eval block shares it
  config.progress_bar = False
  metrics = trainer.train_and_evaluate(config, str(tmp_path))
  assert set(metrics["eval"]) >= {"top1", "top5", "loss"}
  check_run(tmp_path)
  saved = json.loads((tmp_path / reporting.CONFIG_FILE).read_text())
  assert saved["data"]["eval"]["data_dir"] == digits_dir and saved["model"] == config.model


# ------------------------------------------------------------------------- fine-tuning, trained end to end


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
  from tests.tasks.test_classify import save_tiny_vit  # a 64x64 patch-16 transformers ViT with 10 labels

  return save_tiny_vit(tmp_path_factory.mktemp("tiny_vit"))


@pytest.fixture(scope="module")
def tiny_resnet(tmp_path_factory):
  """A randomly initialised transformers ResNet (bottleneck, BatchNorm statistics perturbed) with 5 labels."""
  import torch
  from transformers import ResNetConfig, ResNetForImageClassification
  from tests import torch_reference as ref
  from tests.tasks.test_classify import PROCESSORS, TINY_RESNET

  folder = tmp_path_factory.mktemp("tiny_resnet")
  torch.manual_seed(0)
  model = ResNetForImageClassification(ResNetConfig(**TINY_RESNET, num_labels=5))
  ref.randomize(model).save_pretrained(folder)
  (folder / "preprocessor_config.json").write_text(json.dumps(PROCESSORS["convnext"]))
  return folder


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory):
  """root/<digit>/*.png|jpg: 20 of scikit-learn's 8x8 digits per class, half PNG, half JPEG."""
  root = tmp_path_factory.mktemp("digit_folder")
  digits = load_digits()
  for label in range(10):
    (root / str(label)).mkdir()
    for i, index in enumerate(np.flatnonzero(digits.target == label)[:20]):
      image = PIL.Image.fromarray(np.round(digits.images[index] * 255 / 16).astype(np.uint8))
      image.save(root / str(label) / f"{index}.{'png' if i % 2 else 'jpg'}")
  return root


def _convnext_checkpoint(folder: pathlib.Path) -> str:
  from tests.weights.test_hf_convnext import TINY, _reference  # transformers ConvNeXt, random weights

  _reference(TINY).save_pretrained(folder)
  return "ConvNeXt"


def _efficientnet_checkpoint(folder: pathlib.Path) -> str:
  from tests.weights.test_hf_efficientnet import TINY, _reference  # transformers EfficientNet, random weights

  _reference(TINY).save_pretrained(folder)
  return "EfficientNet"


def _mobilenet_checkpoint(folder: pathlib.Path) -> tuple[str, pathlib.Path]:
  from lvm_jax.weights import files, torchvision

  folder.mkdir()  # torchvision's real ImageNet MobileNetV2 (the packaged .pth) as a safetensors state dict
  tensors = files.read_state_dict(torchvision.resolve("torchvision/mobilenet_v2"))
  files.write_safetensors(tensors, folder / "mobilenet_v2.safetensors")
  return "MobileNetV2", folder / "mobilenet_v2.safetensors"


# family -> writes a small pretrained checkpoint of it into a folder; returns the model class it loads as, or
# (class, path) for a single-file checkpoint written inside the folder
def _bit_checkpoint(folder: pathlib.Path) -> str:
  from tests.weights.test_hf_bit import TINY, _reference  # transformers BiT, random weights

  # image_size (config.json keeps it; BitConfig has no field of its own) is the recipe's runlocal size.
  _reference({**TINY, "depths": [1, 1, 1, 1], "image_size": 32}).save_pretrained(folder)
  return "ResNetV2"


def _vit_hybrid_checkpoint(folder: pathlib.Path) -> tuple[str, pathlib.Path]:
  # An R50+ViT-B_16.npz-style file (vision_transformer's release format; transformers 5 has no ViT hybrid): a small
  # two-stage ResNet under a two-block ViT at 32x32, the fixture timm's npz loader reads.
  folder.mkdir()
  fixture = REPO / "tests" / "fixtures" / "timm" / "vit_hybrid_npz" / "model.npz"
  (folder / "model.npz").write_bytes(fixture.read_bytes())
  return "VisionTransformer", folder / "model.npz"


BACKBONE_CHECKPOINTS = {
  "convnext": _convnext_checkpoint,
  "efficientnet": _efficientnet_checkpoint,
  "mobilenet_v2": _mobilenet_checkpoint,
  "bit": _bit_checkpoint,
  "vit_hybrid": _vit_hybrid_checkpoint,
}


@pytest.mark.parametrize("family", sorted(BACKBONE_CHECKPOINTS))
def test_finetune_folder_runlocal_through_main_from_each_family(family, run_main, digit_folder, tmp_path):
  checkpoint = tmp_path / family
  class_name = BACKBONE_CHECKPOINTS[family](checkpoint)
  if isinstance(class_name, tuple):
    class_name, checkpoint = class_name
  workdir = tmp_path / "run"
  recipe = f"--config={REPO / 'configs' / 'finetune_folder.py'}:root={digit_folder},runlocal"
  run_main(recipe, f"--workdir={workdir}", f"--config.pretrained={checkpoint}", "--config.progress_bar=False")
  check_run(workdir)
  model = workdir_checkpoint.load(str(workdir)).model
  assert type(model).__name__ == class_name and model.num_classes == 10
  pretrained = lvm_jax.load_checkpoint(str(checkpoint)).model
  if hasattr(pretrained, "image_size"):  # the recipe's resolution (runlocal's 32), not the checkpoint's
    pretrained = pretrained.clone(image_size=model.image_size)
  assert model.clone(num_classes=0) == pretrained.clone(num_classes=0)  # the checkpoint's architecture, new head


def non_head(params: dict) -> dict:
  flat = {"/".join(str(k.key) for k in path): value for path, value in jax.tree_util.tree_flatten_with_path(params)[0]}
  return {path: value for path, value in flat.items() if not path.startswith("head/")}


def check_starts_from_the_checkpoint(config, checkpoint, num_classes: int, image_size=None):
  """The run's step-0 state: the checkpoint's weights (position embeddings resized), a new head."""
  run = setup.build(config)
  assert run.model.num_classes == num_classes
  state = run.new_state()
  params = jax.device_get(state.params)
  assert params["head"]["kernel"].shape[-1] == num_classes and params["head"]["bias"].shape == (num_classes,)
  original = lvm_jax.load_checkpoint(str(checkpoint)).variables
  retargeted = lvm_jax.from_pretrained(str(checkpoint), num_classes=num_classes, image_size=image_size)[1]
  want, got = non_head(jax.device_get(original["params"])), non_head(params)
  assert set(got) == set(want)
  for path, value in got.items():
    if path == "pos_embed":  # resized to the new grid: the transferred one, not the original
      grid = image_size // run.model.patch_size
      assert value.shape == (1, 1 + grid * grid, run.model.width) != want[path].shape
      np.testing.assert_array_equal(value, jax.device_get(retargeted["params"]["pos_embed"]))
    else:
      np.testing.assert_array_equal(value, want[path], err_msg=path)
  if "batch_stats" in original:
    jax.tree.map(
      np.testing.assert_array_equal, jax.device_get(state.batch_stats), jax.device_get(original["batch_stats"])
    )
  return run


def test_finetune_tfds_runlocal_trains_a_new_head_at_a_new_resolution(tiny_vit, digits_dir, tmp_path):
  config = get_config("finetune_tfds", "runlocal")
  config.pretrained = str(tiny_vit)
  config.data.train.data_dir = digits_dir
  config.progress_bar = False
  assert config.image_size == 32  # the checkpoint's is 64: the position embeddings go from 4x4 to 2x2
  run = check_starts_from_the_checkpoint(config, tiny_vit, num_classes=10, image_size=32)
  assert run.model.image_size == 32 and run.step_config.normalize is not None  # the checkpoint's mean/std
  trainer.train_and_evaluate(config, str(tmp_path))
  check_run(tmp_path)


def test_finetune_folder_runlocal_trains_a_new_head(tiny_resnet, digit_folder, tmp_path):
  config = get_config("finetune_folder", f"root={digit_folder},runlocal")
  config.pretrained = str(tiny_resnet)
  config.progress_bar = False
  run = check_starts_from_the_checkpoint(config, tiny_resnet, num_classes=10)
  assert run.eval_source.num_examples > 0 and run.train_source.num_examples + run.eval_source.num_examples == 200
  trainer.train_and_evaluate(config, str(tmp_path))
  check_run(tmp_path)
  assert json.loads((tmp_path / workdir_checkpoint.CLASS_NAMES_FILE).read_text()) == [str(d) for d in range(10)]
