"""PreemptionWatch: SIGTERM becomes "save and stop", the handler is restored, a preempted run saves and exits 0,
and two processes (only one of them signalled) stop at the same step and save it together."""

import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from lvm_jax.train.checkpoints import CheckpointManager
from lvm_jax.train.preemption import PreemptionWatch
from tests.train import checkpoint_worker, preemption_worker

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _env():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = ROOT
  return env


def test_sigterm_flips_should_stop_and_the_handler_is_restored():
  seen = []
  previous = signal.signal(signal.SIGTERM, lambda *_: seen.append("previous"))
  try:
    with PreemptionWatch() as watch:
      assert [watch.should_stop(s) for s in range(3)] == [False] * 3 and not watch.requested
      os.kill(os.getpid(), signal.SIGTERM)
      assert watch.requested
      assert [watch.should_stop(s) for s in range(3, 6)] == [True] * 3
    assert seen == []  # the watch took the signal, not the handler before it
    os.kill(os.getpid(), signal.SIGTERM)
    assert seen == ["previous"]  # ... which is back after the block
  finally:
    signal.signal(signal.SIGTERM, previous)


def test_the_default_action_is_restored():
  previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
  try:
    with PreemptionWatch():
      assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
  finally:
    signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("bad", [0, -3, 1.5, True])
def test_sync_every_must_be_a_positive_int(bad):
  with pytest.raises(ValueError, match=r"sync_every must be an int >= 1"):
    PreemptionWatch(sync_every=bad)


def test_a_preempted_run_saves_its_current_step_and_exits_cleanly(tmp_path):
  proc = subprocess.Popen(
    [sys.executable, "-m", "tests.train.checkpoint_worker", "preempted_loop", str(tmp_path)],
    cwd=ROOT,
    env=_env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.DEVNULL,
    text=True,
  )
  for line in proc.stdout:  # let it run a few steps, then preempt it from outside
    if line.strip() == "STEP 20":
      proc.send_signal(signal.SIGTERM)
      break
  # The signal may land before step 20's own stop check: then "STEP 20", read above, is the last step line.
  words = ["STEP", "20"] + proc.stdout.read().split()
  assert proc.wait(timeout=60) == 0
  saved = int(words[-1])
  assert words[-2:] == ["SAVED", str(saved)] and saved >= 20 and words[-4:-2] == ["STEP", str(saved)]
  ckpt = CheckpointManager(str(tmp_path))
  assert ckpt.all_steps() == [saved]
  expected = checkpoint_worker.small_state(saved)
  restored = ckpt.restore(checkpoint_worker.small_state(0))
  for key in ("w", "b"):
    np.testing.assert_array_equal(restored["params"][key], expected["params"][key])
  assert restored["step"] == saved and ckpt.restore_meta() == {"preempted": True}
  ckpt.close()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_stop_at_the_same_step_when_only_one_is_signalled(tmp_path):
  port = _free_port()
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        "-m",
        "tests.train.preemption_worker",
        str(i),
        str(port),
        str(tmp_path / "ckpt"),
        str(tmp_path / f"p{i}.npz"),
      ],
      cwd=ROOT,
      env=_env(),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
    )
    for i in range(2)
  ]
  for p in procs:
    out, _ = p.communicate(timeout=120)  # a disagreement shows as a hang
    assert p.returncode == 0, out.decode()[-3000:]
  r = [dict(np.load(tmp_path / f"p{i}.npz")) for i in range(2)]

  # jax's preemption service (SIGTERM before the watch): one agreed step, well before the loop's end.
  assert int(r[0]["jax_stop"]) == int(r[1]["jax_stop"]) < preemption_worker.FIRST_STEP - 2
  assert not r[0]["jax_requested"] and not r[1]["jax_requested"]
  # The watch's own handler: signalled at 1006, combined every 4 steps -> both stop at 1008.
  assert [int(x["watch_stop"]) for x in r] == [1008, 1008]
  assert [bool(x["watch_requested"]) for x in r] == [False, True]
  assert all(bool(x["handler_restored"]) for x in r)
  for x in r:  # both processes saved and restored their shards of the agreed step
    np.testing.assert_array_equal(x["restored_local"], x["expected_local"])
    assert int(x["restored_step"]) == 1008

  # The 2-process (4-device) checkpoint restores in one process onto 8 devices, whole.
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P

  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
  ckpt = CheckpointManager(str(tmp_path / "ckpt"))
  target = {
    "w": jax.ShapeDtypeStruct(preemption_worker.GLOBAL_SHAPE, np.float32, sharding=NamedSharding(mesh, P("fsdp"))),
    "step": 0,
  }
  restored = ckpt.restore(target)
  np.testing.assert_array_equal(np.asarray(restored["w"]), preemption_worker.global_value())
  assert len(restored["w"].addressable_shards) == 8 and ckpt.restore_meta() == {"stopped_at": 1008}
  ckpt.close()
