"""How fast training runs: images/s and ETA from the wall clock, FLOPs of a compiled step, peak FLOP/s, MFU.

MFU (model FLOPs utilisation) = FLOPs of one step * steps/s / peak FLOP/s of all devices. The step's FLOPs
come from XLA's cost analysis of the compiled step (what the program really computes, rematerialisation
included), the peak from the vendors' published dense numbers, or, on CPU, a matmul measured on this host.
"""

import contextlib
import functools
import re
import time

import jax
import jax.numpy as jnp
import numpy as np


class Throughput:
  """Images/s and ETA from wall-clock time between calls; excludes the first (compilation) interval.

  Call `update(step)` at log time, after the step's results were fetched (so the devices are synced). The first
  call only starts the clock: the interval before it holds compilation and returns {}. Later calls return
  {"img_per_sec", "steps_per_sec", "eta_seconds"}:
    - img/s and steps/s over the steps since the previous call, minus the time spent paused (eval, checkpoints);
    - ETA: the steps left times the mean wall time a step has taken since the clock started, pauses included,
      because evals and checkpoints recur until the end and the user waits for them too.
  """

  def __init__(self, *, total_steps: int, global_batch_size: int, start_step: int = 0, clock=time.perf_counter):
    for name, value in (("total_steps", total_steps), ("global_batch_size", global_batch_size)):
      if not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"Throughput: {name} must be a positive int, got {value!r}.")
    if not 0 <= start_step <= total_steps:
      raise ValueError(f"Throughput: start_step={start_step!r} must be in [0, total_steps={total_steps}].")
    self.total_steps = int(total_steps)
    self.global_batch_size = int(global_batch_size)
    self._clock = clock
    self._last_step = int(start_step)
    self._last_time = None  # None until the first update (the compilation interval) has passed
    self._origin = None  # (step, time) where the clock started, for the ETA
    self._paused_at = None
    self._paused_seconds = 0.0  # paused since the previous update

  def update(self, step: int) -> dict:
    if self._paused_at is not None:
      raise RuntimeError("Throughput.update() while paused: call resume() first.")
    step, now = int(step), self._clock()
    if step < self._last_step:
      raise ValueError(f"Throughput.update(step={step}) went back from step {self._last_step}.")
    if self._last_time is None:
      self._last_step, self._last_time, self._origin = step, now, (step, now)
      self._paused_seconds = 0.0
      return {}
    if step == self._last_step:
      return {}
    train_seconds = now - self._last_time - self._paused_seconds
    steps = step - self._last_step
    self._last_step, self._last_time, self._paused_seconds = step, now, 0.0
    if train_seconds <= 0:  # a clock too coarse to time this interval: report nothing rather than infinity
      return {}
    steps_per_sec = steps / train_seconds
    wall_per_step = (now - self._origin[1]) / (step - self._origin[0])
    return {
      "img_per_sec": steps_per_sec * self.global_batch_size,
      "steps_per_sec": steps_per_sec,
      "eta_seconds": max(self.total_steps - step, 0) * wall_per_step,
    }

  def pause(self) -> None:
    if self._paused_at is not None:
      raise RuntimeError("Throughput.pause() twice without resume().")
    self._paused_at = self._clock()

  def resume(self) -> None:
    if self._paused_at is None:
      raise RuntimeError("Throughput.resume() without pause().")
    self._paused_seconds += self._clock() - self._paused_at
    self._paused_at = None

  @contextlib.contextmanager
  def paused(self):
    """`with throughput.paused(): evaluate()` -- the block's time is not training time."""
    self.pause()
    try:
      yield
    finally:
      self.resume()


def compiled_cost(compiled, key: str) -> float | None:
  """One entry ("flops", "bytes accessed", ...) of XLA's cost analysis of a compiled program, for the
  per-device program. None when the backend gives no cost analysis or no such (non-negative) entry."""
  try:
    analysis = compiled.cost_analysis()
  except (NotImplementedError, RuntimeError):  # backends without a cost model raise instead of returning None
    return None
  if isinstance(analysis, (list, tuple)):  # jax < 0.4.30 returned one dict per program
    analysis = analysis[0] if analysis else None
  value = (analysis or {}).get(key)
  return None if value is None or value < 0 else float(value)


def compiled_flops(compiled) -> float | None:
  """FLOPs of one call of `jax.jit(f).lower(*args).compile()`, summed over the devices it runs on.

  XLA reports the FLOPs of the per-device program of an SPMD-partitioned computation (checked with jax 0.10.2 on
  8 CPU devices: a matmul sharded 8 ways reports 1/8 of 2*m*k*n), so the count is multiplied by the number of
  devices in the program's shardings. Work replicated on every device is therefore counted once per device.
  None when the backend gives no cost analysis or no "flops" entry.
  """
  flops = compiled_cost(compiled, "flops")
  return None if flops is None else flops * _num_devices(compiled)


def _num_devices(compiled) -> int:
  shardings = jax.tree.leaves((getattr(compiled, "input_shardings", ()), getattr(compiled, "output_shardings", ())))
  return max([len(s.device_set) for s in shardings if hasattr(s, "device_set")] or [1])


