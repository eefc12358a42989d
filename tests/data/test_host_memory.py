"""The glibc allocator setting the trainer applies on CPU hosts: large freed buffers are reused."""

import subprocess
import sys

WORKER = r"""
import numpy as np, resource, sys
from lvm_jax.data import host_memory
if sys.argv[1] == "keep":
    assert host_memory.keep_large_buffers()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):  # let glibc's dynamic threshold settle first
    np.ones(64 << 20, np.uint8)
before = faults()
for _ in range(20):
    np.ones(64 << 20, np.uint8)   # a 64 MB buffer allocated and freed again, as each batch's copy is
print(faults() - before)
"""


def _page_faults(mode: str) -> int:
  done = subprocess.run([sys.executable, "-c", WORKER, mode], capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  return int(done.stdout.split()[-1])


def test_kept_buffers_are_not_zero_filled_again():
  """20 x 64 MB allocated and freed: by default every allocation faults its pages in afresh (one fault per
  2 MB huge page at the least: 32 an allocation), once kept: none."""
  fresh, kept = _page_faults("default"), _page_faults("keep")
  print(f"minor page faults: default {fresh}, kept {kept}")
  assert fresh >= 20 * 16 and kept < fresh / 20, (fresh, kept)
