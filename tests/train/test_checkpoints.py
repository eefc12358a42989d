"""Checkpoints: bit-identical round trips, async saves, retention (last K + best), restores onto other meshes,
clear errors, and a save killed midway that is never picked up (8 fake CPU devices)."""

import glob
import os
import signal
import subprocess
import sys
import threading
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lvm_jax import VisionTransformer, parallel
from lvm_jax.train.checkpoints import CheckpointManager
from tests.train import checkpoint_worker

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Tensors of 2**10 elements or more (attention and MLP kernels, the patch embedding) and their Adam moments are
# FSDP-sharded.
VIT = VisionTransformer(num_classes=10, image_size=16, patch_size=4, width=32, depth=2, mlp_dim=128, num_heads=4)
INPUT = (1, 16, 16, 3)
STRATEGY = parallel.get_strategy("fsdp", fsdp_min_size=2**10)
TX = optax.adamw(1e-2, weight_decay=0.1)


def boxed_params(model=VIT):
  return jax.eval_shape(lambda key: model.init(key, jnp.zeros(INPUT)), jax.random.key(0))["params"]


def train_state(mesh, model=VIT, steps=2):
  """params + AdamW state after `steps` updates (so the moments are not zeros), sharded on `mesh`."""
  params = parallel.init_sharded(model, 0, INPUT, mesh, STRATEGY)["params"]
  param_sh = parallel.variable_shardings(boxed_params(model), mesh, STRATEGY)
  opt_sh = parallel.state_shardings(jax.eval_shape(TX.init, params), boxed_params(model), mesh, STRATEGY)

  def train(params):
    opt_state = TX.init(params)
    for i in range(steps):
      grads = jax.tree.map(lambda p: jnp.sin(p * (i + 1)), params)
      updates, opt_state = TX.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
    return params, opt_state

  params, opt_state = jax.jit(train, out_shardings=(param_sh, opt_sh))(params)
  return {
    "params": params,
    "opt_state": opt_state,
    "step": 12,
    "rng": np.asarray(jax.random.key_data(jax.random.key(7))),
    "data": {"epoch": 1, "position": 96},
  }


@pytest.fixture(scope="module")
def state8():
  """The training state FSDP-sharded over all 8 devices (built once: compiling it is most of this file's time)."""
  return train_state(parallel.create_mesh({"fsdp": 8}))


def abstract_state(mesh, like):
  """The target a resumed run builds: ShapeDtypeStructs with `mesh`'s shardings, no data."""
  params = like["params"]
  boxed = boxed_params()
  param_sh = parallel.variable_shardings(boxed, mesh, STRATEGY)
  opt_sh = parallel.state_shardings(jax.eval_shape(TX.init, params), boxed, mesh, STRATEGY)
  sds = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
  return {
    "params": jax.tree.map(sds, params, param_sh),
    "opt_state": jax.tree.map(sds, like["opt_state"], opt_sh),
    "step": 0,
    "rng": np.zeros(2, np.uint32),
    "data": {"epoch": 0, "position": 0},
  }


