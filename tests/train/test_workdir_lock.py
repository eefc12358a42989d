"""One run per workdir: a second lock fails at once naming the holder; a lock left by a killed process is taken
over with a warning; a released lock leaves nothing to take over."""

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from lvm_jax.train.workdir_lock import LOCK_FILE, WorkdirInUseError, WorkdirLock


def test_a_second_lock_on_a_held_workdir_fails_naming_the_holder(tmp_path):
  with WorkdirLock(str(tmp_path)):
    with pytest.raises(WorkdirInUseError) as error:
      WorkdirLock(str(tmp_path)).__enter__()
  message = str(error.value)
  assert message.startswith(
    f"{tmp_path} is in use by another training run: PID {os.getpid()} on host {socket.gethostname()} since 20"
  )
  assert f"lock {tmp_path / LOCK_FILE}" in message
  # Released: the next run takes it without a warning.
  with WorkdirLock(str(tmp_path)):
    pass
  assert (tmp_path / LOCK_FILE).read_text() == ""


def test_a_lock_left_by_a_killed_process_is_taken_over_with_a_warning(tmp_path, caplog):
  holder = subprocess.Popen(
    [
      sys.executable,
      "-c",
      textwrap.dedent(f"""
      import sys, time
      from lvm_jax.train.workdir_lock import WorkdirLock
      WorkdirLock({str(tmp_path)!r}).__enter__()
      print("LOCKED", flush=True)
      time.sleep(60)
      """),
    ],
    stdout=subprocess.PIPE,
    text=True,
    cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
  )
  try:
    assert holder.stdout.readline().strip() == "LOCKED"
    with pytest.raises(WorkdirInUseError, match=rf"PID {holder.pid} on host"):
      WorkdirLock(str(tmp_path)).__enter__()
  finally:
    holder.kill()  # SIGKILL: no chance to release
    holder.wait()
  assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == holder.pid
  with caplog.at_level(logging.WARNING), WorkdirLock(str(tmp_path)):
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
  assert any(
    f"Took over {tmp_path / LOCK_FILE}" in r.getMessage() and f"PID {holder.pid}" in r.getMessage()
    for r in caplog.records
  )
