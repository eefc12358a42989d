"""The depthwise convolution's CPU form (shifted multiply-adds) against lax's grouped convolution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lvm_jax
from lvm_jax import kernels
from lvm_jax.kernels import depthwise


@pytest.mark.parametrize(
  "size,kernel_size,pad,strides",
  [
    ((2, 9, 7, 5), 7, ((3, 3), (3, 3)), 1),
    ((1, 4, 6, 3), 3, ((1, 1), (1, 1)), 1),
    ((2, 2, 3, 4), 7, ((3, 3), (3, 3)), 1),  # a map smaller than the kernel
    ((1, 6, 5, 3), 3, ((0, 2), (1, 0)), 1),  # uneven padding: the input gradient's padding differs on each side
    ((2, 7, 8, 3), 3, ((1, 1), (1, 1)), 2),  # MobileNet's stride 2; an odd side leaves no row unread
    ((1, 9, 6, 4), 5, ((1, 2), (2, 2)), 2),  # EfficientNet's SAME padding, uneven
    ((1, 8, 7, 2), 3, ((0, 0), (0, 0)), 3),  # rows and columns past the last window get no gradient
  ],
)
def test_cpu_form_equals_the_grouped_convolution_and_its_gradients(size, kernel_size, pad, strides):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(size), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((kernel_size, kernel_size, 1, size[-1])), jnp.float32)
  outputs = []
  for form in (depthwise.reference_depthwise_conv, depthwise.cpu_depthwise_conv):
    conv = lambda x, k: form(x, k, pad, strides)
    loss = lambda x, k: jnp.sum(jnp.sin(conv(x, k)))
    outputs.append((jax.jit(conv)(x, kernel), jax.jit(jax.grad(loss, argnums=(0, 1)))(x, kernel)))
  (want, want_grads), (got, got_grads) = outputs
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def test_convnext_gives_the_same_logits_with_the_switch_on_and_off():
  model = lvm_jax.create_model("convnext_tiny", depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), num_classes=5)
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  variables = jax.jit(model.init)(jax.random.key(0), x)
  logits = {}
  for enabled in (False, True):
    with kernels.use_cpu_kernels(enabled):
      logits[enabled] = jax.jit(lambda v, x: model.apply(v, x))(variables, x)
  np.testing.assert_allclose(logits[True], logits[False], rtol=1e-5, atol=1e-5)
