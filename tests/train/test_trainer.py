"""train_and_evaluate / evaluate / predict end to end: the digits recipe (configs/digits.py:runlocal, batch 16)
on 8 fake CPU devices. A finished run's workdir, a SIGTERM'd run resumed bit for bit, a resume onto another
mesh, a diverging run, eval and predict from a workdir, config errors before compilation, and main.py."""

import json
import math
import os
import re
import shutil

import jax
import numpy as np
import PIL.Image
import pytest
import tensorflow as tf

from lvm_jax.data import device_batches, sources
from lvm_jax.train import checkpoints as checkpoints_lib
from lvm_jax.train import config as config_lib
from lvm_jax.train import reporting, schedules, setup, trainer, workdir_checkpoint
from tests.train.trainer_cases import DIGITS_RECIPE, flat, recipe, shared_compile_cache, sigterm_after_step

NUM_STEPS = 8
BATCH = 16
NUM_TEST = 360  # digits test split
CLASSES = [str(i) for i in range(10)]


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
  with (
    pytest.MonkeyPatch.context() as monkeypatch,
    shared_compile_cache(str(tmp_path_factory.mktemp("jax_cache")), monkeypatch),
  ):
    yield


def resnet_config(data_dir):
  """ResNet (it has BatchNorm statistics) with EMA: everything a resume must carry."""
  return recipe(
    data_dir,
    num_steps=NUM_STEPS,
    checkpoint_every_steps=2,
    log_every_steps=1,
    keep_checkpoints=2,
    optimizer__ema_decay=0.9,
  )


def checkpoint_dir(workdir):
  return os.path.join(workdir, workdir_checkpoint.CHECKPOINT_DIR)


def saved_state(workdir, step=None):
  with checkpoints_lib.CheckpointManager(checkpoint_dir(workdir), async_save=False) as checkpoints:
    return checkpoints.restore_arrays(step)


def saved_steps(workdir):
  with checkpoints_lib.CheckpointManager(checkpoint_dir(workdir), async_save=False) as checkpoints:
    return checkpoints.all_steps()


@pytest.fixture(scope="module")
def finished(digits_dir, tmp_path_factory):
  """An uninterrupted ResNet run; metrics.jsonl as it stood when the run returned."""
  workdir = str(tmp_path_factory.mktemp("resnet") / "run")
  config = resnet_config(digits_dir)
  result = trainer.train_and_evaluate(config, workdir)
  return dict(workdir=workdir, config=config, result=result, lines=reporting.read_metrics(workdir))


# ---------------------------------------------------------------------------------------------------- 1. workdir


