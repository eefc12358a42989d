"""The peer watch of lvm_jax.parallel.distributed, judged on an in-memory key-value store and a hand-moved clock
(no processes, well under a second). The real thing, a 2-process run that loses a process and is restarted, is
the last test of test_multihost_training.py."""

import threading
import time

import pytest

from lvm_jax.parallel import distributed
from lvm_jax.parallel.distributed import COORDINATOR_KEY, PROCESS_DIR, PeerWatch

HINT = distributed.RESTART_HINT


class Store:
  """What PeerWatch uses of jax's DistributedRuntimeClient, in memory."""

  def __init__(self):
    self.values: dict[str, str] = {}
    self.error = None  # raised by every call while set
    self.frozen = threading.Event()  # calls block while set (a coordinator that does not answer)

  def key_value_set(self, key, value, allow_overwrite=False):
    assert allow_overwrite
    while self.frozen.is_set():
      time.sleep(0.01)
    if self.error:
      raise self.error
    self.values[key] = value

  def key_value_dir_get(self, directory):
    if self.error:
      raise self.error
    return [(k, v) for k, v in self.values.items() if k.startswith(directory)]


class Clock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def _watch(store, process_id, num_processes, clock=None, **kwargs):
  said, stopped = [], []
  watch = PeerWatch(
    store,
    process_id,
    num_processes,
    timeout_s=kwargs.pop("timeout_s", 20.0),
    interval_s=kwargs.pop("interval_s", 0.001),
    say=said.append,
    stop=lambda: stopped.append(1),
    clock=clock or time.monotonic,
    **kwargs,
  )
  return watch, said, stopped


def test_process_0_names_the_process_whose_beats_stop_and_tells_the_others():
  store, clock = Store(), Clock()
  watch, said, stopped = _watch(store, 0, 3, clock)
  for t in range(0, 24, 4):  # process 1 beats on; process 2 beat once, at t=0
    clock.now = t
    store.values[f"{PROCESS_DIR}1"] = str(t)
    store.values.setdefault(f"{PROCESS_DIR}2", "1")
    assert watch.beat() and not said, t  # silent for 20 s is still alive: only longer is lost
  clock.now = 24
  store.values[f"{PROCESS_DIR}1"] = "24"
  assert not watch.beat()
  assert said == [
    "process 2 of 3 stopped responding (no heartbeat for 24 s); this process (0) stops too. Restart "
    "all processes with the same command: training resumes from the last checkpoint."
  ]
  assert stopped == [1] and watch.lost == 2
  assert store.values[COORDINATOR_KEY].split("\n") == [  # the verdict the other survivors relay
    "verdict 2",
    "process 2 of 3 stopped responding (no heartbeat for 24 s)",
    distributed.RESTART_HINT,
  ]


def test_the_other_processes_relay_process_0s_verdict():
  store, clock = Store(), Clock()
  watch, said, stopped = _watch(store, 1, 3, clock)
  store.values[COORDINATOR_KEY] = "7"
  assert watch.beat()
  assert store.values[f"{PROCESS_DIR}1"] == "1"  # its own counter, where process 0 reads it
  store.values[COORDINATOR_KEY] = f"verdict 2\nprocess 2 of 3 stopped responding (no heartbeat for 24 s)\n{HINT}"
  clock.now = 4
  assert not watch.beat()
  assert (
    said
    == [
      f"process 0 reports: process 2 of 3 stopped responding (no heartbeat for 24 s); this process (1) "
      f"stops too. {HINT}"
    ]
    and stopped == [1]
    and watch.lost == 2
  )


def test_a_process_ending_with_an_exception_tells_the_others_at_once_and_exits_once_they_stop():
  """Otherwise it would wait in jax's shutdown for the others, and they in a collective for it: 300 s."""
  store, clock = Store(), Clock()
  failing, said, stopped = _watch(store, 1, 2, clock)
  store.values[COORDINATOR_KEY] = "1"
  assert failing.beat()
  failing.fail("ValueError")
  assert store.values[f"{PROCESS_DIR}1"] == "failed ValueError"  # written at once, not at the next beat
  clock.now = 1
  assert failing.beat() and not stopped  # process 0 has not answered yet
  survivor, survivor_said, survivor_stopped = _watch(store, 0, 2, clock)
  assert not survivor.beat() and survivor_stopped == [1] and survivor.lost == 1
  assert survivor_said == [
    "process 1 of 2 failed (ValueError; its log has the error); this process (0) stops too. "
    "Fix what its log shows, then restart all processes with the same command: training "
    "resumes from the last checkpoint."
  ]
  clock.now = 2
  assert not failing.beat() and stopped == [1] and not said  # process 0 stops: so can it (its traceback is out)


