"""The one switch of the CPU kernels: backend default, environment variable, context manager, trace-time choice."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvm_jax import kernels


def _uses_custom_gradient(fn, *args) -> bool:
  # A new function each time: jax would hand back its cached trace of `fn`, taken under another setting.
  return "custom_vjp_call" in str(jax.make_jaxpr(lambda *a: fn(*a))(*args))


def test_default_is_on_exactly_on_the_cpu_backend(monkeypatch):
  monkeypatch.delenv(kernels.ENV_VAR, raising=False)
  assert jax.default_backend() == "cpu" and kernels.cpu_kernels_enabled()
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert not kernels.cpu_kernels_enabled()


@pytest.mark.parametrize("value, enabled", [("1", True), ("0", False), ("true", True), ("OFF", False), ("", True)])
def test_environment_variable(value, enabled, monkeypatch):
  monkeypatch.setenv(kernels.ENV_VAR, value)
  assert kernels.cpu_kernels_enabled() == enabled
  assert _uses_custom_gradient(kernels.matmul, jnp.ones((2, 3)), jnp.ones((3, 4))) == enabled


def test_a_bad_environment_value_is_named(monkeypatch):
  monkeypatch.setenv(kernels.ENV_VAR, "yes please")
  with pytest.raises(ValueError, match=r"\$LVM_JAX_CPU_KERNELS='yes please': expected 1 or 0"):
    kernels.cpu_kernels_enabled()


def test_context_manager_wins_over_the_environment_nests_and_restores(monkeypatch):
  monkeypatch.setenv(kernels.ENV_VAR, "1")
  with kernels.use_cpu_kernels(False):
    assert not kernels.cpu_kernels_enabled()
    with kernels.use_cpu_kernels(True):
      assert kernels.cpu_kernels_enabled()
    assert not kernels.cpu_kernels_enabled()
  assert kernels.cpu_kernels_enabled()
  with pytest.raises(RuntimeError):
    with kernels.use_cpu_kernels(False):
      raise RuntimeError
  assert kernels.cpu_kernels_enabled()


def test_the_choice_is_taken_at_trace_time():
  """A function traced before the switch flips keeps its choice, under any jit wrapper, until the caches go."""
  x, kernel = jnp.ones((2, 7)), jnp.ones((7, 4))

  def product(x, kernel):
    return kernels.matmul(x, kernel)

  program = lambda fn: str(jax.make_jaxpr(fn)(x, kernel))
  assert "custom_vjp_call" in program(jax.jit(product))
  with kernels.use_cpu_kernels(False):
    assert "custom_vjp_call" in program(jax.jit(product))  # traced already: kept
    assert "custom_vjp_call" not in program(jax.jit(lambda x, kernel: product(x, kernel)))  # a new function
    jax.clear_caches()
    assert "custom_vjp_call" not in program(jax.jit(product))


@pytest.mark.parametrize("name", ["matmul", "conv", "max_pool", "attention"])
def test_each_kernel_off_is_its_plain_reference_and_on_equals_it(name):
  """Off: no custom gradient and jax.jvp works. On: the custom gradient, equal to the reference within float32
  rounding, forward and backward."""
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  fn, args = {
    "matmul": (kernels.matmul, (normal(2, 5, 8), normal(8, 6))),
    "conv": (lambda x, w: kernels.conv(x, w, (1, 1), ((1, 1), (1, 1))), (normal(2, 6, 7, 4), normal(3, 3, 4, 5))),
    "max_pool": (kernels.max_pool_3x3s2, (normal(2, 9, 8, 3),)),
    "attention": (kernels.xla_attention, (normal(2, 7, 3, 8), normal(2, 7, 3, 8), normal(2, 7, 3, 8))),
  }[name]
  loss = lambda *a: jnp.sum(jnp.sin(fn(*a)))
  with kernels.use_cpu_kernels(False):
    assert not _uses_custom_gradient(jax.grad(loss, argnums=tuple(range(len(args)))), *args)
    reference = fn(*args), jax.grad(loss, argnums=tuple(range(len(args))))(*args)
    jax.jvp(fn, args, args)
  with kernels.use_cpu_kernels(True):
    assert _uses_custom_gradient(fn, *args)
    fast = fn(*args), jax.grad(loss, argnums=tuple(range(len(args))))(*args)
  for got, want in zip(jax.tree.leaves(fast), jax.tree.leaves(reference)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
