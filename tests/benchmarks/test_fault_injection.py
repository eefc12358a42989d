"""benchmarks/fault_injection.py's pieces without training: the checkpoint comparison sees a one-ulp change, the
kill plan, what a kill is said to have interrupted, and the steps lost. The kills themselves:
tests/train/test_fault_injection.py."""

import importlib.util
import os
import pathlib

import numpy as np
import pytest

from lvm_jax.train.checkpoints import CheckpointManager

_PATH = pathlib.Path(__file__).parents[2] / "benchmarks" / "fault_injection.py"
_spec = importlib.util.spec_from_file_location("fault_injection_benchmark", _PATH)
fault_injection = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fault_injection)


def _state(nudge: bool = False) -> dict:
  w = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
  if nudge:
    w[3, 2] = np.nextafter(w[3, 2], np.float32(np.inf))
  return {"params": {"w": w}, "rng": np.array([1, 2], np.uint32), "step": 7}


def _save(workdir: pathlib.Path, state: dict, meta: dict) -> str:
  with CheckpointManager(str(workdir / "checkpoints"), async_save=False) as checkpoints:
    checkpoints.save(7, state, meta=meta)
  return str(workdir)


def test_the_comparison_sees_one_ulp_and_a_different_meta(tmp_path):
  reference = _save(tmp_path / "a", _state(), {"examples_seen": 7})
  same = _save(tmp_path / "b", _state(), {"examples_seen": 7})
  nudged = _save(tmp_path / "c", _state(nudge=True), {"examples_seen": 8})
  assert fault_injection.compare_checkpoints(reference, same, 7) == (3, [], 0.0, True)
  leaves, differing, max_diff, meta_equal = fault_injection.compare_checkpoints(reference, nudged, 7)
  w = _state()["params"]["w"][3, 2]
  assert (leaves, differing, meta_equal) == (3, ["params/w"], False)
  assert max_diff == float(np.nextafter(w, np.float32(np.inf))) - float(w) > 0


@pytest.mark.parametrize("kills", [5, 8, 12])
def test_the_plan_has_saves_and_a_startup_and_never_starts_with_a_startup(kills):
  for seed in range(20):
    plan = fault_injection.plan_kills(kills, np.random.default_rng(seed))
    assert len(plan) == kills and plan[0] != "startup"
    assert plan.count("save") >= 2 and plan.count("startup") >= 1 and plan.count("step") >= 1


class _Dead:
  """What _in_progress reads of a killed launch."""

  def __init__(self, steps, started_wall=0.0):
    self.started_wall = started_wall
    self.first_step = min(steps, default=None)
    self.last_step = max(steps, default=None)


def test_what_a_kill_interrupted(tmp_path):
  checkpoints = tmp_path / "checkpoints"
  (checkpoints / "3").mkdir(parents=True)
  (checkpoints / "6.orbax-checkpoint-tmp-1234").mkdir()
  assert fault_injection.finalized_steps(str(checkpoints)) == [3]
  # A temporary directory before the first step is a killed predecessor's leftover, not a save of this process.
  assert fault_injection._in_progress(_Dead([]), str(checkpoints), 10) == "startup"
  assert fault_injection._in_progress(_Dead([4, 5, 6]), str(checkpoints), 10) == "save"
  # ... nor is one older than the process (left by a predecessor whose leftovers were not cleaned up).
  later = os.stat(checkpoints / "6.orbax-checkpoint-tmp-1234").st_ctime + 1
  assert fault_injection._in_progress(_Dead([4, 5, 6], later), str(checkpoints), 10) == "train step"
  (checkpoints / "6.orbax-checkpoint-tmp-1234").rmdir()
  assert fault_injection._in_progress(_Dead([4, 5]), str(checkpoints), 10) == "train step"
  assert fault_injection._in_progress(_Dead([9, 10]), str(checkpoints), 10) == "final eval/exit"


def test_steps_lost_count_from_the_checkpoint_the_restart_went_on_from():
  kill = fault_injection.Kill("save", 1.0, "save", last_step=8, checkpoint=6, resumed_from=6)
  assert kill.steps_lost == 2
  assert fault_injection.Kill("step", 1.0, "train step", last_step=2, checkpoint=None).steps_lost == 2
  assert fault_injection.Kill("startup", 1.0, "startup", last_step=None, checkpoint=6).steps_lost == 0
