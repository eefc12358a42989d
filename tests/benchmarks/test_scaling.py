"""benchmarks/scaling.py: the per-device byte count it reports, against what sharded arrays really hold."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from lvm_jax import parallel
from lvm_jax.models.vit import VisionTransformer

_PATH = pathlib.Path(__file__).parents[2] / "benchmarks" / "scaling.py"
_spec = importlib.util.spec_from_file_location("scaling_benchmark", _PATH)
scaling = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scaling)


@pytest.fixture
def mesh():
  if jax.device_count() < 2:
    pytest.skip("needs 2 (fake) devices: XLA_FLAGS is set by tests/conftest.py")
  return parallel.create_mesh({"fsdp": 2}, jax.devices()[:2])


def test_per_device_bytes_counts_each_shard_once(mesh):
  tree = {
    "sharded": jax.ShapeDtypeStruct((8, 6), jnp.float32, sharding=NamedSharding(mesh, P("fsdp"))),
    "replicated": jax.ShapeDtypeStruct((3,), jnp.int32, sharding=NamedSharding(mesh, P())),
    "half": jax.ShapeDtypeStruct((4, 2), jnp.bfloat16, sharding=NamedSharding(mesh, P(None, "fsdp"))),
  }
  assert scaling.per_device_bytes(tree) == 4 * 6 * 4 + 3 * 4 + 4 * 1 * 2
  assert scaling.unsharded_bytes(tree) == 8 * 6 * 4 + 3 * 4 + 4 * 2 * 2


def test_reported_state_bytes_match_the_allocated_shards(mesh):
  """The count from the abstract state (nothing allocated) is what device 0 holds once the state exists."""
  model = VisionTransformer(num_classes=10, image_size=32, patch_size=8, width=64, depth=2, mlp_dim=256, num_heads=4)
  strategy = parallel.get_strategy("fsdp")
  compiled, program, _ = scaling.compile_train_step(model, mesh, strategy, batch_size=2)
  abstract, state = program.abstract_state, program.new_state()
  device = jax.devices()[0]
  held = sum(s.data.nbytes for leaf in jax.tree.leaves(state) for s in leaf.addressable_shards if s.device == device)
  assert scaling.per_device_bytes(abstract) == held
  # FSDP over 2 devices: the MLP kernels (16,384 elements) and their Adam moments are split, the rest is not.
  assert scaling.per_device_bytes(abstract) < scaling.unsharded_bytes(abstract)
  assert scaling.per_device_bytes(abstract.params) < scaling.unsharded_bytes(abstract.params)
  xla = scaling.xla_memory(compiled)
  assert xla and xla["argument"] >= scaling.per_device_bytes(abstract)


@pytest.mark.parametrize(
  "strategy, devices, want",
  [
    ("dp", 4, {"data": 4}),
    ("fsdp", 8, {"fsdp": 8}),
    ("tp", 2, {"model": 2}),
    ("fsdp_tp", 8, {"fsdp": -1, "model": 2}),
    ("fsdp_tp", 1, {"fsdp": -1, "model": 1}),
  ],
)
def test_mesh_shape_per_strategy(strategy, devices, want):
  assert scaling.mesh_shape(strategy, devices) == want
  assert np.prod(list(parallel.mesh.mesh_shape(want, devices).values())) == devices
