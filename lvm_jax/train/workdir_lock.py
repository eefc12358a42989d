"""One training run per workdir: an exclusive lock that process 0 holds for the whole run.

Two runs on one workdir would interleave their logs and break each other's checkpoints, so a second start
fails at once, saying who holds the workdir. On a local or NFS disk the lock is an flock on WORKDIR/run.lock:
the kernel drops it when its process dies, even by SIGKILL, so a lock left by a dead run is taken over (with a
warning naming it) without any timeout. Object stores (gs://...) have no locks: there the holder refreshes
the file every HEARTBEAT_S seconds and a file older than STALE_S is taken over.
"""

import datetime
import fcntl
import json
import os
import socket
import threading
import time
from typing import Optional

import jax
from absl import logging

from lvm_jax.errors import UserError

LOCK_FILE = "run.lock"
HEARTBEAT_S = 30.0
STALE_S = 120.0


class WorkdirInUseError(UserError, RuntimeError):
  """Another live run holds the workdir."""


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _describe(holder: dict) -> str:
  return f"PID {holder.get('pid')} on host {holder.get('host')} since {holder.get('since')}"


def _parse(text: str) -> Optional[dict]:
  try:
    holder = json.loads(text)
  except ValueError:
    return None
  return holder if isinstance(holder, dict) and holder.get("pid") else None


class WorkdirLock:
  """with WorkdirLock(workdir): ...  Raises WorkdirInUseError on every process if the workdir is taken."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_FILE)
    self._holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": _now()}
    self._fd: Optional[int] = None
    self._heartbeat: Optional[threading.Thread] = None
    self._stop = threading.Event()

  def __enter__(self) -> "WorkdirLock":
    error = None
    if jax.process_index() == 0:
      try:
        self._acquire_remote() if "://" in self.path else self._acquire_local()
      except WorkdirInUseError as e:
        error = e
    if jax.process_count() > 1:  # the other processes learn the outcome instead of hanging in a collective
      from jax.experimental import multihost_utils
      import numpy as np

      taken = bool(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
      if taken and error is None:
        error = WorkdirInUseError(f"{self.workdir} is in use by another training run (see process 0's error).")
    if error is not None:
      raise error
    return self

  def __exit__(self, *exc) -> None:
    self.release()

  # -- local disks: flock ---------------------------------------------------------------------------------------

  def _acquire_local(self) -> None:
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _parse(os.pread(fd, 4096, 0).decode("utf-8", "replace")) or {}
      os.close(fd)
      raise WorkdirInUseError(
        f"{self.workdir} is in use by another training run: {_describe(holder)} (lock {self.path}). Wait for "
        "it to finish or stop it, or train in another --workdir."
      ) from None
    previous = _parse(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
    if previous is not None:
      logging.warning("Took over %s from a run that ended without releasing it (%s).", self.path, _describe(previous))
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(self._holder).encode(), 0)
    self._fd = fd

  # -- object stores: a refreshed file --------------------------------------------------------------------------

  def _acquire_remote(self) -> None:
    from lvm_jax.tf_host import tf

    if tf.io.gfile.exists(self.path):
      with tf.io.gfile.GFile(self.path) as f:
        holder = _parse(f.read())
      age = time.time() - float((holder or {}).get("heartbeat", 0))
      if holder is not None and age < STALE_S:
        raise WorkdirInUseError(
          f"{self.workdir} is in use by another training run: {_describe(holder)}, alive {age:.0f} s ago "
          f"(lock {self.path}; taken over once it is {STALE_S:.0f} s old)."
        )
      if holder is not None:
        logging.warning(
          "Took over %s: its holder (%s) stopped refreshing it %.0f s ago.", self.path, _describe(holder), age
        )
    self._write_remote()
    self._heartbeat = threading.Thread(target=self._refresh, name="workdir-lock", daemon=True)
    self._heartbeat.start()

  def _write_remote(self) -> None:
    from lvm_jax.tf_host import tf

    with tf.io.gfile.GFile(self.path, "w") as f:
      f.write(json.dumps({**self._holder, "heartbeat": time.time()}))

  def _refresh(self) -> None:
    while not self._stop.wait(HEARTBEAT_S):
      try:
        self._write_remote()
      except Exception as e:  # a transient storage error must not kill training; the next beat retries
        logging.warning("Could not refresh %s: %s", self.path, e)

  def release(self) -> None:
    """Empties the lock file (kept, so a concurrent start never locks a deleted file) and releases it."""
    if self._fd is not None:
      os.ftruncate(self._fd, 0)
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None
    if self._heartbeat is not None:
      self._stop.set()
      self._heartbeat.join()
      self._heartbeat = None
      from lvm_jax.tf_host import tf

      tf.io.gfile.remove(self.path)
