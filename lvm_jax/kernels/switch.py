"""The one switch of the CPU kernels: a context manager, an environment variable, and the backend default."""

import contextlib
import contextvars
import os
from typing import Iterator

import jax

ENV_VAR = "LVM_JAX_CPU_KERNELS"
_VALUES = {"1": True, "true": True, "on": True, "0": False, "false": False, "off": False}
# A context variable, not a global: a use_cpu_kernels block in one thread leaves other threads' tracing alone.
_OVERRIDE: contextvars.ContextVar = contextvars.ContextVar("lvm_jax_cpu_kernels", default=None)


def cpu_kernels_enabled() -> bool:
  """Whether the CPU kernels run: the innermost use_cpu_kernels block, else $LVM_JAX_CPU_KERNELS (1/0), else on
  exactly where jax's default backend is the CPU (the kernels were written for XLA:CPU's weak spots)."""
  override = _OVERRIDE.get()
  if override is not None:
    return override
  value = os.environ.get(ENV_VAR, "").strip().lower()
  if value:
    if value not in _VALUES:
      raise ValueError(f"${ENV_VAR}={os.environ[ENV_VAR]!r}: expected 1 or 0 (or true/false, on/off).")
    return _VALUES[value]
  return jax.default_backend() == "cpu"


@contextlib.contextmanager
def use_cpu_kernels(enabled: bool) -> Iterator[None]:
  """Turns the CPU kernels on or off for the code traced inside the block (over the environment variable).

  The choice is taken when a function is traced, and jax keeps a function's trace for inputs of the same shapes
  (under any jax.jit wrapper of it): a function traced before the block keeps its choice inside it. Flip the
  switch before the first trace, or call jax.clear_caches() after flipping it.
  """
  token = _OVERRIDE.set(bool(enabled))
  try:
    yield
  finally:
    _OVERRIDE.reset(token)
