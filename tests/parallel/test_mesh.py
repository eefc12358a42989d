"""The ("data", "fsdp", "model") mesh from a config, batch layout, and their errors (8 fake CPU devices)."""

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from lvm_jax import parallel


@pytest.mark.parametrize(
  "config, want",
  [
    (None, (8, 1, 1)),
    ({"data": -1}, (8, 1, 1)),
    ({"fsdp": -1}, (1, 8, 1)),
    ({"data": -1, "model": 2}, (4, 1, 2)),
    ({"data": 2, "fsdp": -1, "model": 2}, (2, 2, 2)),
    ({"data": 2, "fsdp": 2, "model": 2}, (2, 2, 2)),
  ],
)
def test_mesh_from_config(config, want):
  mesh = parallel.create_mesh(config)
  assert mesh.axis_names == ("data", "fsdp", "model")
  assert tuple(mesh.shape.values()) == want
  assert mesh.axis_types == (AxisType.Auto,) * 3  # flax logical partitioning needs Auto axes
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_mesh_over_given_devices():
  mesh = parallel.create_mesh({"data": -1, "model": 2}, devices=jax.devices()[:4])
  assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "model": 2}


@pytest.mark.parametrize(
  "config, match",
  [
    ({"data": 3}, r"needs 3 devices but 8 are available"),
    ({"data": 2, "fsdp": 2, "model": 4}, r"needs 16 devices but 8"),
    ({"data": -1, "model": 3}, r"use 3 devices, which does not divide the 8 .* -1 for 'data' cannot fill"),
    ({"data": -1, "fsdp": -1}, r"at most one may be -1"),
    ({"data": 0, "fsdp": -1}, r"positive integer"),
    ({"pipeline": 2}, r"Unknown mesh axes \['pipeline'\]"),
  ],
)
def test_bad_mesh_is_a_clear_error(config, match):
  with pytest.raises(ValueError, match=match):
    parallel.create_mesh(config)


def test_batch_sharding_splits_over_data_and_fsdp():
  mesh = parallel.create_mesh({"data": 2, "fsdp": 2, "model": 2})
  assert parallel.data_parallel_size(mesh) == 4
  sharding = parallel.batch_sharding(mesh, 12)
  assert sharding.spec == P(("data", "fsdp"))
  batch = jax.device_put(np.arange(12 * 3, dtype=np.float32).reshape(12, 3), sharding)
  # 4 data-parallel groups of 3 rows; the 2 model devices of a group hold the same rows.
  assert {s.data.shape for s in batch.addressable_shards} == {(3, 3)}
  assert len({s.index[0].start for s in batch.addressable_shards}) == 4


@pytest.mark.parametrize(
  "config, batch, n", [({"data": 8}, 12, 8), ({"data": 2, "fsdp": 2, "model": 2}, 10, 4), ({"fsdp": -1}, 4, 8)]
)
def test_batch_not_divisible_is_a_clear_error(config, batch, n):
  mesh = parallel.create_mesh(config)
  with pytest.raises(ValueError, match=rf"Global batch size {batch} is not divisible by the {n} data-parallel"):
    parallel.batch_sharding(mesh, batch)
  with pytest.raises(ValueError, match=rf"use a multiple of {n}"):
    parallel.check_batch_size(batch, mesh)


def test_model_axis_does_not_split_the_batch():
  mesh = parallel.create_mesh({"model": -1})
  parallel.check_batch_size(3, mesh)  # 1 data-parallel group: any batch size
  assert parallel.data_parallel_size(mesh) == 1
