"""ViT with scan_layers: same function as the per-layer model, stacked params, sharding, pretrained loading."""

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import lvm_jax
from lvm_jax import logical_axes, parallel
from lvm_jax.models import vit
from lvm_jax.models.vit import VisionTransformer, stack_blocks, unstack_blocks

TINY = dict(num_classes=10, image_size=32, patch_size=8, width=32, depth=3, mlp_dim=64, num_heads=4)
FIXTURES = pathlib.Path(__file__).parent.parent / "fixtures" / "timm"


@pytest.fixture(scope="module")
def tiny():
  """(per-layer model, scanned model, images, per-layer variables) with a non-zero head."""
  model = VisionTransformer(**TINY)
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  variables = nn.meta.unbox(model.init(jax.random.key(0), x))
  # The head starts at zero, which would make every logit comparison trivially equal.
  head = variables["params"]["head"]
  head["kernel"] = 0.1 * jax.random.normal(jax.random.key(2), head["kernel"].shape)
  return model, model.clone(scan_layers=True), x, variables


def scanned(variables):
  return {"params": stack_blocks(variables["params"])}


def test_scanned_params_are_one_stacked_block(tiny):
  model, scan_model, x, variables = tiny
  own = nn.meta.unbox(scan_model.init(jax.random.key(0), x))["params"]
  assert "blocks" in own and not any(k.startswith("block_") for k in own)
  assert own["blocks"]["mlp"]["fc1"]["kernel"].shape == (3, 32, 64)
  stacked = stack_blocks(variables["params"])
  assert jax.tree.structure(stacked) == jax.tree.structure(own)
  assert jax.tree.map(jnp.shape, stacked) == jax.tree.map(jnp.shape, own)
  count = lambda tree: sum(np.size(leaf) for leaf in jax.tree.leaves(tree))
  assert count(own) == count(variables["params"])


def test_stack_unstack_round_trip(tiny):
  _, _, _, variables = tiny
  params = variables["params"]
  stacked = stack_blocks(params)
  np.testing.assert_array_equal(
    stacked["blocks"]["attn"]["query"]["kernel"][2], params["block_2"]["attn"]["query"]["kernel"]
  )
  back = unstack_blocks(stacked)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, back, params)


def test_stack_blocks_errors_name_the_problem(tiny):
  _, _, _, variables = tiny
  params = dict(variables["params"])
  with pytest.raises(ValueError, match="needs scanned ViT params"):
    unstack_blocks(params)
  del params["block_1"]
  with pytest.raises(ValueError, match="block_0 ... block_N-1"):
    stack_blocks(params)


@pytest.mark.parametrize("features", [False, True])
def test_scanned_and_per_layer_models_agree_in_eval(tiny, features):
  model, scan_model, x, variables = tiny
  run = lambda m, v: jax.jit(lambda v: m.apply(v, x, return_features=features))(v)
  want, got = run(model, variables), run(scan_model, scanned(variables))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), got, want)
  assert np.abs(np.asarray(jax.tree.leaves(want)[0])).max() > 1e-2  # not a trivially zero comparison


def test_scanned_and_per_layer_gradients_agree(tiny):
  model, scan_model, x, variables = tiny
  labels = jnp.array([3, 7])

  def grads(m, params):
    loss = lambda p: -jnp.mean(jax.nn.log_softmax(m.apply({"params": p}, x))[jnp.arange(2), labels])
    return jax.jit(jax.grad(loss))(params)

  want = stack_blocks(grads(model, variables["params"]))
  got = grads(scan_model, scanned(variables)["params"])
  # Within 1e-5 of each tensor's largest gradient (float32 sums in another order give ~1e-7 relative).
  close = lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5 * max(float(np.abs(b).max()), 1.0), rtol=0)
  jax.tree.map(close, got, want)
  assert float(np.abs(want["blocks"]["mlp"]["fc1"]["kernel"]).max()) > 1e-3


def test_each_scanned_layer_gets_its_own_drop_path_rate(tiny):
  _, scan_model, x, variables = tiny
  model = scan_model.clone(drop_path=0.3)
  rates = []

  def record(next_fun, args, kwargs, context):
    # Inside the scan the rate is traced: read each layer's value when the compiled loop runs.
    if isinstance(context.module, vit.EncoderBlock) and context.method_name == "__call__":
      jax.debug.callback(lambda r: rates.append(float(r)), kwargs["drop_path_rate"], ordered=True)
    return next_fun(*args, **kwargs)

  train = lambda seed: model.apply(scanned(variables), x, train=True, rngs={"dropout": jax.random.key(seed)})
  with nn.intercept_methods(record):
    out = jax.block_until_ready(train(0))
  np.testing.assert_allclose(rates, [0.0, 0.15, 0.3], atol=1e-7)
  np.testing.assert_allclose(rates, model.drop_path_rates(), atol=1e-7)
  eval_out = model.apply(scanned(variables), x)
  assert not np.allclose(out, eval_out)
  assert not np.allclose(train(0), train(1))
  np.testing.assert_array_equal(train(3), train(3))