def test_a_run_writes_metrics_tensorboard_config_and_checkpoints(finished, digits_dir):
  workdir, lines = finished["workdir"], finished["lines"]
  assert sorted(os.listdir(workdir)) == [
    "checkpoints",
    "class_names.json",
    "config.json",
    "metrics.jsonl",
    "model.json",
    "run.lock",
    "tensorboard",
  ]
  assert open(os.path.join(workdir, "run.lock")).read() == ""  # released

  train = [e for e in lines if e["split"] == "train"]
  assert [e["step"] for e in train] == list(range(1, NUM_STEPS + 1))  # log_every_steps=1
  schedule = schedules.warmup_then_decay(2e-3, warmup_steps=2, total_steps=NUM_STEPS, decay="cosine")
  for e in train:
    assert {"loss", "lr", "top1", "grad_norm"} <= set(e)
    assert all(math.isfinite(e[k]) for k in ("loss", "lr", "top1", "grad_norm"))
    assert 0.5 < e["loss"] < 5.0  # ~ln(10) = 2.30 at the start, label smoothing 0.1
    assert e["top1"] * BATCH == round(e["top1"] * BATCH) and 0 <= e["top1"] <= 1
    # The lr of step s is the schedule at optimizer step s - 1: 0, 1e-3, then the cosine from 2e-3.
    np.testing.assert_allclose(e["lr"], float(schedule(e["step"] - 1)), rtol=1e-6, atol=0)
  assert [round(e["lr"], 7) for e in train[:3]] == [0.0, 1e-3, 2e-3]

  evals = {e["split"]: e for e in lines if e["split"] in ("eval", "eval_ema")}
  assert [(e["step"], e["split"]) for e in lines if e["split"] != "train"] == [(8, "eval"), (8, "eval_ema")]
  assert lines[-2:] == [evals["eval"], evals["eval_ema"]]  # at the end
  for split in ("eval", "eval_ema"):
    event = evals[split]
    assert event["top1"] * NUM_TEST == pytest.approx(round(event["top1"] * NUM_TEST), abs=1e-9)
    assert 0 <= event["top1"] <= event["top5"] <= 1 and 0 < event["loss"] < 5
    assert {k: event[k] for k in ("top1", "top5", "loss")} == finished["result"][split]

  # TensorBoard: the same values under "<split>/<name>".
  events = sorted(os.listdir(os.path.join(workdir, "tensorboard")))
  assert events and all(name.startswith("events.out.tfevents.") for name in events)
  scalars = {}
  for name in events:
    for event in tf.compat.v1.train.summary_iterator(os.path.join(workdir, "tensorboard", name)):
      for value in event.summary.value:
        scalars[(value.tag, event.step)] = float(tf.make_ndarray(value.tensor))
  assert {s for tag, s in scalars if tag == "train/loss"} == set(range(1, NUM_STEPS + 1))
  np.testing.assert_allclose(scalars[("train/loss", NUM_STEPS)], train[-1]["loss"], rtol=1e-7)
  np.testing.assert_allclose(scalars[("eval/top1", NUM_STEPS)], evals["eval"]["top1"], rtol=1e-7)

  # config.json is the validated config: every default filled in, the overrides in place.
  validated = config_lib.validate(finished["config"])
  saved = reporting.load_config(workdir)
  assert saved.to_dict() == json.loads(validated.to_json())
  assert (saved.num_steps, saved.data.batch_size, saved.optimizer.ema_decay, saved.keep_checkpoints) == (
    NUM_STEPS,
    BATCH,
    0.9,
    2,
  )
  assert saved.data.train.data_dir == digits_dir and saved.sharding.preset == "dp" and saved.seed == 0

  with open(os.path.join(workdir, "class_names.json")) as f:
    assert json.load(f) == CLASSES
  with open(os.path.join(workdir, "model.json")) as f:
    model = json.load(f)
  assert model["class"] == "ResNet" and model["args"]["num_classes"] == 10 and model["args"]["width"] == 32
  assert model["normalize"] == [[0.5] * 3, [0.5] * 3]  # the recipe's "inception" normalization

  # Saved at 2, 4, 6, 8; keep_checkpoints=2 leaves the newest two (8 is also the best: the only one with eval).
  assert saved_steps(workdir) == [6, 8]
  with checkpoints_lib.CheckpointManager(checkpoint_dir(workdir), async_save=False) as checkpoints:
    assert checkpoints.restore_meta(8) == {"examples_seen": NUM_STEPS * BATCH, "num_steps": NUM_STEPS}
  state = saved_state(workdir)
  assert int(state["step"]) == NUM_STEPS and int(state["nonfinite_step"]) == -1
  assert state["batch_stats"] and state["ema_params"]


# ----------------------------------------------------------------------------------------------- 2. exact resume


def test_a_run_stopped_by_sigterm_resumes_bit_for_bit(finished, digits_dir, tmp_path):
  workdir = str(tmp_path / "run")
  config = resnet_config(digits_dir)
  with sigterm_after_step(workdir, 3) as sent:
    interrupted = trainer.train_and_evaluate(config, workdir)
  assert sent.is_set()
  assert interrupted == {}  # stopped before the final eval, and returned normally
  lines = reporting.read_metrics(workdir)
  stopped = lines[-1]
  assert stopped["split"] == "train" and stopped["preempted"] == 1.0
  assert 4 <= stopped["step"] < NUM_STEPS  # the signal came after step 3 was logged
  assert not [e for e in lines if e["split"] != "train"]
  assert saved_steps(workdir)[-1] == stopped["step"]
  assert int(saved_state(workdir)["step"]) == stopped["step"]

  resumed = trainer.train_and_evaluate(config, workdir)
  assert resumed == finished["result"]  # the same final eval, to the last bit
  after = reporting.read_metrics(workdir)[len(lines) :]
  assert [e["step"] for e in after if e["split"] == "train"] == list(range(stopped["step"] + 1, NUM_STEPS + 1))
  final_losses = {e["step"]: e["loss"] for e in finished["lines"] if e["split"] == "train"}
  assert {e["step"]: e["loss"] for e in after if e["split"] == "train"} == {
    s: final_losses[s] for s in range(stopped["step"] + 1, NUM_STEPS + 1)
  }

  want, got = flat(saved_state(finished["workdir"])), flat(saved_state(workdir))
  assert sorted(got) == sorted(want)
  groups = {k.split("/")[0] for k in want}
  assert {"params", "batch_stats", "opt_state", "ema_params", "step", "rng"} <= groups
  differ = [k for k in want if not np.array_equal(want[k], got[k])]
  assert differ == [], f"{len(differ)} of {len(want)} arrays differ, first {differ[:5]}"


