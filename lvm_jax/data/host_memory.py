"""Keep large host buffers in the process heap on CPU hosts.

glibc serves every allocation above its mmap threshold (32 MB once it has adapted) with fresh pages from the
kernel and returns them on free, so each training batch's float32 copy is zero-filled page by page again: on a
CPU-only machine, where that work shares the cores with tf.data and the step, it costs several times the copy
into reused pages. Raising
the mmap and trim thresholds keeps freed buffers for reuse, as MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_
in the environment would, but from inside the process.
"""

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
_THRESHOLD = 1 << 30


def keep_large_buffers() -> bool:
  """Raises glibc's mmap and trim thresholds to 1 GiB; False (and nothing done) off glibc."""
  if not sys.platform.startswith("linux"):
    return False
  name = ctypes.util.find_library("c")
  try:
    libc = ctypes.CDLL(name)
    mallopt = libc.mallopt
  except (OSError, AttributeError, TypeError):
    return False  # musl and others have no mallopt
  return bool(mallopt(_M_MMAP_THRESHOLD, _THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _THRESHOLD))