def test_a_process_failing_because_a_peer_died_names_the_peer():
  """A collective whose peer was killed raises at once ("Gloo AllGather failed: Connection closed by peer"): the
  exception does not say which process, the overdue beats do."""
  store, clock = Store(), Clock()
  store.values[f"{PROCESS_DIR}1"] = "5"  # process 1 was killed: its counter stays
  watch, said, stopped = _watch(store, 0, 2, clock)
  assert watch.beat()
  watch.fail("JaxRuntimeError")
  clock.now = 21
  assert not watch.beat() and stopped == [1]
  assert said[0].startswith("process 1 of 2 stopped responding (no heartbeat for 21 s); this process (0) stops too.")
  # A peer that beats on and never stops (its watch turned off): stop anyway, one timeout and two intervals on.
  store, clock = Store(), Clock()
  watch, said, stopped = _watch(store, 0, 2, clock, interval_s=1.0)
  watch.fail("ValueError")
  for t in range(0, 23):
    clock.now = t
    store.values[f"{PROCESS_DIR}1"] = str(t)
    assert watch.beat() and not stopped, t
  clock.now = 22.5
  assert not watch.beat() and stopped == [1] and not said


def test_a_silent_coordinator_is_named_as_such():
  store, clock = Store(), Clock()
  store.values[COORDINATOR_KEY] = "7"  # never moves: process 0's Python is stuck while its service answers
  watch, said, _ = _watch(store, 1, 2, clock)
  for t in (0, 20):
    clock.now = t
    assert watch.beat() and not said
  clock.now = 21
  assert not watch.beat() and said[0].startswith("process 0 of 2 stopped responding (no heartbeat for 21 s)")
  # 2 processes: process 0 has no one else to tell, so it stops without waiting.
  store, clock = Store(), Clock()
  watch, said, stopped = _watch(store, 0, 2, clock, interval_s=60.0)
  clock.now = 21
  started = time.monotonic()
  assert not watch.beat() and stopped == [1] and time.monotonic() - started < 5
  assert store.values[COORDINATOR_KEY].startswith("verdict 1\n")  # written for a failing process 1, if any


def test_an_unreachable_coordinator_stops_the_watch_after_the_timeout_unless_jax_was_shut_down():
  store, clock = Store(), Clock()
  watch, said, _ = _watch(store, 1, 2, clock)
  store.error = RuntimeError("UNAVAILABLE: Failed to send RPC to coordination service\nmore details")
  clock.now = 20
  assert watch.beat() and not said  # a transient error within the timeout is retried
  clock.now = 21
  assert not watch.beat()
  assert said[0].startswith(
    "process 0 of 2 (the coordinator) did not answer for 21 s (UNAVAILABLE: Failed to send "
    "RPC to coordination service); this process (1) stops too."
  )
  # At exit jax.distributed.shutdown closes the client: the watch ends quietly.
  shut_down = Store()
  shut_down.error = RuntimeError("client is shut down")
  watch, said, stopped = _watch(shut_down, 1, 2, Clock(), is_shut_down=lambda: True)
  assert not watch.beat() and not said and not stopped


def test_a_coordinator_that_never_answers_is_judged_in_time_by_the_thread():
  """A frozen coordinator host (no reset connection) leaves an RPC blocked with no deadline; the watch's own
  thread (real time here) still stops the process about one timeout after the last answer."""
  store = Store()
  store.values[COORDINATOR_KEY] = "1"
  watch, said, stopped = _watch(store, 1, 2, timeout_s=0.4, interval_s=0.1)
  started = time.monotonic()
  watch.start()
  time.sleep(0.15)
  store.frozen.set()
  try:
    deadline = started + 5
    while not stopped and time.monotonic() < deadline:
      time.sleep(0.02)
  finally:
    store.frozen.clear()
  assert stopped == [1], said
  assert 0.4 < time.monotonic() - started < 2
  assert said[0].startswith(
    "process 0 of 2 (the coordinator) did not answer for 0 s (no answer from the coordination service within"
  )
  watch.stop()


def test_timeouts_from_the_environment(monkeypatch):
  monkeypatch.delenv(distributed.TIMEOUT_ENV, raising=False)
  assert distributed.timeout_from_env() == distributed.DEFAULT_TIMEOUT_S == 20
  monkeypatch.setenv(distributed.TIMEOUT_ENV, "45")
  assert distributed.timeout_from_env() == 45
  monkeypatch.setenv(distributed.TIMEOUT_ENV, "0")
  assert distributed.timeout_from_env() == 0  # the watch off: jax's own 100 s
  for bad in ("soon", "-1", "nan"):
    monkeypatch.setenv(distributed.TIMEOUT_ENV, bad)
    with pytest.raises(ValueError, match=distributed.TIMEOUT_ENV):
      distributed.timeout_from_env()
  # jax declares a process dead between half its timeout and its timeout: half of it must exceed what the watch
  # needs at most (timeout + 1 interval to see the loss, + 1.5 intervals of process 0's relay wait).
  for timeout in (5, 20, 60):
    assert distributed.jax_heartbeat_timeout_s(timeout) / 2 > timeout * (1 + 2.5 / 5)
