"""A process the checkpoint tests kill or preempt (see tests/train/test_checkpoints.py, test_preemption.py).

killed_save DIR      saves small_state(1) and waits, starts an async save of a ~200 MB state as step 2,
                     prints "SAVING" and sleeps: the test SIGKILLs it in the middle of that write.
preempted_loop DIR   runs training-like steps under a PreemptionWatch, printing "STEP n"; on SIGTERM it saves
                     small_state(n) at the agreed step, prints "SAVED n" and exits 0.
"""

import sys
import time

import numpy as np

BIG_ARRAYS, BIG_SHAPE = 25, (1024, 2048)  # 25 x 8 MiB of float32: 200 MiB


def small_state(step: int) -> dict:
  """What the tests expect back, bit for bit: float params, uint32 key data, an int step."""
  rng = np.random.default_rng(step)
  return {
    "params": {"w": rng.standard_normal((64, 32), dtype=np.float32), "b": np.full((32,), step, np.float32)},
    "rng": rng.integers(0, 2**32, size=(2,), dtype=np.uint32),
    "step": step,
  }


def killed_save(directory: str) -> None:
  import jax
  from lvm_jax.train.checkpoints import CheckpointManager

  ckpt = CheckpointManager(directory)
  ckpt.save(1, jax.device_put(small_state(1)))
  ckpt.wait()
  rng = np.random.default_rng(2)  # incompressible, so the write takes a while
  big = {f"w{i}": rng.standard_normal(BIG_SHAPE, dtype=np.float32) for i in range(BIG_ARRAYS)}
  ckpt.save(2, jax.device_put(big))
  print("SAVING", flush=True)
  time.sleep(120)


def preempted_loop(directory: str) -> None:
  from lvm_jax.train.checkpoints import CheckpointManager
  from lvm_jax.train.preemption import PreemptionWatch

  ckpt = CheckpointManager(directory)
  with PreemptionWatch() as watch:
    for step in range(1, 100_000):
      time.sleep(0.01)  # a "train step"
      print(f"STEP {step}", flush=True)
      if watch.should_stop(step):
        ckpt.save(step, small_state(step), meta={"preempted": watch.requested})
        break
  ckpt.close()  # finishes the async write before the process ends
  print(f"SAVED {step}", flush=True)


if __name__ == "__main__":
  {"killed_save": killed_save, "preempted_loop": preempted_loop}[sys.argv[1]](sys.argv[2])
