"""jax.distributed for multi-process runs, and a watch that stops every process soon after one of them is lost.

    from lvm_jax.parallel import distributed
    distributed.initialize("10.0.0.1:1234", num_processes=2, process_id=0)  # before any other jax call

When a process of a multi-process run dies, the others cannot go on: their next collective has a missing
member. jax's coordination service notices a process that stopped sending heartbeats and aborts the others, but
only after jax's heartbeat_timeout_seconds (default 100 s), with a C++ error that does not say
what to do. If process 0 itself dies (it hosts the coordination service), the others lose their connection to it
and jax aborts them within a second ("Failed to send RPC to coordination service. Either the leader task was
preempted/died..."); that case needs nothing more. A process that ends with a Python exception is worse: it
waits in jax's shutdown for the others, which wait in a collective for it, until jax's 300 s shutdown timeout.

So each process also runs a PeerWatch: a background thread that writes a counter into jax's key-value store
every few seconds and reads the others' (process 0 reads every process's, the rest read process 0's). A counter
that has not moved for `heartbeat_timeout_s` (default 20 s, environment variable LVM_JAX_HEARTBEAT_TIMEOUT_S),
or a coordinator that has not answered for as long, means that process is lost; a process that ends with an
uncaught exception writes "failed" instead of its counter, which the others see within one interval (SystemExit
is not caught that way: call distributed.fail before raising it). Either way the others
print which process and how to restart, and exit with status 1 at once (their main thread may be blocked in a
collective that will never complete). With more than 2 processes, process 0 waits for the others to read its
verdict before it exits, so every survivor names the lost process. jax's own heartbeat timeout stays as the
backstop, set long enough for ours to come first (jax_heartbeat_timeout_s).

Why 20 s is safe on a busy pod: the counter is written by a Python thread, and the long phases of training
release the GIL (XLA compiles, device execution and waiting in a collective happen in C++ with the GIL
released, and so does waiting in jax's shutdown for the others at the end of a run), so a compile of several
minutes or a slow step does not delay it. Only Python code that holds the GIL for 20 s without a bytecode
boundary (one enormous C call) could, or a host that stalls for that long (heavy swapping): raise the timeout
there. LVM_JAX_HEARTBEAT_TIMEOUT_S=0 turns the watch off and leaves jax's 100 s.
"""

import atexit
import os
import sys
import threading
import time
from typing import Callable, Optional

TIMEOUT_ENV = "LVM_JAX_HEARTBEAT_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 20.0
EXIT_STATUS = 1

# Keys in jax's key-value store (held by the coordination service in process 0). Process 0's counter has a
# directory of its own so that the other processes read one key each, not everyone's (O(N) reads per beat).
COORDINATOR_DIR = "lvm_jax/peer_watch/coordinator/"
COORDINATOR_KEY = COORDINATOR_DIR + "0"
PROCESS_DIR = "lvm_jax/peer_watch/processes/"
# A value is a counter, or "failed <exception>" (the process is ending with an error), or, once a process has
# found another lost or failed and is stopping, "verdict <that process>\n<what happened to it>\n<what to do>".
FAILED = "failed"
VERDICT = "verdict"

RESTART_HINT = "Restart all processes with the same command: training resumes from the last checkpoint."
FAILED_HINT = (
  "Fix what its log shows, then restart all processes with the same command: training resumes from the last checkpoint."
)


def timeout_from_env() -> float:
  """LVM_JAX_HEARTBEAT_TIMEOUT_S in seconds (0 turns the watch off), DEFAULT_TIMEOUT_S when unset."""
  text = os.environ.get(TIMEOUT_ENV, "").strip()
  if not text:
    return DEFAULT_TIMEOUT_S
  try:
    value = float(text)
  except ValueError:
    value = -1.0
  if not value >= 0:
    raise ValueError(f"{TIMEOUT_ENV}={text!r}: give a number of seconds (0 turns the peer watch off).")
  return value


def jax_heartbeat_timeout_s(timeout_s: float) -> int:
  """jax's own timeout, the backstop, for a watch of `timeout_s`: jax's service declares a process dead between
  half its timeout and its timeout after the process stopped (the clients beat every half timeout), and the
  watch needs up to its timeout plus one interval to see a loss, plus 1.5 intervals that process 0 waits for the
  others to read its verdict. Ours must come first, or the survivors end with jax's C++ abort and its message.
  65 s for the default 20 s."""
  return int(2 * (timeout_s + 3 * timeout_s / 5)) + 1