def assert_bit_identical(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
    assert type(a) is type(b) or (isinstance(a, jax.Array) and isinstance(b, jax.Array)), path
    assert np.asarray(a).dtype == np.asarray(b).dtype, path
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


def test_round_trip_is_bit_identical(tmp_path, state8):
  state = state8
  assert float(jnp.abs(state["opt_state"][0].nu["block_0"]["mlp"]["fc1"]["kernel"]).sum()) > 0
  with CheckpointManager(str(tmp_path)) as ckpt:
    ckpt.save(12, state, meta={"examples_seen": 1536, "config": "vit_tiny"})
  ckpt = CheckpointManager(str(tmp_path))  # a new run on the same directory
  assert (ckpt.latest_step(), ckpt.all_steps()) == (12, [12])
  restored = ckpt.restore(state)  # concrete arrays as the target: their shardings are used
  assert_bit_identical(restored, state)
  assert type(restored["step"]) is int and restored["rng"].dtype == np.uint32
  assert jax.tree.map(lambda x: x.sharding, restored["params"]) == jax.tree.map(lambda x: x.sharding, state["params"])
  assert ckpt.restore_meta() == {"examples_seen": 1536, "config": "vit_tiny"}
  ckpt.close()


def test_restore_arrays_reads_a_checkpoint_without_a_target(tmp_path, state8):
  with CheckpointManager(str(tmp_path)) as ckpt:
    ckpt.save(12, state8)
  host = CheckpointManager(str(tmp_path)).restore_arrays()
  # Orbax's saved structure: the AdamW state tuple is a list, its named tuple a dict; arrays on the host.
  assert sorted(host) == ["data", "opt_state", "params", "rng", "step"]
  assert isinstance(host["opt_state"], list) and sorted(host["opt_state"][0]) == ["count", "mu", "nu"]
  assert all(type(x) is np.ndarray for x in jax.tree.leaves(host["params"]))
  assert_bit_identical(host["params"], jax.tree.map(np.asarray, state8["params"]))
  assert_bit_identical(host["opt_state"][0]["nu"], jax.tree.map(np.asarray, state8["opt_state"][0].nu))
  assert (host["step"], host["data"]) == (12, {"epoch": 1, "position": 96})


def test_async_save_returns_before_the_write_and_restores_in_a_new_manager(tmp_path, monkeypatch):
  # The sealing hook runs on the save's thread once the files are written, before the rename: holding it
  # there makes the in-between state observable on any machine, instead of racing the write.
  reached, release, held_for = threading.Event(), threading.Event(), []
  seal = CheckpointManager._seal

  def held_seal(self):
    reached.set()
    start = time.monotonic()
    release.wait(timeout=60)  # a synchronous save() would wait here the whole minute
    held_for.append(time.monotonic() - start)
    seal(self)

  monkeypatch.setattr(CheckpointManager, "_seal", held_seal)
  rng = np.random.default_rng(0)
  state = {"w": jax.device_put(rng.standard_normal((1024, 1024), dtype=np.float32)), "step": 5}
  ckpt = CheckpointManager(str(tmp_path), async_save=True)
  ckpt.save(5, state)
  assert not release.is_set() and not held_for  # save() returned with the write not finalized
  assert reached.wait(timeout=60)
  # Written, not yet renamed: under a temporary name, so not listed.
  assert not os.path.exists(tmp_path / "5") and glob.glob(str(tmp_path / "5.orbax-checkpoint-tmp*"))
  assert (ckpt.latest_step(), ckpt.all_steps()) == (None, [])
  release.set()
  ckpt.wait()
  assert held_for and held_for[0] < 60
  assert (ckpt.latest_step(), sorted(os.listdir(tmp_path))) == (5, ["5"])
  ckpt.close()
  assert_bit_identical(CheckpointManager(str(tmp_path)).restore(state), state)


def test_saving_an_existing_step_again_is_a_no_op(tmp_path):
  ckpt = CheckpointManager(str(tmp_path))
  ckpt.save(3, {"x": np.arange(4)})
  ckpt.save(3, {"x": np.arange(4) + 100})  # the end-of-run save after a periodic save of the same step
  np.testing.assert_array_equal(ckpt.restore({"x": np.zeros(4, np.int64)})["x"], np.arange(4))
  assert ckpt.all_steps() == [3]
  ckpt.close()


@pytest.mark.parametrize(
  "mode, values, best",
  [
    ("max", [0.3, 0.9, 0.5, 0.4, 0.6], 2),
    ("min", [2.0, 0.7, 1.5, 0.8, 1.1], 2),
    ("max", [0.5, 0.8, 0.8, float("nan"), 0.1], 3),  # ties: the newer; NaN (diverged) ranks worst
  ],
)
def test_keep_the_last_two_and_the_best(tmp_path, mode, values, best):
  ckpt = CheckpointManager(str(tmp_path), keep=2, best_metric="acc", best_mode=mode)
  for step, value in enumerate(values, start=1):
    ckpt.save(step, {"x": np.full(3, step)}, metrics={"acc": value, "loss": 1.0})
  ckpt.wait()
  assert ckpt.all_steps() == sorted({best, 4, 5})
  assert ckpt.best_step() == best
  assert sorted(int(d) for d in os.listdir(tmp_path) if d.isdigit()) == sorted({best, 4, 5})
  # Saves without metrics are kept by recency only; the best survives them.
  ckpt.save(6, {"x": np.full(3, 6)})
  ckpt.save(7, {"x": np.full(3, 7)})
  ckpt.close()
  reopened = CheckpointManager(str(tmp_path), keep=2, best_metric="acc", best_mode=mode)
  assert (reopened.all_steps(), reopened.best_step(), reopened.latest_step()) == ([best, 6, 7], best, 7)
  np.testing.assert_array_equal(reopened.restore({"x": np.zeros(3, np.int64)}, step=best)["x"], [best] * 3)


def test_without_a_best_metric_only_the_last_k_are_kept(tmp_path):
  ckpt = CheckpointManager(str(tmp_path), keep=3)
  for step in range(0, 60, 10):
    ckpt.save(step, {"x": np.full(2, step)}, metrics={"acc": 1.0 - step / 100})
  ckpt.close()
  assert (ckpt.all_steps(), ckpt.best_step()) == ([30, 40, 50], None)


@pytest.mark.parametrize("devices", [1, 4])
def test_fsdp_checkpoint_of_8_devices_restores_onto_fewer(tmp_path, devices, state8):
  state = state8
  sharded8 = [x for x in jax.tree.leaves(state) if isinstance(x, jax.Array) and not x.sharding.is_fully_replicated]
  # 13 tensors of >= 2**10 elements (per block q/k/v/out and fc1/fc2 kernels, the patch embedding), each as
  # a parameter and its two Adam moments.
  assert len(sharded8) == 13 * 3
  with CheckpointManager(str(tmp_path)) as ckpt:
    ckpt.save(12, state)

  mesh = parallel.create_mesh({"fsdp": -1}, devices=jax.devices()[:devices])
  target = abstract_state(mesh, state)
  restored = CheckpointManager(str(tmp_path)).restore(target)
  assert_bit_identical(restored, state)
  arrays = lambda tree: [x for x in jax.tree.leaves(tree) if isinstance(x, (jax.Array, jax.ShapeDtypeStruct))]
  for got, want in zip(arrays(restored), arrays(target)):
    assert got.sharding == want.sharding
    assert {d.id for d in got.devices()} <= set(range(devices))
  fc1 = restored["opt_state"][0].mu["block_1"]["mlp"]["fc1"]["kernel"]  # (32, 128): 128 split over fsdp
  assert {s.data.shape for s in fc1.addressable_shards} == {(32, 128 // devices)}


def test_a_changed_model_is_a_clear_error(tmp_path, state8):
  with CheckpointManager(str(tmp_path)) as ckpt:
    ckpt.save(1, {"params": state8["params"]})
  ckpt = CheckpointManager(str(tmp_path))
  deeper = VisionTransformer(num_classes=10, image_size=16, patch_size=4, width=32, depth=3, mlp_dim=128, num_heads=4)
  target = {"params": nn.meta.unbox(boxed_params(deeper))}
  with pytest.raises(ValueError, match=r"target has 16 entries the checkpoint lacks, first \['params/block_2/"):
    ckpt.restore(target)
  wider = VisionTransformer(num_classes=10, image_size=16, patch_size=4, width=32, depth=2, mlp_dim=256, num_heads=4)
  target = {"params": nn.meta.unbox(boxed_params(wider))}
  with pytest.raises(
    ValueError,
    match=r"shapes differ, first params/block_0/mlp/fc1/bias: checkpoint \(128,\) "
    r"vs target \(256,\)",
  ):
    ckpt.restore(target)
  with pytest.raises(ValueError, match=r"checkpoint has 1 entries the target lacks, first \['params/head/bias'\]"):
    params = nn.meta.unbox(boxed_params())
    del params["head"]["bias"]
    ckpt.restore({"params": params})
  ckpt.close()


def test_missing_checkpoints_and_bad_arguments_are_clear_errors(tmp_path):
  empty = CheckpointManager(str(tmp_path / "run"))
  assert (empty.latest_step(), empty.best_step(), empty.all_steps()) == (None, None, [])
  with pytest.raises(FileNotFoundError, match=rf"No checkpoint in {tmp_path / 'run'}"):
    empty.restore({"x": np.zeros(2)})
  empty.save(4, {"x": np.zeros(2)})
  with pytest.raises(FileNotFoundError, match=r"No checkpoint of step 3 .* it has steps \[4\]"):
    empty.restore({"x": np.zeros(2)}, step=3)
  empty.close()
  with pytest.raises(ValueError, match=r"lack best_metric='top1'"):
    CheckpointManager(str(tmp_path / "b"), best_metric="top1").save(1, {"x": np.zeros(2)}, metrics={"acc": 0.5})
  with pytest.raises(ValueError, match=r"\['rng'\] is a typed PRNG key; save jax.random.key_data"):
    CheckpointManager(str(tmp_path / "k")).save(1, {"rng": jax.random.key(0)})
  with pytest.raises(ValueError, match=r"keep must be an int >= 1"):
    CheckpointManager(str(tmp_path / "c"), keep=0)
  with pytest.raises(ValueError, match=r"best_mode must be one of \('max', 'min'\)"):
    CheckpointManager(str(tmp_path / "d"), best_mode="maximum")


def test_a_save_killed_midway_is_never_picked_up(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = ROOT
  with open(tmp_path / "worker.log", "w") as log:
    proc = subprocess.Popen(
      [sys.executable, "-m", "tests.train.checkpoint_worker", "killed_save", str(tmp_path / "ckpt")],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=log,
      text=True,
    )
    line = proc.stdout.readline()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
  assert line.strip() == "SAVING", open(tmp_path / "worker.log").read()[-3000:]
  # Killed in the middle of step 2: only its temporary directory exists.
  assert sorted(os.listdir(tmp_path / "ckpt"))[:1] == ["1"] and not os.path.exists(tmp_path / "ckpt" / "2")
  assert glob.glob(str(tmp_path / "ckpt" / "2.orbax-checkpoint-tmp*"))

  ckpt = CheckpointManager(str(tmp_path / "ckpt"))
  assert (ckpt.latest_step(), ckpt.all_steps()) == (1, [1])
  expected = checkpoint_worker.small_state(1)
  assert_bit_identical(ckpt.restore(expected), expected)
  assert_bit_identical(ckpt.restore(expected, step=None), expected)
  # The new run saves again; the leftover is deleted although step 2 is not saved again (say the save
  # interval changed), so killed saves do not pile up on disk.
  ckpt.save(3, checkpoint_worker.small_state(3))
  ckpt.save(4, checkpoint_worker.small_state(4))
  ckpt.wait()
  assert ckpt.all_steps() == [1, 3, 4]
  assert sorted(os.listdir(tmp_path / "ckpt")) == ["1", "3", "4"]
  for step in (3, 4):
    assert_bit_identical(ckpt.restore(checkpoint_worker.small_state(0), step=step), checkpoint_worker.small_state(step))
  ckpt.close()
