"""Timing and machine facts the benchmark scripts share. Standard library only: the PyTorch side of a benchmark may
run in an environment without jax or lvm_jax."""

import os
import platform
import statistics
import time


def time_calls(call, *, seconds: float, steps: int | None, min_repeats: int, warmup: int = 1) -> dict:
  """Median seconds of one `call()` (which must wait for its result) after `warmup` untimed calls.

  Repeats `steps` times when given, else until `seconds` have passed and at least `min_repeats` calls ran.
  """
  for _ in range(warmup):
    call()
  times = []
  start = time.perf_counter()
  while True:
    t0 = time.perf_counter()
    call()
    times.append(time.perf_counter() - t0)
    if steps is not None:
      if len(times) >= steps:
        break
    elif len(times) >= min_repeats and time.perf_counter() - start >= seconds:
      break
  return {"median_s": statistics.median(times), "repeats": len(times), "min_s": min(times)}


def cpu_threads() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    return platform.processor() or platform.machine()
