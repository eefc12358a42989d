"""Throughput: img/s, ETA and pauses on a fake clock; FLOPs of compiled steps; published peaks; MFU."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from lvm_jax.train import throughput as tp


class FakeClock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def test_img_per_sec_and_eta_exclude_compilation_and_pauses():
  clock = FakeClock()
  meter = tp.Throughput(total_steps=1000, global_batch_size=256, start_step=0, clock=clock)
  clock.now = 100.0  # 10 steps, 100 s: compilation -- starts the clock, reports nothing
  assert meter.update(10) == {}
  clock.now = 110.0  # 50 steps in 10 s
  assert meter.update(60) == {"img_per_sec": 1280.0, "steps_per_sec": 5.0, "eta_seconds": 940 * 0.2}
  clock.now = 115.0
  with meter.paused():  # a 30 s eval
    clock.now = 145.0
  clock.now = 160.0  # 50 steps in 50 s wall, 20 s of training
  out = meter.update(110)
  assert out["steps_per_sec"] == 2.5 and out["img_per_sec"] == 640.0
  # ETA: 890 steps left at the mean wall time a step took since the clock started, eval included (60 s / 100).
  assert out["eta_seconds"] == pytest.approx(890 * 0.6, rel=1e-12)
  assert meter.update(110) == {}  # no new steps: nothing to measure
  clock.now = 170.0
  assert meter.update(1000)["eta_seconds"] == 0.0


def test_pause_resume_misuse_is_an_error():
  meter = tp.Throughput(total_steps=10, global_batch_size=8, clock=FakeClock())
  with pytest.raises(RuntimeError, match="without pause"):
    meter.resume()
  meter.pause()
  with pytest.raises(RuntimeError, match="twice"):
    meter.pause()
  with pytest.raises(RuntimeError, match="while paused"):
    meter.update(1)
  meter.resume()
  meter.update(5)
  with pytest.raises(ValueError, match="went back"):
    meter.update(4)
  with pytest.raises(ValueError, match="global_batch_size"):
    tp.Throughput(total_steps=10, global_batch_size=0)


M, K, N = 64, 128, 32


def test_compiled_flops_of_a_matmul_is_2mkn():
  f = jax.jit(lambda a, b: a @ b)
  compiled = f.lower(jnp.zeros((M, K)), jnp.zeros((K, N))).compile()
  assert tp.compiled_flops(compiled) == 2 * M * K * N  # 524,288 on CPU, jax 0.10.2


def test_compiled_flops_sums_the_per_device_programs():
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  rows, replicated = NamedSharding(mesh, P("data", None)), NamedSharding(mesh, P())
  args = (jax.ShapeDtypeStruct((M, K), jnp.float32), jax.ShapeDtypeStruct((K, N), jnp.float32))
  sharded = jax.jit(lambda a, b: a @ b, in_shardings=(rows, replicated), out_shardings=rows).lower(*args).compile()
  assert sharded.cost_analysis()["flops"] == 2 * M * K * N / 8  # XLA counts one device's share
  assert tp.compiled_flops(sharded) == 2 * M * K * N
  # Replicated work is done by each of the 8 devices, and counted so.
  both = jax.jit(lambda a, b: a @ b, in_shardings=(replicated, replicated), out_shardings=replicated)
  assert tp.compiled_flops(both.lower(*args).compile()) == 8 * 2 * M * K * N


@pytest.mark.parametrize(
  "analysis, expected",
  [
    ([{"flops": 10.0}], 10.0),  # older jax: a list with one dict per program
    ({"bytes accessed": 4.0}, None),
    (None, None),
    ({"flops": -1.0}, None),
  ],
)
def test_compiled_flops_without_a_usable_cost_analysis(analysis, expected):
  assert tp.compiled_flops(types.SimpleNamespace(cost_analysis=lambda: analysis)) == expected


def test_compiled_flops_when_the_backend_raises():
  def unsupported():
    raise NotImplementedError("no cost model")

  assert tp.compiled_flops(types.SimpleNamespace(cost_analysis=unsupported)) is None


@pytest.mark.parametrize(
  "kind, dtype, expected",
  [
    ("TPU v4", "bfloat16", 275e12),
    ("TPU v4", jnp.float32, 275e12),  # default precision: bf16 MXU passes
    ("TPU v3", "bfloat16", 61.5e12),  # per TensorCore (a JAX device), 123e12 a chip
    ("TPU v5 lite", "bfloat16", 197e12),
    ("TPU v5", "bfloat16", 459e12),  # v5p
    ("TPU v6 lite", "bfloat16", 918e12),
    ("TPU v4", "float16", None),
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989.5e12),
    ("NVIDIA H100 80GB HBM3", "float32", 494.5e12),  # TF32
    ("NVIDIA H100 80GB HBM3", "float16", 989.5e12),
    ("NVIDIA H100 PCIe", "bfloat16", 756.5e12),
    ("NVIDIA H200", "bfloat16", 989.5e12),
    ("NVIDIA A100-SXM4-40GB", "float32", 156e12),
    ("NVIDIA L4", "bfloat16", 121e12),
    ("NVIDIA L40S", "bfloat16", None),  # unknown: None, not a wrong guess from "L4"
    ("NVIDIA H100 80GB HBM3", "int8", None),
  ],
)
def test_peak_flops_per_device(kind, dtype, expected):
  assert tp.peak_flops_per_device(types.SimpleNamespace(device_kind=kind), dtype) == expected


def test_no_published_peak_for_cpu():
  assert tp.peak_flops_per_device(jax.devices()[0], "float32") is None


def test_mfu_arithmetic():
  assert tp.mfu(2e12, 3.0, 24e12) == 0.25
  assert tp.mfu(None, 3.0, 24e12) is None
  assert tp.mfu(2e12, 3.0, None) is None
  assert tp.mfu(2e12, {}.get("steps_per_sec"), 24e12) is None  # the first, untimed Throughput.update


class MatmulClock(FakeClock):
  """A clock that every executed [SIZE, SIZE] matmul advances by SECONDS_PER_MATMUL: rates measured on it are
  exact, whatever the machine's load, and a matmul that is not really run does not count."""

  def __init__(self):
    super().__init__()
    self.matmuls = 0

  def tick(self):
    """Called where the matmul is traced, so the callback runs each time it is executed."""
    jax.debug.callback(self._advance)

  def _advance(self):
    self.now += SECONDS_PER_MATMUL
    self.matmuls += 1


