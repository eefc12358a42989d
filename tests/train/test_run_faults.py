"""Faults a user meets, through main.py on the digits recipe (runlocal, 8 fake CPU devices): a relative
workdir, a corrupted checkpoint (eval, predict and resume skip it, --step names it), a second training on a
workdir, eval on a workdir that cannot be written, a save that fails. Each is one clear line or a warning."""

import logging
import os
import shutil

import PIL.Image
import pytest

from lvm_jax.train import integrity, reporting
from lvm_jax.train.workdir_lock import WorkdirLock
from tests.train.test_integrity import flip_bytes, largest_data_file
from tests.train.trainer_cases import DIGITS_RECIPE, shared_compile_cache


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
  with (
    pytest.MonkeyPatch.context() as monkeypatch,
    shared_compile_cache(str(tmp_path_factory.mktemp("jax_cache")), monkeypatch),
  ):
    yield


def flags_for(workdir, digits_dir, steps=4):
  return [
    f"--config={DIGITS_RECIPE}:runlocal",
    f"--workdir={workdir}",
    f"--config.num_steps={steps}",
    f"--config.data.train.data_dir={digits_dir}",
    f"--config.data.eval.data_dir={digits_dir}",
    "--config.progress_bar=False",
  ]


def error_of(run, *args) -> str:
  with pytest.raises(SystemExit) as exit_info:
    run(*args)
  return exit_info.value.code


@pytest.fixture(scope="module")
def trained(digits_dir, tmp_path_factory):
  """A 4-step run's workdir (checkpoints 3 and 4): 3 steps with a relative --workdir, then resumed to step 4."""
  from tests.main_runner import run_main_in_process

  root = tmp_path_factory.mktemp("relative")
  here = os.getcwd()
  os.chdir(root)
  try:
    first = run_main_in_process(*flags_for("runs/x", digits_dir, steps=3))
    second = run_main_in_process(*flags_for("runs/x", digits_dir, steps=4))
  finally:
    os.chdir(here)
  return dict(workdir=root / "runs" / "x", first=first, second=second)


def test_a_relative_workdir_keeps_its_checkpoints_and_a_resume_says_so(trained):
  workdir = trained["workdir"]
  assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "4"]
  assert "resumed" not in trained["first"]
  assert f"resumed from step 3 of 4 ({workdir})" in trained["second"].splitlines()
  assert [e["step"] for e in reporting.read_metrics(str(workdir), "train")] == [2, 3, 4]


@pytest.fixture
def corrupted(trained, tmp_path):
  """A copy of the trained workdir whose newest checkpoint (step 4) has flipped bytes."""
  workdir = tmp_path / "run"
  shutil.copytree(trained["workdir"], workdir)
  flip_bytes(largest_data_file(workdir / "checkpoints" / "4"))
  return workdir


def skipped(caplog, step) -> list[str]:
  return [r.getMessage() for r in caplog.records if f"Skipped checkpoint step {step}" in r.getMessage()]


def test_eval_and_predict_skip_a_corrupt_step_and_name_it(corrupted, digits_dir, tmp_path, run_main, caplog):
  with caplog.at_level(logging.WARNING):
    out = run_main("--mode=eval", *flags_for(corrupted, digits_dir))
  assert out.startswith("[eval]  step 3/4  loss ")  # the newest intact step
  assert "SHA-256 changed" in skipped(caplog, 4)[0]
  message = error_of(run_main, "--mode=eval", "--step=4", *flags_for(corrupted, digits_dir))
  assert message.startswith(f"error: Checkpoint step 4 ({corrupted}/checkpoints/4) cannot be used: state/")

  image = tmp_path / "digit.png"
  PIL.Image.new("RGB", (8, 8), (255, 255, 255)).save(image)
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    lines = run_main("--mode=predict", f"--workdir={corrupted}", f"--image={image}", "--top_k=3").splitlines()
  assert len(lines) == 3 and skipped(caplog, 4)
  message = error_of(run_main, "--mode=predict", f"--workdir={corrupted}", f"--image={image}", "--step=4")
  assert message.startswith("error: Checkpoint step 4 (") and "SHA-256 changed" in message
  assert sorted(os.listdir(corrupted / "checkpoints")) == ["3", "4"]  # readers move nothing


def test_training_resumes_from_the_newest_intact_step(corrupted, digits_dir, run_main, caplog):
  with caplog.at_level(logging.WARNING):
    out = run_main(*flags_for(corrupted, digits_dir, steps=6))
  assert f"resumed from step 3 of 6 ({corrupted})" in out.splitlines()
  moved = os.listdir(f"{corrupted}/checkpoints-quarantine")
  assert (
    len(moved) == 1
    and moved[0].startswith("4-")
    and f"moved to {corrupted}/checkpoints-quarantine/4-" in skipped(caplog, 4)[0]
  )
  assert sorted(os.listdir(corrupted / "checkpoints")) == ["3", "6"]


def test_a_second_training_on_a_workdir_fails_at_once(trained, digits_dir, tmp_path, run_main):
  workdir = tmp_path / "run"
  workdir.mkdir()
  with WorkdirLock(str(workdir)):
    message = error_of(run_main, *flags_for(workdir, digits_dir))
  assert message.startswith(f"error: {workdir} is in use by another training run: PID {os.getpid()} on host ")
  assert not (workdir / "metrics.jsonl").exists() and not (workdir / "checkpoints").exists()


def test_eval_on_a_workdir_that_cannot_be_written_prints_its_metrics(trained, digits_dir, tmp_path, run_main, caplog):
  workdir = tmp_path / "run"
  shutil.copytree(trained["workdir"], workdir)
  # Root ignores permission bits, so the logs are blocked the other way: a file where a folder must go.
  shutil.rmtree(workdir / "tensorboard")
  (workdir / "tensorboard").write_text("")
  with caplog.at_level(logging.WARNING):
    out = run_main("--mode=eval", *flags_for(workdir, digits_dir))
  assert out.startswith("[eval]  step 4/4  loss ")
  assert any(r.getMessage().startswith(f"The eval metrics were not logged in {workdir}") for r in caplog.records)


def test_a_failing_save_stops_the_run_at_its_first_checkpoint(digits_dir, tmp_path, run_main, monkeypatch):
  def disk_full(directory):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(integrity, "write_record", disk_full)
  workdir = tmp_path / "run"
  message = error_of(run_main, *flags_for(workdir, digits_dir, steps=6))
  assert message == (
    f"error: Saving the checkpoint of step 3 in {workdir}/checkpoints failed: OSError: [Errno 28] "
    "No space left on device"
  )
  assert max(e["step"] for e in reporting.read_metrics(str(workdir))) < 6
  assert not [d for d in os.listdir(workdir / "checkpoints") if d.isdigit()]
