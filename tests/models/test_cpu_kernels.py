"""Every model with the CPU kernels off (plain Flax/XLA: no custom gradient, jax.jvp works) and on (the same
outputs and gradients within float32 rounding)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvm_jax import kernels
from lvm_jax.models.resnet import ResNet
from lvm_jax.models.swin import SwinTransformer
from lvm_jax.models.vit import VisionTransformer

# Small, but every kernel runs: dense layers and attention (ViT, Swin with a window bias and a patch merging),
# 1x1, 3x3 stride-1 (Winograd) and strided convolutions and the stem's max pool (a bottleneck ResNet).
MODELS = {
  "vit": VisionTransformer(image_size=16, patch_size=4, width=32, depth=2, mlp_dim=64, num_heads=2, num_classes=5),
  "swin": SwinTransformer(
    image_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 2), num_classes=5
  ),
  "resnet": ResNet(stage_sizes=(1, 1), block="bottleneck", width=8, stage_widths=(4, 8), num_classes=5),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def case(request):
  """(model, images, variables): noise of the variables' shapes (norm scales around 1), so no head or branch
  starts at zero and every kernel's gradient matters."""
  model = MODELS[request.param]
  size = getattr(model, "image_size", 32)
  images = jax.random.normal(jax.random.key(1), (2, size, size, 3))
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), images))
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    noise = 0.2 * rng.standard_normal(leaf.shape)
    if path[-1].key == "var":
      return jnp.asarray(1.0 + np.abs(noise), jnp.float32)
    return jnp.asarray(noise + (path[-1].key == "scale"), jnp.float32)

  return model, images, jax.tree_util.tree_map_with_path(fill, shapes)


def _loss_and_grads(model, variables):
  """The loss's value and gradients (params, images): a new function each call, so each is traced afresh under the
  switch setting of its first call (jax keeps a function's trace)."""
  weights = jnp.linspace(-1.0, 1.0, 10).reshape(2, 5)

  def loss(params, images):
    logits = model.apply({**variables, "params": params}, images)
    return jnp.sum(logits * weights)

  return jax.value_and_grad(loss, argnums=(0, 1))


def _forward_program(model, variables, images) -> str:
  return str(jax.make_jaxpr(lambda x: model.apply(variables, x))(images))


def test_switched_off_the_models_are_plain_xla_and_jvp_works(case):
  """No custom gradient anywhere: forward mode works on the model and on its gradient (forward over reverse)."""
  model, images, variables = case
  fn, params = _loss_and_grads(model, variables), variables["params"]
  tangent_in = jax.random.normal(jax.random.key(2), images.shape)
  tangent_params = jax.tree.map(lambda p: 0.1 * jnp.ones_like(p), params)
  with kernels.use_cpu_kernels(False):
    assert "custom_vjp_call" not in _forward_program(model, variables, images)
    out, tangent = jax.jit(lambda x, t: jax.jvp(lambda x: model.apply(variables, x), (x,), (t,)))(images, tangent_in)
    _, hessian_vector = jax.jit(lambda p, t: jax.jvp(lambda p: fn(p, images), (p,), (t,)))(params, tangent_params)
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(hessian_vector))
  # Forward mode agrees with reverse mode (the Jacobian from vjps, CPU kernels on) along the tangent.
  jacobian = jax.jit(jax.jacrev(lambda x: model.apply(variables, x)))(images)
  expected = jnp.einsum("ijbhwc,bhwc->ij", jacobian, tangent_in)
  assert np.isfinite(out).all() and np.abs(expected).max() > 0
  np.testing.assert_allclose(tangent, expected, rtol=1e-4, atol=1e-5 * float(np.abs(expected).max()))


def test_switched_on_the_models_equal_the_reference(case):
  model, images, variables = case
  params, results = variables["params"], {}
  for enabled in (False, True):
    fn = _loss_and_grads(model, variables)
    with kernels.use_cpu_kernels(enabled):
      assert ("custom_vjp_call" in _forward_program(model, variables, images)) == enabled
      results[enabled] = jax.jit(fn)(params, images)
  # Relative to the largest gradient: attention key biases have a zero gradient in exact arithmetic (a shift of a
  # query's logits), so both sides are rounding noise there.
  scale = max(float(np.abs(leaf).max()) for leaf in jax.tree.leaves(results[False][1]))
  for got, want in zip(jax.tree.leaves(results[True]), jax.tree.leaves(results[False])):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * max(scale, float(np.abs(want).max())))
