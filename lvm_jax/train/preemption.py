"""SIGTERM (a preemption notice on Cloud TPU VMs, GCE, SLURM, Kubernetes) as a request to save and stop.

In a multi-process run only some processes may get the signal, yet all must save the same step and stop
together, or the others hang in the next collective. So the local flag is combined across processes with a
one-scalar all-gather every `sync_every` steps: all processes call should_stop at the same steps and get the
same answer.

jax.distributed also starts jax's preemption service, whose own (C++) SIGTERM handler feeds
jax.experimental.multihost_utils.reached_preemption_sync_point. Our handler replaces it for good (Python can
neither chain to nor reinstall a C handler; on exit the default action comes back), but the sync point is
still consulted at every step, so a notice that reached jax before the block (or through another notifier)
stops all processes at one step too.
"""

import signal
from typing import Optional

import jax
import numpy as np


class PreemptionWatch:
  """Turns SIGTERM into a request to save and stop; every process agrees on the step to stop at.

  with PreemptionWatch(sync_every=10) as watch:
    for step in ...:
      ...train step...
      if watch.should_stop(step):  # every process, every step
        checkpoints.save(step, state); break
  """

  def __init__(self, sync_every: int = 1):
    if not isinstance(sync_every, int) or isinstance(sync_every, bool) or sync_every < 1:
      raise ValueError(f"sync_every must be an int >= 1, got {sync_every!r}.")
    self.sync_every = sync_every
    self._requested = False
    self._stop_step: Optional[int] = None
    self._previous = None
    self._installed = False

  def __enter__(self) -> "PreemptionWatch":
    self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)  # raises outside the main thread
    self._installed = True
    return self

  def __exit__(self, *exc) -> None:
    if self._installed:
      # None: the previous handler was not installed from Python; the default is the best we can restore.
      signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None else self._previous)
      self._installed = False

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    self._requested = True  # only a flag: a handler runs between bytecodes, saving here could deadlock

  @property
  def requested(self) -> bool:
    """This process got SIGTERM while watching."""
    return self._requested

  def should_stop(self, step: int) -> bool:
    """Whether to save `step` and stop; the same answer on every process for the same step.

    Single process: True from the first call after SIGTERM. Several processes: the flags are combined every
    `sync_every` steps (False in between); every process must make the same calls.
    """
    step = int(step)
    if self._stop_step is not None and step >= self._stop_step:
      return True
    if jax.process_count() == 1:
      stop = self._requested
    else:
      stop = _reached_jax_sync_point(step) or (step % self.sync_every == 0 and _any_process(self._requested))
    if stop:
      self._stop_step = step
    return stop


def _reached_jax_sync_point(step: int) -> bool:
  from jax.experimental import multihost_utils

  try:
    return bool(multihost_utils.reached_preemption_sync_point(step))
  except RuntimeError:  # the preemption service is disabled (jax_enable_preemption_service=False)
    return False


def _any_process(flag: bool) -> bool:
  from jax.experimental import multihost_utils

  flags = multihost_utils.process_allgather(np.asarray(flag, np.int32))
  return bool(np.asarray(flags).any())