def test_scanned_dropout_differs_between_layers(tiny):
  """split_rngs: each layer draws its own dropout mask, not one mask repeated depth times."""
  _, scan_model, x, variables = tiny
  model = scan_model.clone(dropout=0.5)
  masks = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if (
      isinstance(context.module, nn.Dropout)
      and context.module.name == "Dropout_0"
      and context.module.parent.name == "blocks"
    ):
      jax.debug.callback(lambda m: masks.append(np.asarray(m)), out == 0, ordered=True)
    return out

  with nn.intercept_methods(record):
    jax.block_until_ready(model.apply(scanned(variables), x, train=True, rngs={"dropout": jax.random.key(0)}))
  assert len(masks) == 3
  assert not np.array_equal(masks[0], masks[1]) and not np.array_equal(masks[1], masks[2])


SHARDED = VisionTransformer(**{**TINY, "depth": 8, "width": 64, "mlp_dim": 128}, scan_layers=True)


def _mesh(shape):
  if jax.device_count() < 8:
    pytest.skip("needs 8 (fake) devices: XLA_FLAGS is set by tests/conftest.py")
  return parallel.create_mesh(shape)


@pytest.mark.parametrize(
  "strategy, mesh, fc1, query",
  [
    ("dp", {"data": 8}, (None, None, None), (None, None, None, None)),
    ("fsdp", {"fsdp": 8}, (None, None, "fsdp"), (None, "fsdp", None, None)),
    ("tp", {"data": 4, "model": 2}, (None, None, "model"), (None, None, "model", None)),
  ],
)
def test_variable_specs_of_a_scanned_model(strategy, mesh, fc1, query):
  mesh = _mesh(mesh)
  boxed = jax.eval_shape(lambda: SHARDED.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  assert boxed["params"]["blocks"]["mlp"]["fc1"]["kernel"].names == (logical_axes.LAYERS, "embed", "mlp")
  specs = parallel.variable_specs(boxed, mesh, parallel.get_strategy(strategy, fsdp_min_size=1))["params"]
  # The layer axis (8, which would divide the mesh) stays whole: each scan step slices one whole layer.
  for spec in jax.tree.leaves(specs["blocks"], is_leaf=lambda s: isinstance(s, P)):
    assert len(spec) == 0 or spec[0] is None, spec
  assert tuple(specs["blocks"]["mlp"]["fc1"]["kernel"]) == fc1
  assert tuple(specs["blocks"]["attn"]["query"]["kernel"]) == query


def test_a_scanned_model_inits_and_differentiates_in_shards():
  """FSDP and TP together: sharded init and a jitted gradient under the rules match the unsharded model."""
  mesh = _mesh({"fsdp": 4, "model": 2})
  strategy = parallel.get_strategy("fsdp_tp", fsdp_min_size=1)
  x = jax.random.normal(jax.random.key(1), (8, 32, 32, 3))
  variables = parallel.init_sharded(SHARDED, 0, x.shape, mesh, strategy)
  assert variables["params"]["blocks"]["mlp"]["fc1"]["kernel"].sharding.spec == P(None, "fsdp", "model")
  # A random projection: the pooled features are layer-normed, so e.g. their squared sum is nearly constant.
  w = jax.random.normal(jax.random.key(2), (8, 64))
  loss = lambda v: jnp.sum(SHARDED.apply(v, x, return_features=True)["pooled"] * w)
  sharded = jax.jit(parallel.with_sharding_rules(jax.value_and_grad(loss), mesh, strategy))(variables)
  local = jax.jit(jax.value_and_grad(loss))(jax.device_get(variables))
  np.testing.assert_allclose(sharded[0], local[0], rtol=1e-5)
  close = lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5 * max(float(np.abs(b).max()), 1.0), rtol=0)
  jax.tree.map(close, sharded[1], local[1])


def test_from_pretrained_stacks_a_per_layer_checkpoint():
  model, variables = lvm_jax.from_pretrained(FIXTURES / "vit_npz" / "model.npz", scan_layers=True)
  assert model.scan_layers and "blocks" in variables["params"] and "block_0" not in variables["params"]
  with np.load(FIXTURES / "vit_npz" / "reference.npz") as ref:
    np.testing.assert_allclose(model.apply(variables, ref["input"]), ref["logits"], atol=1e-4, rtol=0)


def test_a_scanned_model_retargets_and_saves_per_layer(tmp_path):
  model, variables = lvm_jax.from_pretrained(FIXTURES / "vit_npz" / "model.npz", scan_layers=True, num_classes=4)
  assert model.scan_layers and model.num_classes == 4
  x = np.random.default_rng(0).standard_normal((1, 32, 32, 3)).astype(np.float32)
  features = model.apply(variables, x, return_features=True)["pooled"]
  lvm_jax.save_pretrained(model, variables, tmp_path / "out")
  reloaded, reloaded_vars = lvm_jax.from_pretrained(tmp_path / "out")
  assert not reloaded.scan_layers and "block_0" in reloaded_vars["params"]
  np.testing.assert_allclose(reloaded.apply(reloaded_vars, x, return_features=True)["pooled"], features, atol=1e-5)


def test_scan_layers_on_a_model_without_it_is_a_clear_error():
  with pytest.raises(ValueError, match="scan_layers=True is a VisionTransformer option; .* SwinTransformer"):
    lvm_jax.from_pretrained(FIXTURES / "swin", scan_layers=True)
