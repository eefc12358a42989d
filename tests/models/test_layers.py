"""Shared blocks: GELU against torch's."""

import jax.numpy as jnp
import numpy as np
import torch

from lvm_jax.models import layers


def test_gelu_matches_torch_exact_gelu_and_keeps_the_dtype():
  x = np.linspace(-12, 12, 20001, dtype=np.float32)
  expected = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(np.asarray(layers.gelu(jnp.asarray(x))), expected, rtol=1e-6, atol=2e-6)
  tanh_approx = torch.nn.functional.gelu(torch.from_numpy(x), approximate="tanh").numpy()
  assert np.abs(np.asarray(layers.gelu(jnp.asarray(x))) - tanh_approx).max() > 1e-4  # the exact form, not tanh
  assert layers.gelu(jnp.ones(3, jnp.bfloat16)).dtype == jnp.bfloat16