SIZE, SECONDS_PER_MATMUL = 512, 0.01


def test_measured_peak_and_mfu_of_the_same_matmul_agree(monkeypatch):
  """The units line up: a step that is one big matmul runs at the measured matmul peak (MFU 1); an 8x unit error
  (per-device vs total FLOPs) or a peak that miscounts the matmuls it timed would not give 1."""
  clock = MatmulClock()
  monkeypatch.setattr(tp, "time", types.SimpleNamespace(perf_counter=clock))
  fori_loop = jax.lax.fori_loop
  monkeypatch.setattr(
    jax.lax, "fori_loop", lambda lo, hi, body, init: fori_loop(lo, hi, lambda i, y: (clock.tick(), body(i, y))[1], init)
  )
  peak = tp.measured_matmul_peak("float32", size=SIZE, seconds=0.3)
  assert peak == pytest.approx(2 * SIZE**3 / SECONDS_PER_MATMUL, rel=1e-9)
  # It aims at `seconds`: 1 matmul to compile, 1 to time, then 30 (0.3 s); no runaway loop.
  assert clock.matmuls == 32

  def matmul_step(a):
    clock.tick()
    return a @ a * 1e-3

  x = jnp.asarray(np.random.default_rng(0).standard_normal((SIZE, SIZE)), jnp.float32)
  step = jax.jit(matmul_step).lower(x).compile()
  flops = tp.compiled_flops(step)
  assert 2 * SIZE**3 <= flops <= 2 * SIZE**3 + 2 * SIZE**2  # the matmul and the scaling
  meter = tp.Throughput(total_steps=10**6, global_batch_size=1, clock=clock)
  jax.block_until_ready(step(x))
  meter.update(0)
  for _ in range(5):
    jax.block_until_ready(step(x))
  rate = meter.update(5)["steps_per_sec"]
  assert rate == pytest.approx(1 / SECONDS_PER_MATMUL, rel=1e-9)
  assert tp.mfu(flops, rate, peak) == pytest.approx(1.0, rel=1e-2)


def test_total_peak_on_cpu_is_one_measurement_for_all_fake_devices():
  devices = jax.devices()
  assert len(devices) == 8
  assert tp.total_peak_flops("float32", [types.SimpleNamespace(device_kind="TPU v4", platform="tpu")] * 4) == 1100e12
  assert 1e9 < tp.total_peak_flops("float32", devices) < 1e13
