"""One process of a 2-process x 2-CPU-device run on loopback (see tests/train/test_preemption.py).

Phase "jax": process 1 gets SIGTERM before any PreemptionWatch is entered, so jax's preemption service
catches it; both processes must stop at the same step through the service's sync point.
Phase "watch": process 1 sends itself SIGTERM at step SIGNAL_STEP inside the watch; with sync_every=4 both
must stop at the next multiple of 4, then both save that step's global (process-spanning) state.
Writes what each process saw to an .npz file.
"""

import os
import signal
import sys
import time

import numpy as np

# No jax import at the top: the test imports these constants, and XLA_FLAGS must be set before jax loads.
SYNC_EVERY, FIRST_STEP, SIGNAL_STEP = 4, 1000, 1006  # steps far from phase "jax"'s, which stops below 1000
GLOBAL_SHAPE = (8, 6)


def global_value():
  return np.arange(48, dtype=np.float32).reshape(GLOBAL_SHAPE) * 0.5


def main(process_id: int, port: int, directory: str, out: str) -> None:
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  import jax

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
  from jax.sharding import NamedSharding, PartitionSpec as P

  from lvm_jax.train.checkpoints import CheckpointManager
  from lvm_jax.train.preemption import PreemptionWatch

  assert jax.process_count() == 2 and jax.device_count() == 4
  results = {}

  if process_id == 1:
    os.kill(os.getpid(), signal.SIGTERM)  # jax's handler (installed by jax.distributed) takes it
  with PreemptionWatch(sync_every=1000) as watch:
    for step in range(FIRST_STEP - 1):
      time.sleep(0.01)
      if watch.should_stop(step):
        break
  results["jax_stop"], results["jax_requested"] = step, watch.requested

  with PreemptionWatch(sync_every=SYNC_EVERY) as watch:
    for step in range(FIRST_STEP, FIRST_STEP + 100):
      if process_id == 1 and step == SIGNAL_STEP:
        os.kill(os.getpid(), signal.SIGTERM)
      if watch.should_stop(step):
        break
  results["watch_stop"], results["watch_requested"] = step, watch.requested
  results["handler_restored"] = signal.getsignal(signal.SIGTERM) == signal.SIG_DFL

  # Both processes save the agreed step: a (8, 6) array with rows over all 4 devices of the 2 processes.
  mesh = jax.make_mesh((4,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = NamedSharding(mesh, P("fsdp"))
  value = global_value()
  array = jax.make_array_from_callback(GLOBAL_SHAPE, sharding, lambda index: value[index])
  ckpt = CheckpointManager(directory)
  ckpt.save(step, {"w": array, "step": step}, meta={"stopped_at": step})
  ckpt.wait()
  restored = ckpt.restore({"w": jax.ShapeDtypeStruct(GLOBAL_SHAPE, np.float32, sharding=sharding), "step": 0})
  results["restored_local"] = np.concatenate([np.asarray(s.data) for s in restored["w"].addressable_shards])
  results["expected_local"] = np.concatenate([value[s.index] for s in array.addressable_shards])
  results["restored_step"] = restored["step"]
  ckpt.close()
  np.savez(out, **results)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
