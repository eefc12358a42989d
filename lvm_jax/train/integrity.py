"""An integrity record for each checkpoint: the size and SHA-256 of every file of a step, and its check.

Orbax writes a step under a temporary name and renames it when all processes are done. The record is written
into the temporary directory after the last file and before that rename (Orbax's post-finalization hook), so a
finalized step always carries it, and a step without one was never sealed by this library. Verifying a step
reads every byte once: flipped bits, truncated, missing or extra files and an emptied folder are all caught
before a restore could turn them into NaNs or a misleading "did the model change?".
"""

import hashlib
import json

from etils import epath

RECORD_FILE = "integrity.json"
_VERSION = 1
# Orbax rewrites these while renaming the step into place (commit time, the commit marker on object stores);
# they hold no state, so they are left out.
_NOT_RECORDED = (RECORD_FILE, "_CHECKPOINT_METADATA", "commit_success.txt")
_CHUNK = 16 << 20


class CorruptCheckpointError(ValueError):
  """A checkpoint step that cannot be trusted: its files differ from its integrity record, or it has none."""

  def __init__(self, step: int, path: str, reason: str):
    super().__init__(f"Checkpoint step {step} ({path}) cannot be used: {reason}.")
    self.step, self.path, self.reason = step, path, reason


def _files(directory: epath.Path) -> dict[str, epath.Path]:
  """Every file under `directory` by its '/'-joined relative path, except those Orbax rewrites at commit."""
  found, pending = {}, [(directory, "")]
  while pending:
    folder, prefix = pending.pop()
    for entry in folder.iterdir():
      name = prefix + entry.name
      if entry.is_dir():
        pending.append((entry, name + "/"))
      elif name not in _NOT_RECORDED:
        found[name] = entry
  return found


def _digest(path: epath.Path) -> tuple[int, str]:
  sha, size = hashlib.sha256(), 0
  with path.open("rb") as f:
    while chunk := f.read(_CHUNK):
      sha.update(chunk)
      size += len(chunk)
  return size, sha.hexdigest()


def write_record(directory) -> None:
  """Writes RECORD_FILE into `directory` (a step's folder, all of whose files are written)."""
  directory = epath.Path(directory)
  files = {}
  for name, path in sorted(_files(directory).items()):
    size, sha = _digest(path)
    files[name] = {"size": size, "sha256": sha}
  (directory / RECORD_FILE).write_text(json.dumps({"version": _VERSION, "files": files}, indent=1))


def verify(directory, step: int) -> None:
  """Raises CorruptCheckpointError naming the step, its path and the first problem found."""
  directory = epath.Path(directory)
  fail = lambda reason: CorruptCheckpointError(step, str(directory), reason)
  if not directory.is_dir():
    raise fail("its folder is gone")
  record_path = directory / RECORD_FILE
  if not record_path.exists():
    raise fail(f"it has no {RECORD_FILE} (emptied, copied in part, or saved before checkpoints were sealed)")
  try:
    record = json.loads(record_path.read_text())
    expected = record["files"]
    if record.get("version") != _VERSION or not isinstance(expected, dict):
      raise ValueError
  except (ValueError, KeyError, TypeError):
    raise fail(f"its {RECORD_FILE} cannot be read") from None
  present = _files(directory)
  missing = sorted(set(expected) - set(present))
  if missing:
    raise fail(f"{len(missing)} file(s) are missing, first {missing[0]}")
  extra = sorted(set(present) - set(expected))
  if extra:
    raise fail(f"{len(extra)} file(s) were not part of the save, first {extra[0]}")
  for name, want in sorted(expected.items()):
    size, sha = _digest(present[name])
    if size != want["size"]:
      raise fail(f"{name} has {size} bytes, {want['size']} were written (truncated or overwritten)")
    if sha != want["sha256"]:
      raise fail(f"{name} differs from what was written (its SHA-256 changed: the bytes are corrupt)")