def initialize(
  coordinator_address: Optional[str] = None,
  num_processes: Optional[int] = None,
  process_id: Optional[int] = None,
  *,
  heartbeat_timeout_s: Optional[float] = None,
) -> Optional["PeerWatch"]:
  """jax.distributed.initialize (gloo collectives on CPU hosts), then a PeerWatch when there are several processes.

  Args:
    coordinator_address, num_processes, process_id: as jax.distributed.initialize; None where jax detects them
      (Cloud TPU VMs, SLURM, Open MPI) or reads them from JAX_COORDINATOR_ADDRESS and the like.
    heartbeat_timeout_s: how long another process may stay silent before this one stops; None: the
      LVM_JAX_HEARTBEAT_TIMEOUT_S environment variable, else DEFAULT_TIMEOUT_S; 0: no watch, jax's defaults.

  Returns:
    The running PeerWatch, or None (a single process, or the watch turned off).
  """
  import jax

  # CPU hosts need gloo for cross-process collectives; GPU and TPU backends ignore this setting.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  timeout_s = timeout_from_env() if heartbeat_timeout_s is None else float(heartbeat_timeout_s)
  extra = {"heartbeat_timeout_seconds": jax_heartbeat_timeout_s(timeout_s)} if timeout_s > 0 else {}
  jax.distributed.initialize(
    coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id, **extra
  )
  # jax has no public handle on its key-value store; Orbax and jax.experimental.multihost_utils use this one.
  from jax._src import distributed as jax_distributed

  state = jax_distributed.global_state
  if timeout_s <= 0 or state.num_processes < 2:
    return None
  client = state.client
  global _watch
  _watch = PeerWatch(
    client,
    state.process_id,
    state.num_processes,
    timeout_s,
    is_shut_down=lambda: jax_distributed.global_state.client is not client,
  ).start()
  atexit.register(_watch.stop_at_exit)
  previous_hook = sys.excepthook

  def excepthook(kind, value, traceback):  # an uncaught exception (not SystemExit): Python exits after this
    previous_hook(kind, value, traceback)
    fail(kind.__name__)

  sys.excepthook = excepthook
  return _watch


_watch: Optional["PeerWatch"] = None  # the one initialize started


def fail(reason: str) -> None:
  """Tells the other processes that this one is ending with an error (`reason`, e.g. the exception's name), so
  that they stop within seconds instead of waiting for it in a collective; nothing without a watch. Uncaught
  exceptions do it by themselves; call it before sys.exit / SystemExit for an error."""
  if _watch is not None:
    _watch.fail(reason)


def _print_error(message: str) -> None:
  sys.stdout.flush()
  print(f"error: {message}", file=sys.stderr, flush=True)


def _exit_now() -> None:
  os._exit(EXIT_STATUS)  # not sys.exit: the main thread may be waiting in a collective that never completes


