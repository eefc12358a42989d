"""Shared blocks: GELU against torch's, the dense layer against nn.Dense, channel rounding, TF SAME padding."""

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


def test_make_divisible_is_the_channel_rule_of_torchvision_timm_and_transformers():
  # Nearest multiple, at least the divisor (or min_value), one divisor more where rounding loses over 10%.
  assert [layers.make_divisible(v) for v in (64, 12, 4, 20, 11.2, 1280 * 1.4, 40 * 0.25)] == [
    64,
    16,
    8,
    24,
    16,
    1792,
    16,
  ]
  assert layers.make_divisible(3.0, 4) == 4 and layers.make_divisible(3.0, 8, min_value=4) == 4
  assert layers.make_divisible(30.0, 8, min_value=48) == 48 and type(layers.make_divisible(20.0, 8.0)) is int


def test_same_padding_and_conv2d_with_it_are_tensorflows_same():
  x = jax.random.normal(jax.random.key(0), (1, 9, 10, 3))
  pads = layers.same_padding(x.shape[1:3], 3, 2)
  assert pads == ((1, 1), (0, 1)) and layers.same_padding((9, 10), 5, 1) == ((2, 2), (2, 2))
  conv = layers.Conv2d(4, 3, 2, use_bias=False, padding=pads)
  variables = nn.meta.unbox(conv.init(jax.random.key(1), x))
  expected = jax.lax.conv_general_dilated(
    x, variables["params"]["kernel"], (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  np.testing.assert_allclose(conv.apply(variables, x), expected, rtol=1e-5, atol=1e-5)
