"""One process of a 2-process x 2-CPU-device run on loopback (see tests/data/test_multihost.py).

Writes the global batches it assembled (gathered back to the host) and its own shard to an .npz file.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main(process_id: int, port: int, data_dir: str, out: str) -> None:
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
  import numpy as np
  from jax.experimental import multihost_utils
  from jax.sharding import NamedSharding, PartitionSpec as P

  from lvm_jax.data import device_batches, pipeline, sources
  from tests.data.pipeline_cases import EVAL_PP, GLOBAL_BATCH, SEED, TRAIN_PP

  assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
  mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = NamedSharding(mesh, P("data"))
  results = {}
  test = sources.make_source("digits", split="test", data_dir=data_dir)
  shard = pipeline.Shard.current()
  examples = list(test.dataset(shard.index, shard.count).as_numpy_iterator())
  results["shard_labels"] = np.array([int(ex["label"]) for ex in examples])
  results["shard_images"] = np.array([ex["image"] for ex in examples])  # encoded bytes: an example's identity
  evals = pipeline.eval_dataset(test, EVAL_PP, global_batch_size=GLOBAL_BATCH)
  for i, batch in enumerate(device_batches.global_batches(evals.as_numpy_iterator(), sharding)):
    for key, value in batch.items():
      results[f"eval_{i}_{key}"] = multihost_utils.process_allgather(value, tiled=True)
  results["eval_steps"] = np.array(i + 1)
  train = sources.make_source("digits", split="train", data_dir=data_dir)
  stream = pipeline.train_dataset(train, TRAIN_PP, global_batch_size=GLOBAL_BATCH, seed=SEED)
  for i, batch in enumerate(device_batches.global_batches(stream.take(3).as_numpy_iterator(), sharding)):
    for key, value in batch.items():
      results[f"train_{i}_{key}"] = multihost_utils.process_allgather(value, tiled=True)
  np.savez(out, **results)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
