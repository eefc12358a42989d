"""Meshes and sharding: the ("data", "fsdp", "model") mesh, strategies (rules from the models' logical axes,
LOGICAL_AXES, to mesh axes, + FSDP), sharded init."""

from lvm_jax.logical_axes import NAMES as LOGICAL_AXES
from lvm_jax.parallel.mesh import (
  AXES,
  BATCH_AXES,
  batch_sharding,
  check_batch_size,
  create_mesh,
  data_parallel_size,
  mesh_shape,
)
from lvm_jax.parallel.partitioning import (
  PRESETS,
  Strategy,
  check_strategy,
  get_strategy,
  init_sharded,
  partition_spec,
  sharding_rules,
  state_shardings,
  variable_shardings,
  variable_specs,
  with_sharding_rules,
)

__all__ = [
  "AXES",
  "BATCH_AXES",
  "LOGICAL_AXES",
  "PRESETS",
  "Strategy",
  "batch_sharding",
  "check_batch_size",
  "check_strategy",
  "create_mesh",
  "data_parallel_size",
  "get_strategy",
  "init_sharded",
  "mesh_shape",
  "partition_spec",
  "sharding_rules",
  "state_shardings",
  "variable_shardings",
  "variable_specs",
  "with_sharding_rules",
]