# Dense (no sparsity) peak FLOP/s of one JAX device, from the vendors' published specs.
# TPU (cloud.google.com/tpu/docs, system architecture and per-version pages; bf16 per chip): v2 45e12 and
# v3 123e12 per chip with 2 TensorCores, each its own JAX device, so half of it per device; v4 275e12 and v5p
# 459e12 (megacore: one device a chip); v5e 197e12; v6e (Trillium) 918e12. float32 matmuls at JAX's default
# precision run as bfloat16 passes on the MXU, so the bfloat16 peak applies to them too.
_TPU_BF16 = {
  "TPU v2": 22.5e12,
  "TPU v3": 61.5e12,
  "TPU v4": 275e12,
  "TPU v5 lite": 197e12,
  "TPU v5e": 197e12,
  "TPU v5": 459e12,
  "TPU v5p": 459e12,
  "TPU v6 lite": 918e12,
  "TPU v6e": 918e12,
}
# NVIDIA datasheets list sparse Tensor Core numbers (marked *); these are half of them (dense). float32 uses the
# TF32 Tensor Core peak, since JAX's default precision runs float32 matmuls as TF32 on Ampere and newer.
#   A100 (SXM and PCIe, 40/80GB) datasheet: BF16 312, TF32 156 TFLOPS (dense).
#   H100 datasheet: SXM BF16 1,979* / TF32 989*; PCIe 1,513* / 756*; NVL 1,671* / 835*.
#   H200 datasheet: SXM as H100 SXM; NVL as H100 NVL.   L4 datasheet: BF16 242*, TF32 120*.
#   A10 datasheet: BF16 250*, TF32 125*.
# (regex on device_kind, {dtype: FLOP/s}); first match wins, so the specific names come first.
_NVIDIA = (
  (r"NVIDIA A100\b.*", {"bfloat16": 312e12, "float32": 156e12}),
  (r"NVIDIA H100 PCIe.*", {"bfloat16": 756.5e12, "float32": 378e12}),
  (r"NVIDIA H[12]00 NVL.*", {"bfloat16": 835.5e12, "float32": 417.5e12}),
  (r"NVIDIA (H100|GH200|H200)\b.*", {"bfloat16": 989.5e12, "float32": 494.5e12}),
  (r"NVIDIA L4", {"bfloat16": 121e12, "float32": 60e12}),
  (r"NVIDIA A10", {"bfloat16": 125e12, "float32": 62.5e12}),
)


def peak_flops_per_device(device, dtype) -> float | None:
  """Published dense peak FLOP/s of `device` (a jax Device, or anything with .device_kind) for `dtype`.

  dtype: bfloat16 or float16 (same Tensor Core/MXU rate), float32 (TF32 on NVIDIA; bf16 passes on TPU).
  None for CPU, unknown devices and other dtypes: pass a measured or known peak to `mfu` instead.
  """
  name = jnp.dtype(dtype).name
  key = {"bfloat16": "bfloat16", "float16": "bfloat16", "float32": "float32"}.get(name)
  kind = str(getattr(device, "device_kind", ""))
  if key is None or getattr(device, "platform", None) == "cpu":
    return None
  if kind in _TPU_BF16:
    return None if name == "float16" else _TPU_BF16[kind]  # TPUs have no float16 matmul unit
  for pattern, peaks in _NVIDIA:
    if re.fullmatch(pattern, kind):
      return peaks[key]
  return None


@functools.cache
def _host_matmul_peak(dtype: str) -> float:
  """Measured once a process: the host does not get faster between runs."""
  return measured_matmul_peak(dtype)


def measured_matmul_peak(dtype="float32", size: int = 1024, seconds: float = 0.5) -> float:
  """FLOP/s of a jitted square matmul on the default backend's first device, measured now.

  For CPU, which has no published peak (all of a host's cores serve every one of its CPU devices, fake ones
  included, so this is the host's peak). The matmuls run chained inside one jitted loop so dispatch overhead
  does not count; the loop grows until one call lasts at least `seconds` / 2 (it aims at `seconds`).
  """
  if size < 1 or seconds <= 0:
    raise ValueError(f"measured_matmul_peak: size={size} and seconds={seconds} must be positive.")
  # An orthogonal right factor keeps the chained product's norm fixed: no overflow, no denormals.
  q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((size, size)))
  q = jnp.asarray(q, dtype)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((size, size)), dtype)
  # The chain (x @ q @ q ...) is loop-carried, so XLA cannot hoist the matmul out of the loop.
  chain = jax.jit(lambda x, q, n: jax.lax.fori_loop(0, n, lambda _, y: y @ q, x))
  jax.block_until_ready(chain(x, q, 1))  # compile
  n = 1
  while True:
    start = time.perf_counter()
    jax.block_until_ready(chain(x, q, n))
    elapsed = time.perf_counter() - start
    if elapsed >= seconds / 2 or n >= 2**24:
      return 2.0 * size**3 * n / elapsed
    n = max(2 * n, int(n * seconds / max(elapsed, 1e-9)))


def mfu(flops_per_step: float | None, steps_per_sec: float | None, peak_total: float | None) -> float | None:
  """Fraction of the peak used: flops_per_step * steps_per_sec / peak_total (all devices); None if any is unknown
  (steps_per_sec is None at the first `Throughput.update`, whose interval is not timed)."""
  if flops_per_step is None or peak_total is None or peak_total <= 0 or steps_per_sec is None:
    return None
  return flops_per_step * steps_per_sec / peak_total


def total_peak_flops(dtype, devices=None) -> float | None:
  """Peak FLOP/s of `devices` (default: all of them) together: published per-device peak * count, or on CPU
  the matmul measured on this host times the number of processes (hosts). None for unknown accelerators."""
  devices = list(devices) if devices is not None else jax.devices()
  per_device = peak_flops_per_device(devices[0], dtype)
  if per_device is not None:
    return per_device * len(devices)
  if devices[0].platform == "cpu":
    return _host_matmul_peak(str(dtype)) * len({d.process_index for d in devices})
  return None