# --------------------------------------------------------------------------------------- 3. resume on a new mesh

MESHES = {"fsdp": {"fsdp": -1}, "dp": {"data": -1}, "tp": {"data": 4, "model": 2}}


def vit_config(data_dir, preset, num_steps=NUM_STEPS, **overrides):
  # 4 heads (not the recipe's 3) so that "tp" splits the heads over model=2 as well as the MLP. The schedule's
  # length is fixed, so a run of 4 steps trains exactly the first 4 steps of the run of 8.
  settings = dict(
    num_steps=num_steps,
    checkpoint_every_steps=2,
    log_every_steps=2,
    model_args__num_heads=4,
    optimizer__schedule__total_steps=NUM_STEPS,
    mesh=MESHES[preset],
    sharding={"preset": preset},
  )
  return recipe(data_dir, "runlocal,model=vit", **{**settings, **overrides})


def sharded_axes(config) -> set:
  """The mesh axes the run's parameters are split over."""
  specs = jax.tree.leaves(setup.build(config).state_shardings.params)
  return {axis for s in specs for dim in s.spec if dim for axis in ((dim,) if isinstance(dim, str) else dim)}


@pytest.fixture(scope="module")
def vit_fsdp(digits_dir, tmp_path_factory):
  """An uninterrupted fsdp run of 8 steps, and a workdir with the first 4 of them (same schedule)."""
  root = tmp_path_factory.mktemp("vit")
  full, first4 = str(root / "full"), str(root / "first4")
  trainer.train_and_evaluate(vit_config(digits_dir, "fsdp"), full)
  trainer.train_and_evaluate(vit_config(digits_dir, "fsdp", num_steps=4), first4)
  assert saved_steps(first4) == [2, 4]
  return dict(full=full, first4=first4)


@pytest.mark.parametrize("preset,axes", [("dp", set()), ("tp", {"model"})])
def test_a_run_resumes_onto_another_mesh_and_strategy(vit_fsdp, digits_dir, tmp_path, preset, axes):
  config = vit_config(digits_dir, preset)
  assert sharded_axes(vit_config(digits_dir, "fsdp")) == {"fsdp"}
  assert sharded_axes(config) == axes  # really another layout
  workdir = str(tmp_path / "run")
  shutil.copytree(vit_fsdp["first4"], workdir)
  trainer.train_and_evaluate(config, workdir)
  resumed_steps = [e["step"] for e in reporting.read_metrics(workdir, "train")]
  assert resumed_steps == [2, 4, 6, 8]  # 2 and 4 from the fsdp run, 6 and 8 after the resume

  want, got = flat(saved_state(vit_fsdp["full"])), flat(saved_state(workdir))
  assert sorted(got) == sorted(want) and int(got["step"]) == NUM_STEPS
  # The attention's key bias gets no gradient in exact arithmetic (softmax ignores a shift shared by all keys):
  # what it gets is rounding noise, which Adam scales up to lr-sized steps. Its value is noise under any
  # strategy (measured: |bias| < 1e-5, tp vs fsdp differ by up to 1e-5), so it is only checked to stay tiny.
  noise = [k for k in want if k.startswith("params/") and k.endswith("attn/key/bias")]
  assert len(noise) == 4  # one a block
  for key in want:
    if key in noise:
      assert np.abs(got[key]).max() < 1e-4 and np.abs(want[key]).max() < 1e-4, key
    else:
      np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-7, err_msg=key)
  full_eval = reporting.read_metrics(vit_fsdp["full"], "eval")[-1]
  resumed_eval = reporting.read_metrics(workdir, "eval")[-1]
  assert resumed_eval["step"] == full_eval["step"] == NUM_STEPS
  np.testing.assert_allclose(resumed_eval["loss"], full_eval["loss"], rtol=1e-5)


