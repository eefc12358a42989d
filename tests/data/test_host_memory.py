"""The glibc allocator setting the trainer applies on CPU hosts: large freed buffers are reused."""

import json
import subprocess
import sys

import pytest

MB = 1 << 20

# Reads glibc's own accounting (mallinfo2, glibc >= 2.33) around each 64 MB allocation, rather than page-fault
# counts or timings, which other work on the machine disturbs.
WORKER = r"""
import ctypes, json, sys
import numpy as np
from lvm_jax.data import host_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "keep":
    assert host_memory.keep_large_buffers()
for _ in range(3):  # let glibc's dynamic threshold settle first
    np.ones(64 << 20, np.uint8)
rows = []
for _ in range(5):
    buffer = np.ones(64 << 20, np.uint8)   # a 64 MB buffer allocated and freed again, as each batch's copy is
    during, address = libc.mallinfo2(), buffer.ctypes.data
    del buffer
    after = libc.mallinfo2()
    rows.append(dict(address=address, mmapped_during=during.hblkhd, mmapped_after=after.hblkhd,
                     heap=after.arena, heap_free_after=after.fordblks))
print(json.dumps(rows))
"""


def _allocations(mode: str) -> list[dict]:
  done = subprocess.run([sys.executable, "-c", WORKER, mode], capture_output=True, text=True, timeout=120)
  if "undefined symbol: mallinfo2" in done.stderr:
    pytest.skip("glibc older than 2.33 (no mallinfo2)")
  assert done.returncode == 0, done.stderr
  return json.loads(done.stdout.splitlines()[-1])


def test_by_default_each_large_buffer_is_fresh_pages_from_the_kernel():
  """glibc maps a 64 MB allocation on its own and unmaps it on free: the next one is zero-filled afresh."""
  for row in _allocations("default"):
    assert row["mmapped_during"] >= 64 * MB and row["mmapped_after"] < 64 * MB, row


def test_kept_buffers_are_reused_not_zero_filled_again():
  """Once kept, the buffer comes from the heap and stays there when freed: every allocation gets the same,
  already faulted-in memory back, and the heap does not grow."""
  rows = _allocations("keep")
  for row in rows:
    assert row["mmapped_during"] < 64 * MB and row["heap_free_after"] >= 64 * MB, row
  assert len({row["address"] for row in rows}) == 1 and len({row["heap"] for row in rows}) == 1, rows
