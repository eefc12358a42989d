"""Host batches -> global jax.Arrays sharded over the mesh's data axes, prefetched to the devices."""

import collections
from typing import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np


def to_global(batch: dict, sharding: jax.sharding.Sharding) -> dict:
  """This process's slice of the global batch, as global arrays: the leading axis is split by `sharding`
  (e.g. NamedSharding(mesh, P(("data", "fsdp")))); every process passes its own, equally sized slice."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def global_batches(batches: Iterable[dict], sharding: jax.sharding.Sharding, prefetch: int = 2) -> Iterator[dict]:
  """Yields global batches with `prefetch` more already transferred, so input never waits on the host copy."""
  source = iter(batches)
  queue: collections.deque = collections.deque()

  def fill(count: int) -> None:
    for _ in range(count):
      batch = next(source, None)
      if batch is None:
        return
      queue.append(to_global(batch, sharding))

  fill(prefetch + 1)
  while queue:
    yield queue.popleft()
    fill(1)


def normalize(images: jax.Array, mean, std) -> jax.Array:
  """uint8 images -> float32 (x / 255 - mean) / std on the devices (mean/std in 0..1 units).

  Inside the jitted step this fuses into the first layer, and the host ships a quarter of the bytes (a
  host-side normalize op is one more float32 pass over every image on the cores that also decode).
  """
  mean = jnp.asarray(mean, jnp.float32) * 255.0
  std = jnp.asarray(std, jnp.float32) * 255.0
  return (images.astype(jnp.float32) - mean) / std