# ------------------------------------------------------------------------------------------------------ 4. NaN


def test_a_diverging_run_raises_naming_the_step_and_keeps_only_good_checkpoints(digits_dir, tmp_path):
  workdir = str(tmp_path / "run")
  config = vit_config(digits_dir, "fsdp", checkpoint_every_steps=1, log_every_steps=1, optimizer__lr=1e12)
  with pytest.raises(trainer.NonFiniteLossError, match=r"NaN or Inf at step \d+") as error:
    trainer.train_and_evaluate(config, workdir)
  bad = int(re.search(r"at step (\d+)", str(error.value)).group(1))
  # Right away, with nothing more waited for: every save the run started is finished, and the message names
  # the newest of them.
  on_disk = sorted(os.listdir(checkpoint_dir(workdir)))
  assert not [name for name in on_disk if "tmp" in name], (
    f"a checkpoint was still being written when NonFiniteLossError was raised: {on_disk}; {error.value}"
  )
  steps = saved_steps(workdir)
  assert bad == 3 and steps == [1, 2]  # lr 0 at step 1 (warmup), 5e11 at step 2: the loss of step 3 is NaN
  assert f"the last good checkpoint is step {steps[-1]}" in str(error.value)
  for step in steps:
    params = flat(saved_state(workdir, step)["params"])
    assert all(np.isfinite(p).all() for p in params.values()), step
  # The bad step's line is written before the run stops, so the log shows which metric blew up.
  losses = [e["loss"] for e in reporting.read_metrics(workdir, "train")]
  assert len(losses) == bad and all(math.isfinite(x) for x in losses[:-1]) and not math.isfinite(losses[-1])


# ------------------------------------------------------------------------------------------- 5. eval and predict


def test_eval_mode_reproduces_the_final_eval_line(finished):
  metrics = trainer.evaluate(finished["config"], finished["workdir"])
  final = {e["split"]: e for e in finished["lines"] if e["split"] in ("eval", "eval_ema")}
  for split in ("eval", "eval_ema"):
    assert metrics[split] == {k: final[split][k] for k in ("top1", "top5", "loss")}
  logged = reporting.read_metrics(finished["workdir"])[len(finished["lines"]) :]
  assert [(e["step"], e["split"], e["top1"], e["loss"]) for e in logged] == [
    (NUM_STEPS, s, metrics[s]["top1"], metrics[s]["loss"]) for s in ("eval", "eval_ema")
  ]


def test_predict_from_a_workdir_matches_the_eval_logits(finished, digits_dir, tmp_path, run_main):
  workdir = finished["workdir"]
  run = setup.build(finished["config"])
  batch = next(run.eval_dataset().as_numpy_iterator())
  variables = saved_state(workdir)
  variables = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
  logits = np.asarray(
    run.model.apply(variables, device_batches.normalize(batch["image"], *run.step_config.normalize), train=False),
    np.float64,
  )
  test_split = list(
    sources.make_source("digits", split="test", data_dir=digits_dir).dataset().take(len(logits)).as_numpy_iterator()
  )
  assert [int(e["label"]) for e in test_split] == batch["label"].tolist()  # the eval batch is the split's start

  top2 = np.sort(logits, axis=-1)[:, -2:]
  i = int(np.argmax(top2[:, 1] - top2[:, 0]))  # the clearest prediction: no near-tie to flip
  assert top2[i, 1] - top2[i, 0] > 1e-3
  image = tmp_path / "digit.png"
  image.write_bytes(test_split[i]["image"])
  assert PIL.Image.open(image).format == "PNG"

  printed = json.loads(run_main("--mode=predict", f"--workdir={workdir}", f"--image={image}", "--json"))
  expected = int(np.argmax(logits[i]))
  assert printed[0]["index"] == expected and printed[0]["label"] == CLASSES[expected]
  probabilities = np.exp(logits[i] - logits[i].max())
  probabilities /= probabilities.sum()
  order = np.argsort(-probabilities, kind="stable")[:5]
  assert [p["index"] for p in printed] == order.tolist()
  np.testing.assert_allclose([p["probability"] for p in printed], probabilities[order], atol=1e-5, rtol=0)


