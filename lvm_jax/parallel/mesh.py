"""The device mesh (axes data, fsdp, model) from a config, and how batches are laid out on it.

Every shape problem (a mesh that does not use exactly the available devices, a batch that does not split
evenly over the data-parallel devices) is raised here, before anything is traced or compiled.
"""

from typing import Mapping, Optional, Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

# data: batch only; fsdp: batch and parameters/optimizer state; model: tensor parallel (heads, MLP hidden).
AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(shape: Optional[Mapping[str, int]], num_devices: int) -> dict:
  """{"data": d, "fsdp": f, "model": m} with the -1 (at most one) filled so the product is num_devices.

  Axes not given are 1; an empty/None shape means pure data parallel over every device.
  """
  shape = dict(shape or {"data": -1})
  unknown = sorted(set(shape) - set(AXES))
  if unknown:
    raise ValueError(f"Unknown mesh axes {unknown}: the mesh axes are {list(AXES)}.")
  sizes = {axis: int(shape.get(axis, 1)) for axis in AXES}
  fill = [axis for axis, size in sizes.items() if size == -1]
  bad = {axis: size for axis, size in sizes.items() if size < 1 and size != -1}
  if bad or len(fill) > 1:
    raise ValueError(
      f"Mesh shape {sizes}: every axis size must be a positive integer, and at most one may be -1 "
      "(it takes the remaining devices)."
    )
  fixed = 1
  for axis, size in sizes.items():
    if size != -1:
      fixed *= size
  if fill:
    if num_devices % fixed:
      raise ValueError(
        f"Mesh shape {sizes}: the fixed axes use {fixed} devices, which does not divide the "
        f"{num_devices} available devices, so -1 for {fill[0]!r} cannot fill the rest."
      )
    sizes[fill[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(
      f"Mesh shape {sizes} needs {fixed} devices but {num_devices} are available; "
      "make the sizes multiply to the device count or set one axis to -1."
    )
  return sizes


def create_mesh(shape: Optional[Mapping[str, int]] = None, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A ("data", "fsdp", "model") mesh over `devices` (default: all), e.g. create_mesh({"fsdp": -1, "model": 2}).

  Auto axis types: flax linen's logical partitioning fails in grad on jax 0.10's default Explicit axes.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(shape, len(devices))
  return jax.make_mesh(tuple(sizes[a] for a in AXES), AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def data_parallel_size(mesh: Mesh) -> int:
  """How many ways a batch is split: the product of the batch axes."""
  size = 1
  for axis in BATCH_AXES:
    size *= mesh.shape.get(axis, 1)
  return size


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  """Raises unless `batch_size` (global) splits evenly over the data-parallel devices."""
  n = data_parallel_size(mesh)
  if batch_size % n:
    raise ValueError(
      f"Global batch size {batch_size} is not divisible by the {n} data-parallel devices "
      f"(mesh data={mesh.shape.get('data', 1)} x fsdp={mesh.shape.get('fsdp', 1)}); "
      f"use a multiple of {n}."
    )


def batch_sharding(mesh: Mesh, batch_size: Optional[int] = None) -> NamedSharding:
  """Leading (batch) axis over ("data", "fsdp"), the rest replicated; checks `batch_size` when given."""
  if batch_size is not None:
    check_batch_size(batch_size, mesh)
  return NamedSharding(mesh, P(tuple(a for a in BATCH_AXES if a in mesh.shape)))
