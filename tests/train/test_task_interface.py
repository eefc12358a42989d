"""A task that is not classification, defined here and plugged into the one trainer through lvm_jax.tasks.TASKS:
it trains, evaluates, keeps its best checkpoint by its own metric (lower is better), resumes and predicts with no
change to lvm_jax/train. The task regresses an image's mean brightness from the digits recipe's images."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from lvm_jax import tasks
from lvm_jax.models import registry
from lvm_jax.train import checkpoints as checkpoints_lib
from lvm_jax.train import reporting, setup, trainer, workdir_checkpoint
from lvm_jax.train.task import ModelInit, Task
from tests.train.trainer_cases import recipe, shared_compile_cache


class Brightness(Task):
  """Predicts the mean of an image's uint8 pixels (0..255) / 255 with a one-output head."""

  name = "brightness"
  train_metrics = ("abs_error",)
  eval_metrics = {"abs_error": "min", "loss": "min"}

  @classmethod
  def from_config(cls, config, train_source, eval_source):
    return cls()

  def build_model(self, config):
    return ModelInit(registry.create_model(config.model, num_classes=1, **dict(config.model_args)))

  def check_data(self, element_spec, pp_name):
    if "image" not in element_spec:
      raise ValueError(f"{pp_name} gives no images.")

  @staticmethod
  def _errors(outputs, batch):
    target = jnp.mean(batch["image"].astype(jnp.float32), axis=(1, 2, 3)) / 255.0
    return outputs[:, 0].astype(jnp.float32) - target

  def loss(self, outputs, batch):
    error = self._errors(outputs, batch)
    return jnp.mean(error**2), {"abs_error": jnp.mean(jnp.abs(error))}

  def eval_batch(self, outputs, batch):
    error, mask = self._errors(outputs, batch), batch["mask"].astype(jnp.float32)
    return {"count": jnp.sum(mask), "abs_error": jnp.sum(mask * jnp.abs(error)), "loss": jnp.sum(mask * error**2)}

  def summarize_eval(self, per_batch):
    total = {k: sum(float(b[k]) for b in per_batch) for k in per_batch[0]}
    count = total.pop("count")
    return {k: v / count for k, v in total.items()}

  def save_run_files(self, workdir, model, normalize):
    with open(os.path.join(workdir, "brightness.json"), "w") as f:
      json.dump({"scale": 255}, f)

  @classmethod
  def predict(cls, workdir, image, *, step=None, top_k=5, as_json=False, output=None):
    return f"brightness of {image} from {workdir}"


@pytest.fixture
def brightness(monkeypatch, tmp_path_factory):
  monkeypatch.setitem(tasks.TASKS, Brightness.name, Brightness)
  with shared_compile_cache(str(tmp_path_factory.mktemp("jax_cache")), monkeypatch):
    yield


def _config(digits_dir, **overrides):
  # Device normalization is the recipe's; the loss reads the raw uint8 batch, so both sides see what they expect.
  settings = dict(
    task="brightness",
    best_metric="abs_error",
    num_steps=8,
    checkpoint_every_steps=2,
    eval_every_steps=2,
    log_every_steps=2,
    keep_checkpoints=1,
  )
  return recipe(digits_dir, **{**settings, **overrides})


def test_a_new_task_trains_evaluates_and_keeps_its_best_by_its_own_metric(brightness, digits_dir, tmp_path):
  workdir = str(tmp_path / "run")
  metrics = trainer.train_and_evaluate(_config(digits_dir), workdir)
  assert set(metrics) == {"eval"} and set(metrics["eval"]) == {"abs_error", "loss"}
  lines = reporting.read_metrics(workdir)
  evals = {e["step"]: e["abs_error"] for e in lines if e["split"] == "eval"}
  assert sorted(evals) == [2, 4, 6, 8]
  assert min(evals[s] for s in (4, 6, 8)) < 0.5 * evals[2]  # it learns (a frozen model would repeat step 2's)
  train = [e for e in lines if e["split"] == "train"]
  assert all({"loss", "lr", "abs_error", "grad_norm"} <= set(e) for e in train)
  assert "top1" not in train[0]
  # keep_checkpoints=1 keeps the newest; the best by abs_error (lower is better) is kept beside it.
  best = min(evals, key=lambda s: (evals[s], -s))
  with checkpoints_lib.CheckpointManager(
    os.path.join(workdir, workdir_checkpoint.CHECKPOINT_DIR), read_only=True
  ) as checkpoints:
    assert set(checkpoints.all_steps()) == {best, 8}
  assert json.load(open(os.path.join(workdir, "brightness.json"))) == {"scale": 255}
  assert json.load(open(os.path.join(workdir, "config.json")))["task"] == "brightness"
  assert tasks.task_of_workdir(workdir) is Brightness

  # Evaluating the run goes through the same task.
  again = trainer.evaluate(_config(digits_dir), workdir)
  np.testing.assert_allclose(again["eval"]["abs_error"], evals[8], rtol=1e-5)


def test_best_metric_must_be_one_of_the_tasks_eval_metrics(brightness, digits_dir):
  with pytest.raises(
    ValueError,
    match=r"best_metric='top1' is not an eval metric of task 'brightness': one of "
    r"\['abs_error', 'loss'\]",
  ):
    setup.build(_config(digits_dir, best_metric="top1"))


def test_an_ema_best_metric_needs_the_ema(digits_dir):
  with pytest.raises(
    ValueError,
    match=r"best_metric='ema_top1' ranks checkpoints by the EMA parameters' top1, but "
    r"optimizer.ema_decay is not set",
  ):
    setup.build(recipe(digits_dir, best_metric="ema_top1"))
  assert setup.build(recipe(digits_dir, best_metric="ema_top1", optimizer__ema_decay=0.9)).best_mode == "max"
  assert setup.build(recipe(digits_dir, best_metric="loss")).best_mode == "min"


def test_an_unknown_task_is_a_clear_error(digits_dir):
  with pytest.raises(ValueError, match=r"task='segmentation' is not one of \['classification', 'detection'\]"):
    setup.build(recipe(digits_dir, task="segmentation"))