def test_a_workdir_without_a_run_is_a_clear_error(digits_dir, tmp_path, run_main):
  image = tmp_path / "digit.png"
  PIL.Image.new("RGB", (8, 8)).save(image)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(SystemExit) as exit_info:
    run_main("--mode=predict", f"--workdir={empty}", f"--image={image}")
  assert exit_info.value.code == f"error: {empty} has no model.json: it is not a workdir of a lvm_jax training run."
  with pytest.raises(FileNotFoundError, match=rf"No checkpoint in {re.escape(str(empty))}/checkpoints\."):
    trainer.evaluate(resnet_config(digits_dir), str(empty))


# ---------------------------------------------------------------------------------------------- 6. config errors


def _dict_with_optimizer_typo(config):
  config = config.to_dict()
  config["optimzer"] = config.pop("optimizer")
  return config


CONFIG_ERRORS = {
  # The whole message is "unknown key 'optimzer.KEY'" for every key of the block, the hint on those close
  # enough to 'optimizer'. Naming the block once would be clearer; either form passes here.
  "unknown_key": (
    _dict_with_optimizer_typo,
    r"^Config errors: unknown key 'optimzer[.'].*\(did you mean 'optimizer'\?\)",
  ),
  "batch_size": (
    lambda c: c.data.update(batch_size=12),
    r"Global batch size 12 is not divisible by the 8 data-parallel devices .*use a multiple of 8",
  ),
  "mesh": (
    lambda c: c.update(mesh={"data": 3}),
    r"Mesh shape \{'data': 3, 'fsdp': 1, 'model': 1\} needs 3 devices but 8 are available",
  ),
  "model": (lambda c: c.update(model="resnet_99"), r"Unknown model 'resnet_99'\. Did you mean resnet50"),
  "dataset": (
    lambda c: c.data.update(train={"kind": "tfds", "name": "no_such_dataset", "split": "train"}),
    r"Unknown TFDS dataset 'no_such_dataset'",
  ),
  "pp": (
    lambda c: c.data.update(pp_train="decod|inception_crop(32)"),
    r"Unknown pp op 'decod' in 'decod'; did you mean decode, det_decode\?",
  ),
}


@pytest.mark.parametrize("case", sorted(CONFIG_ERRORS))
def test_config_errors_come_before_compilation(case, digits_dir, tmp_path, monkeypatch):
  edit, message = CONFIG_ERRORS[case]
  config = recipe(digits_dir)
  config = edit(config) or config

  def no_jit(*args, **kwargs):
    raise AssertionError("jax.jit was called before the config error was raised")

  monkeypatch.setattr(jax, "jit", no_jit)
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=message):
    trainer.train_and_evaluate(config, str(workdir))
  assert not workdir.exists()  # nothing written either


# ------------------------------------------------------------------------------------------------- 7. main.py


def test_main_trains_and_a_second_invocation_resumes_without_training(digits_dir, tmp_path, run_main):
  workdir = tmp_path / "run"
  args = [
    f"--config={DIGITS_RECIPE}:runlocal",
    f"--workdir={workdir}",
    f"--config.data.train.data_dir={digits_dir}",
    f"--config.data.eval.data_dir={digits_dir}",
    "--config.num_steps=4",
  ]
  run_main(*args)
  first = reporting.read_metrics(str(workdir))
  assert [(e["step"], e["split"]) for e in first] == [(2, "train"), (4, "train"), (4, "eval")]
  assert saved_steps(str(workdir)) == [3, 4]  # runlocal: checkpoint_every_steps=3, and the last step
  assert reporting.load_config(str(workdir)).num_steps == 4

  final = os.path.join(checkpoint_dir(str(workdir)), "4")
  written = os.stat(final).st_mtime_ns

  run_main(*args)
  again = reporting.read_metrics(str(workdir))
  assert [e for e in again if e["split"] == "train"] == [e for e in first if e["split"] == "train"]
  assert saved_steps(str(workdir)) == [3, 4] and os.stat(final).st_mtime_ns == written
