"""Shared blocks: GELU against torch's, the dense layer against nn.Dense."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lvm_jax.models import layers


def test_gelu_matches_torch_exact_gelu_and_keeps_the_dtype():
  x = np.linspace(-12, 12, 20001, dtype=np.float32)
  expected = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(np.asarray(layers.gelu(jnp.asarray(x))), expected, rtol=1e-6, atol=2e-6)
  tanh_approx = torch.nn.functional.gelu(torch.from_numpy(x), approximate="tanh").numpy()
  assert np.abs(np.asarray(layers.gelu(jnp.asarray(x))) - tanh_approx).max() > 1e-4  # the exact form, not tanh
  assert layers.gelu(jnp.ones(3, jnp.bfloat16)).dtype == jnp.bfloat16


@pytest.mark.parametrize("use_bias", [True, False])
def test_dense_is_flax_dense_with_the_same_parameters(use_bias):
  x = jax.random.normal(jax.random.key(0), (2, 9, 12))
  ours, flax_dense = layers.Dense(5, use_bias=use_bias), nn.Dense(5, use_bias=use_bias)
  variables = flax_dense.init(jax.random.key(1), x)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x)) == jax.tree.map(jnp.shape, variables)
  np.testing.assert_allclose(ours.init(jax.random.key(1), x)["params"]["kernel"], variables["params"]["kernel"])
  np.testing.assert_allclose(ours.apply(variables, x), flax_dense.apply(variables, x), rtol=1e-6, atol=1e-6)
  grads = [jax.grad(lambda v, m=m: jnp.sum(m.apply(v, x) ** 2))(variables) for m in (ours, flax_dense)]
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
