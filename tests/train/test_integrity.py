"""Checkpoint integrity: every step carries a record of its files, a damaged step (flipped bytes, a truncated,
missing or extra file, an emptied folder) is named and skipped for the newest intact one, never restored."""

import logging
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest

from lvm_jax.train import integrity
from lvm_jax.train.checkpoints import CheckpointSaveError, CheckpointManager, CorruptCheckpointError


def state(step: int) -> dict:
  rng = np.random.default_rng(step)
  return {"w": rng.standard_normal((256, 64), dtype=np.float32), "b": np.full((64,), step, np.float32), "step": step}


def target() -> dict:
  return {"w": np.zeros((256, 64), np.float32), "b": np.zeros((64,), np.float32), "step": 0}


def saved(tmp_path, steps=(1, 2, 3)) -> pathlib.Path:
  directory = tmp_path / "checkpoints"
  with CheckpointManager(str(directory), keep=5) as ckpt:
    for step in steps:
      ckpt.save(step, jax.device_put(state(step)))
  return directory


def largest_data_file(step_dir: pathlib.Path) -> pathlib.Path:
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
  return max(files, key=lambda p: p.stat().st_size)


def flip_bytes(path: pathlib.Path) -> None:
  data = bytearray(path.read_bytes())
  for i in range(len(data) // 2, len(data) // 2 + 64):
    data[i] ^= 0xFF
  path.write_bytes(bytes(data))  # the same size: only the content tells


def truncate(path: pathlib.Path) -> None:
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def empty_folder(step_dir: pathlib.Path) -> None:
  for entry in step_dir.iterdir():
    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


DAMAGE = {
  "flipped_bytes": (
    lambda d: flip_bytes(largest_data_file(d)),
    r"state/\S+/d/\w+ differs from what was written \(its SHA-256",
  ),
  "truncated": (
    lambda d: truncate(largest_data_file(d)),
    r"state/\S+/d/\w+ has \d+ bytes, \d+ were written \(truncated",
  ),
  "missing_metadata": (
    lambda d: (d / "state" / "_METADATA").unlink(),
    r"1 file\(s\) are missing, first state/_METADATA",
  ),
  "extra_file": (
    lambda d: (d / "state" / "stray.bin").write_bytes(b"x"),
    r"1 file\(s\) were not part of the save, first state/stray.bin",
  ),
  "emptied_folder": (empty_folder, r"it has no integrity.json"),
  "record_deleted": (lambda d: (d / integrity.RECORD_FILE).unlink(), r"it has no integrity.json"),
}


def test_every_step_carries_a_record_of_all_its_files(tmp_path):
  directory = saved(tmp_path, steps=(1,))
  record = (directory / "1" / integrity.RECORD_FILE).read_text()
  files = sorted(str(p.relative_to(directory / "1")) for p in (directory / "1").rglob("*") if p.is_file())
  recorded = [f for f in files if f not in ("integrity.json", "_CHECKPOINT_METADATA", "commit_success.txt")]
  assert recorded and all(f'"{f}"' in record for f in recorded)
  assert any(f.startswith("state/") for f in recorded) and any(f.startswith("meta/") for f in recorded)
  CheckpointManager(str(directory)).verify(1)


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_step_is_skipped_for_the_newest_intact_one(tmp_path, case, caplog):
  damage, reason = DAMAGE[case]
  directory = saved(tmp_path)
  damage(directory / "3")
  ckpt = CheckpointManager(str(directory), keep=5, read_only=True)
  with pytest.raises(CorruptCheckpointError, match=rf"Checkpoint step 3 \({directory}/3\) cannot be used: {reason}"):
    ckpt.verify(3)
  with caplog.at_level(logging.WARNING):
    restored = ckpt.restore(target())
  np.testing.assert_array_equal(restored["w"], state(2)["w"])
  assert restored["step"] == 2
  warning = [r.getMessage() for r in caplog.records if "Skipped checkpoint step 3" in r.getMessage()]
  assert len(warning) == 1 and str(directory / "3") in warning[0]
  # Asked for by number, the damaged step is an error naming it; read-only: nothing was moved.
  with pytest.raises(CorruptCheckpointError, match=rf"step 3 .*{reason}"):
    ckpt.restore(target(), step=3)
  with pytest.raises(CorruptCheckpointError, match=r"step 3"):
    ckpt.restore_arrays(step=3)
  assert ckpt.all_steps() == [1, 2, 3]


def test_a_resumed_run_moves_bad_steps_aside_and_saves_their_numbers_again(tmp_path):
  directory = saved(tmp_path)
  flip_bytes(largest_data_file(directory / "3"))
  ckpt = CheckpointManager(str(directory), keep=5)
  assert ckpt.intact_step(quarantine=True) == 2
  assert ckpt.all_steps() == [1, 2]
  moved = os.listdir(str(directory) + "-quarantine")
  assert len(moved) == 1 and moved[0].startswith("3-")
  ckpt.save(3, jax.device_put(state(30)))
  ckpt.wait()
  np.testing.assert_array_equal(ckpt.restore(target())["w"], state(30)["w"])
  ckpt.close()


def test_no_intact_step_is_an_error_naming_them(tmp_path):
  directory = saved(tmp_path, steps=(1, 2))
  flip_bytes(largest_data_file(directory / "1"))
  truncate(largest_data_file(directory / "2"))
  with pytest.raises(CorruptCheckpointError, match=r"none of the 2 checkpoint\(s\) \[1, 2\] verifies"):
    CheckpointManager(str(directory), read_only=True).restore(target())


def test_a_failed_background_save_is_raised_with_its_step(tmp_path, monkeypatch):
  def disk_full(directory):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(integrity, "write_record", disk_full)
  ckpt = CheckpointManager(str(tmp_path / "checkpoints"))
  ckpt.save(5, jax.device_put(state(5)))
  with pytest.raises(CheckpointSaveError, match=r"Saving the checkpoint of step 5 in .* failed: .*No space left"):
    ckpt.wait()
  assert ckpt.all_steps() == []  # never renamed into place: a resume cannot pick it up
  ckpt.close()


def test_a_relative_directory_is_made_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with CheckpointManager("runs/x/checkpoints", async_save=True) as ckpt:
    assert ckpt.directory == str(tmp_path / "runs" / "x" / "checkpoints")
    ckpt.save(1, jax.device_put(state(1)))
    ckpt.wait()
  assert CheckpointManager(str(tmp_path / "runs" / "x" / "checkpoints")).all_steps() == [1]
