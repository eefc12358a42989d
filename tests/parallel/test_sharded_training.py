"""Sharded training equals one-device training: a few SGD steps of small ViT / Swin / ResNet models under every
preset on 8 fake CPU devices give the same losses, parameters and BatchNorm statistics as on one device."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from lvm_jax import ResNet, SwinTransformer, VisionTransformer
from lvm_jax import parallel

BATCH, STEPS, LR, RTOL = 8, 3, 0.1, 1e-5
# Low enough that most tensors of these tiny models are FSDP-sharded (the default 2**14 would shard none).
FSDP_MIN = 2**8
MODELS = {
  "vit": (
    VisionTransformer(num_classes=10, image_size=16, patch_size=4, width=32, depth=2, mlp_dim=64, num_heads=4),
    16,
  ),
  # Stage 0: 8x8 tokens, 4x4 windows, the second block shifted (masked); stage 1 after a patch merging.
  "swin": (
    SwinTransformer(
      num_classes=10, image_size=16, patch_size=2, embed_dim=16, depths=(2, 1), num_heads=(2, 4), window_size=4
    ),
    16,
  ),
  "resnet": (ResNet(num_classes=10, stage_sizes=(1, 1), block="basic", width=8, zero_init_last=False), 32),
}
# strategy -> mesh: DP 8, FSDP 8, TP model=2 x data=4, DP x FSDP x TP 2x2x2.
SETUPS = {
  "dp": {"data": 8},
  "fsdp": {"fsdp": 8},
  "tp": {"data": 4, "model": 2},
  "fsdp_tp": {"data": 2, "fsdp": 2, "model": 2},
}


def sgd_step(model, variables, images, labels):
  """Plain SGD on softmax cross-entropy; BatchNorm (train mode) returns its new running statistics."""
  params, rest = variables["params"], {k: v for k, v in variables.items() if k != "params"}

  def loss_fn(params):
    if rest:  # flax returns (out, {}) even for mutable=[], so only ask when there is state to update
      logits, updates = model.apply({"params": params, **rest}, images, train=True, mutable=list(rest))
    else:
      logits, updates = model.apply({"params": params}, images, train=True), {}
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates

  (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  params = jax.tree.map(lambda p, g: p - LR * g, params, grads)
  return {"params": params, **rest, **updates}, loss


def data(size):
  rng = np.random.default_rng(0)
  images = rng.normal(size=(BATCH, size, size, 3)).astype(np.float32)
  labels = rng.integers(0, 10, size=(BATCH,))
  return images, labels


@functools.cache
def reference(name):
  """Initial variables and (variables, loss) after each step, all on one device."""
  model, size = MODELS[name]
  images, labels = data(size)
  init = jax.jit(lambda key: model.init(key, jnp.zeros((1, size, size, 3))))
  variables = nn.meta.unbox(init(jax.random.key(0)))
  variables = jax.tree.map(np.asarray, variables)
  step = jax.jit(functools.partial(sgd_step, model))
  history, state = [], jax.device_put(variables, jax.devices()[0])
  for _ in range(STEPS):
    state, loss = step(state, images, labels)
    history.append((jax.tree.map(np.asarray, state), float(loss)))
  return variables, history


def rel_err(a, b):
  """|a - b| / |b| over the whole tensor."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def is_key_bias(path: str) -> bool:
  # Attention key biases get exactly zero gradient (softmax ignores a per-query constant): both runs hold only
  # rounding noise there, unrelated to each other, so they are checked to stay ~0 instead of compared.
  return path.endswith("['key']['bias']")


@pytest.mark.parametrize("strategy_name", list(SETUPS))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_sharded_sgd_matches_one_device(model_name, strategy_name):
  model, size = MODELS[model_name]
  init, history = reference(model_name)
  mesh = parallel.create_mesh(SETUPS[strategy_name])
  strategy = parallel.get_strategy(strategy_name, fsdp_min_size=FSDP_MIN)

  # The reference's initial variables, placed as the strategy says (init_sharded is tested on its own in
  # test_partitioning.py; compiling it here for every case would double this file's time).
  abstract = jax.eval_shape(lambda key: model.init(key, jnp.zeros((1, size, size, 3))), jax.random.key(0))
  shardings = parallel.variable_shardings(abstract, mesh, strategy)
  variables = jax.device_put(init, shardings)
  sharded = [x for x in jax.tree.leaves(variables) if not x.sharding.is_fully_replicated]
  if strategy_name == "fsdp" or (strategy_name != "dp" and model_name != "resnet"):  # TP leaves ResNet whole
    assert sharded, "the strategy sharded no tensor: the test would only check data parallelism"

  batch = parallel.batch_sharding(mesh, BATCH)
  step = jax.jit(
    parallel.with_sharding_rules(functools.partial(sgd_step, model), mesh, strategy),
    in_shardings=(shardings, batch, batch),
    out_shardings=(shardings, NamedSharding(mesh, P())),
  )
  images, labels = data(size)
  images, labels = jax.device_put(images, batch), jax.device_put(labels, batch)
  for i in range(STEPS):
    variables, loss = step(variables, images, labels)
    want_vars, want_loss = history[i]
    assert rel_err(loss, want_loss) <= RTOL, (i, float(loss), want_loss)
  got = {jax.tree_util.keystr(path): x for path, x in jax.tree_util.tree_flatten_with_path(variables)[0]}
  want = {jax.tree_util.keystr(path): x for path, x in jax.tree_util.tree_flatten_with_path(want_vars)[0]}
  errors = {path: rel_err(got[path], want[path]) for path in want if not is_key_bias(path)}
  for path in filter(is_key_bias, want):
    assert np.abs(np.asarray(got[path])).max() < 1e-5, path
  worst = max(errors, key=errors.get)
  print(f"{model_name}/{strategy_name}: worst {worst} {errors[worst]:.2e}, last loss {float(loss):.6f}")
  assert errors[worst] <= RTOL, (worst, errors[worst])
  # Training moved the parameters far beyond the tolerance, so equality is not that of two untouched inits.
  moved = jax.tree.leaves(jax.tree.map(rel_err, want_vars["params"], init["params"]))
  assert np.median(moved) > 1e2 * RTOL
  assert history[-1][1] < history[0][1]