class PeerWatch:
  """Beats into jax's key-value store and stops this process when a watched process's beats stop.

  Process 0 watches every process; the others watch process 0 and relay process 0's verdict. `client` is
  jax's DistributedRuntimeClient (anything with key_value_set(key, value, allow_overwrite=) and
  key_value_dir_get(directory) -> [(key, value)]). On a loss the watch calls `say(message)` (default: print to
  stderr), then `stop()`, which does not return in real use (default: exit with EXIT_STATUS); tests pass their
  own, and a `clock`, to judge without waiting.
  """

  def __init__(
    self,
    client,
    process_id: int,
    num_processes: int,
    timeout_s: float,
    *,
    interval_s: Optional[float] = None,
    say: Callable[[str], None] = _print_error,
    stop: Callable[[], None] = _exit_now,
    is_shut_down: Callable[[], bool] = lambda: False,
    clock: Callable[[], float] = time.monotonic,
  ):
    if timeout_s <= 0:
      raise ValueError(f"timeout_s must be > 0, got {timeout_s}.")
    self.client, self.process_id, self.num_processes = client, process_id, num_processes
    self.timeout_s = float(timeout_s)
    self.interval_s = self.timeout_s / 5 if interval_s is None else float(interval_s)
    self._say, self._stop_process, self._is_shut_down, self._clock = say, stop, is_shut_down, clock
    self._key = COORDINATOR_KEY if process_id == 0 else f"{PROCESS_DIR}{process_id}"
    self._read_dir = PROCESS_DIR if process_id == 0 else COORDINATOR_DIR
    self._beats = 0
    self._failed: Optional[tuple[str, float]] = None  # (this process's exception, when)
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None
    started = clock()
    self._last_answer = started  # when the coordination service last answered
    # Watched process -> (its last value, when that value was first read). Not heard from yet: from now on.
    self._seen = {p: (None, started) for p in (range(1, num_processes) if process_id == 0 else [0])}
    self.lost: Optional[int] = None  # the process found lost or failed

  def start(self) -> "PeerWatch":
    self._thread = threading.Thread(target=self._run, name="lvm_jax-peer-watch", daemon=True)
    self._thread.start()
    return self

  def stop(self) -> None:
    self._stop.set()
    if self._thread is not None and self._thread is not threading.current_thread():
      self._thread.join()
    self._thread = None

  def stop_at_exit(self) -> None:
    """At a normal exit the watch ends before Python finalizes (atexit runs the last-registered first, so before
    jax's shutdown): a daemon thread still inside a jax client call when the interpreter ends is torn down in
    the middle of C++ and aborts the process. A failing process keeps its watch: it ends the process once the
    others have stopped too, where jax's shutdown would wait for them."""
    if not self._failed:
      self.stop()

  def fail(self, reason: str) -> None:
    """This process is ending with an error. The others may be waiting for it in a collective, and it would
    wait for them in jax's shutdown: tell them now. The watch goes on (the error may come from a lost process,
    e.g. a collective whose peer died, and it is named once its beats are overdue) and ends this process once
    every watched process has stopped too, or one timeout and two intervals later."""
    self._failed = (reason, self._clock())
    self._call(lambda: self.client.key_value_set(self._key, self._value(), allow_overwrite=True), self.interval_s)

  def _value(self) -> str:
    return f"{FAILED} {self._failed[0]}" if self._failed else str(self._beats)

  def _run(self) -> None:
    while self.beat() and not self._stop.wait(self.interval_s):
      pass

  def beat(self) -> bool:
    """Writes this process's counter, reads the watched ones and judges them. False: the watch is over."""
    self._beats += 1

    def exchange():
      self.client.key_value_set(self._key, self._value(), allow_overwrite=True)
      return dict(self.client.key_value_dir_get(self._read_dir))

    try:
      values = self._call(exchange, max(self._last_answer + self.timeout_s - self._clock(), self.interval_s))
    except Exception as e:  # pylint: disable=broad-except  # no answer, or jax.distributed was shut down
      if self._is_shut_down():
        return False  # the run is ending (jax.distributed.shutdown at exit): nothing left to watch
      silent = self._clock() - self._last_answer
      if silent > self.timeout_s:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        return self._report(
          0,
          f"process 0 of {self.num_processes} (the coordinator) did not answer for {silent:.0f} s ({reason})",
          RESTART_HINT,
        )
      return self._carry_on()
    now = self._last_answer = self._clock()
    ending = 0  # watched processes that are stopping themselves
    for process, (value, since) in self._seen.items():
      current = values.get(COORDINATOR_KEY if process == 0 else f"{PROCESS_DIR}{process}")
      kind, _, rest = (current or "").partition(" ")  # a counter has no space
      if self._failed and kind in (FAILED, VERDICT):
        ending += 1  # this process is failing too, or made that one stop: its own error is in its log
      elif kind == VERDICT:
        lost, what, hint = rest.split("\n", 2)
        return self._report(int(lost), f"process {process} reports: {what}", hint)
      elif kind == FAILED:
        return self._report(
          process, f"process {process} of {self.num_processes} failed ({rest}; its log has the error)", FAILED_HINT
        )
      elif current != value:
        self._seen[process] = (current, now)
      elif now - since > self.timeout_s:
        return self._report(
          process,
          f"process {process} of {self.num_processes} stopped responding (no heartbeat for {now - since:.0f} s)",
          RESTART_HINT,
        )
    if self._failed and ending == len(self._seen):
      self._stop_process()
      return False
    return self._carry_on()

  def _carry_on(self) -> bool:
    if self._failed and self._clock() - self._failed[1] > self.timeout_s + 2 * self.interval_s:
      self._stop_process()  # the others did not answer this process's failure in time: stop anyway
      return False
    return True

  @staticmethod
  def _call(fn, wait_s: float):
    """fn() in a thread of its own: an RPC to a frozen coordinator (a host that vanished without closing its
    connections) blocks with no deadline, and the watch must still judge, and stop this process, in time."""
    box = {}

    def call():
      try:
        box["value"] = fn()
      except Exception as e:  # pylint: disable=broad-except
        box["error"] = e

    rpc = threading.Thread(target=call, name="lvm_jax-peer-watch-rpc", daemon=True)
    rpc.start()
    rpc.join(wait_s)
    if rpc.is_alive():
      raise TimeoutError(f"no answer from the coordination service within {wait_s:.0f} s")
    if "error" in box:
      raise box["error"]
    return box["value"]

  def _report(self, lost: int, what: str, hint: str) -> bool:
    self.lost = lost
    self._say(f"{what}; this process ({self.process_id}) stops too. {hint}")
    # The verdict, where the others read it: with more than 2 processes, process 0 waits for the other survivors
    # to read it (every interval) before it exits, since once process 0 is gone jax aborts them with no word
    # about the lost process; and a process that failed itself learns that its failure was seen.
    try:
      self._call(
        lambda: self.client.key_value_set(self._key, f"{VERDICT} {lost}\n{what}\n{hint}", allow_overwrite=True),
        self.interval_s,
      )
      if self.process_id == 0 and self.num_processes > 2:
        self._stop.wait(1.5 * self.interval_s)
    except Exception:  # pylint: disable=broad-except  # best effort: stopping matters more
      pass
    self._stop_process()
    return False
