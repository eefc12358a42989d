"""Train/eval steps and the TrainState: losses, exact SGD updates, metrics, rng, BatchNorm, normalization,
gradient accumulation, EMA, NaN tracking, masked eval sums, mixed precision, state creation and sharding.

Every expected number is computed independently of the code under test (numpy float64, or jax.grad of a loss
written here). Compilation dominates the run time on 2 cores, so the models are tiny, their variables are
drawn with numpy from the abstract shapes (model.init compiles every initializer), and compiled steps are
shared between tests through module fixtures.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import lvm_jax
from lvm_jax import parallel
from lvm_jax.tasks import classification
from lvm_jax.tasks.classification import Classification
from lvm_jax.train import optimizer as opt
from lvm_jax.train import state as state_lib
from lvm_jax.train import steps, throughput

NUM_CLASSES = 5
TASK = Classification(NUM_CLASSES)
VIT = dict(image_size=16, patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64, num_classes=NUM_CLASSES)
VIT_SHAPE = (1, 16, 16, 3)
RESNET = dict(width=8, stage_sizes=(1, 1), num_classes=NUM_CLASSES)
RESNET_SHAPE = (1, 32, 32, 3)
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


# ----------------------------------------------------------------------------------------------------- helpers


def _vit(**kw):
  return lvm_jax.create_model("vit_ti16", **{**VIT, **kw})


def _resnet():
  return lvm_jax.create_model("resnet18", **RESNET)


def _tx(params, **block):
  block.setdefault("schedule", {"decay": "constant"})
  return opt.make_optimizer({"optimizer": block}, params)


def _sgd(params, lr=0.5, **block):
  return _tx(params, name="sgd", lr=lr, momentum=0.0, **block)


def _mesh1():
  return parallel.create_mesh({"data": 1}, devices=jax.devices()[:1])


def _state(model, tx, shape, *, use_ema=False, variables=None, seed=0):
  shardings = state_lib.shardings(model, tx, shape, _mesh1(), "dp", use_ema=use_ema)
  return state_lib.create(model, tx, jax.random.key(seed), shape, shardings, use_ema=use_ema, variables=variables)


def _flat(tree):
  return {opt._path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _variables(model, seed=0):
  """Random variables of the model's shapes, drawn with numpy: kernels ~ N(0, 1/fan_in), biases and
  embeddings small, norm scales and BatchNorm variances near 1."""
  rng = np.random.default_rng(seed)

  def draw(path, x):
    name = path.rsplit("/", 1)[-1]
    if name == "var":
      return (1.0 + rng.uniform(size=x.shape)).astype(np.float32)
    if name == "scale":
      return (1.0 + 0.1 * rng.normal(size=x.shape)).astype(np.float32)
    std = 1.0 / np.sqrt(np.prod(x.shape[:-1])) if name == "kernel" else 0.1
    return (std * rng.normal(size=x.shape)).astype(np.float32)

  abstract = lvm_jax.abstract_variables(model)
  return jax.tree_util.tree_map_with_path(lambda p, x: jnp.asarray(draw(opt._path_str(p), x)), abstract)


_APPLY = {}


def _logits(model, variables, images):
  """Eval-mode logits, jitted once per model (eager op-by-op dispatch costs seconds on 2 cores)."""
  if id(model) not in _APPLY:
    _APPLY[id(model)] = (model, jax.jit(lambda v, x: model.apply(v, x, train=False)))
  return _APPLY[id(model)][1](variables, images)


def _assert_trees(actual, expected, rtol, atol=0.0):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(e, np.float64), rtol=rtol, atol=atol)


def _max_diff(a, b):
  return max(
    float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


def _np_log_softmax(logits):
  z = np.asarray(logits, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_loss(logits, labels):
  return -np.mean(_np_log_softmax(logits)[np.arange(len(labels)), labels])


def _images(seed, n=8, size=16):
  return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def _batch(seed, n=8):
  return {"image": _images(seed, n), "label": (np.arange(n, dtype=np.int32) + seed) % NUM_CLASSES}


def _grad_fn(model):
  """jax.grad of the mean softmax cross-entropy of int labels, written independently of steps.py."""

  def loss_fn(params, images, labels):
    logits = model.apply({"params": params}, images, train=True)
    return -jnp.mean(jnp.sum(jax.nn.one_hot(labels, NUM_CLASSES) * jax.nn.log_softmax(logits), -1))

  return jax.jit(jax.value_and_grad(loss_fn))


@pytest.fixture(scope="module")
def vit():
  model = _vit()
  return model, _variables(model)


@pytest.fixture(scope="module")
def sgd_run(vit):
  """One jitted SGD (lr 0.5, no momentum, constant schedule) step shared by the tests that need one."""
  model, variables = vit
  tx, schedule = _sgd(variables["params"])
  step = jax.jit(steps.make_train_step(TASK, model, tx, schedule, steps.StepConfig()))
  return model, tx, step, _state(model, tx, VIT_SHAPE, variables=variables), _grad_fn(model)


# ---------------------------------------------------------------------------------------- targets and the loss


def test_targets_and_cross_entropy_match_numpy_float64():
  rng = np.random.default_rng(0)
  logits = rng.normal(scale=3.0, size=(6, NUM_CLASSES)).astype(np.float32)
  labels = np.array([0, 4, 2, 2, 1, 3], np.int32)
  soft = classification.targets(jnp.asarray(labels), NUM_CLASSES, 0.1)
  expected_soft = np.full((6, NUM_CLASSES), 0.1 / NUM_CLASSES)
  expected_soft[np.arange(6), labels] += 0.9
  assert soft.dtype == jnp.float32
  np.testing.assert_allclose(soft, expected_soft, rtol=1e-6, atol=1e-7)  # 0.92 on the label, 0.02 elsewhere
  loss = classification.cross_entropy(jnp.asarray(logits), soft)
  expected = -(expected_soft * _np_log_softmax(logits)).sum(-1)
  assert loss.shape == (6,) and loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  # Smoothing matters: without it the loss is larger on these (mostly wrong) logits' labels.
  plain = classification.cross_entropy(jnp.asarray(logits), classification.targets(jnp.asarray(labels), NUM_CLASSES))
  np.testing.assert_allclose(plain, -_np_log_softmax(logits)[np.arange(6), labels], rtol=1e-6)
  assert np.max(np.abs(np.asarray(plain) - expected)) > 0.1

  # Soft [B, C] labels (e.g. from mixup) are the targets as given: no smoothing on top, cast to float32.
  given = rng.dirichlet(np.ones(NUM_CLASSES), size=6)
  out = classification.targets(jnp.asarray(given, jnp.bfloat16), NUM_CLASSES, 0.3)
  assert out.dtype == jnp.float32
  np.testing.assert_array_equal(out, np.asarray(jnp.asarray(given, jnp.bfloat16), np.float32))
  np.testing.assert_array_equal(
    classification.targets(jnp.asarray(given, jnp.float32), NUM_CLASSES, 0.3), given.astype(np.float32)
  )


def test_cross_entropy_of_bf16_logits_is_float32():
  # Confident logits: the label's probability is ~e-40, which a bf16 log-softmax cannot resolve.
  logits = np.array([[20.0, -20.0, 0.5, 3.0, -1.0], [1.0, 2.0, 3.0, 4.0, 5.0]], np.float32)
  bf16 = jnp.asarray(logits, jnp.bfloat16)
  soft = classification.targets(jnp.array([1, 0]), NUM_CLASSES)
  loss = classification.cross_entropy(bf16, soft)
  assert loss.dtype == jnp.float32
  expected = -(np.asarray(soft, np.float64) * _np_log_softmax(np.asarray(bf16, np.float32))).sum(-1)
  np.testing.assert_allclose(loss, expected, rtol=1e-6)  # 40.0 and 4.4519
  assert abs(float(loss[0]) - 40.0) < 1e-3


# -------------------------------------------------------------------------------------------- the train step


def test_sgd_step_is_params_minus_lr_grad_and_metrics_are_exact(sgd_run):
  model, _, step, state, grad_fn = sgd_run
  images = _images(1)
  logits0 = np.asarray(_logits(model, state.variables, images))
  pred = np.argmax(logits0, -1)
  labels = np.where(np.arange(8) < 3, pred, (pred + 1) % NUM_CLASSES).astype(np.int32)  # top1 = 3/8 exactly

  loss, grads = grad_fn(state.params, images, labels)
  expected = jax.tree.map(lambda p, g: p - 0.5 * g, state.params, grads)
  new, metrics = step(state, {"image": images, "label": labels})
  _assert_trees(new.params, expected, rtol=1e-5, atol=1e-6)
  assert _max_diff(new.params, state.params) > 1e-2  # it moved: the comparison above is not trivially true

  assert set(metrics) == {"loss", "top1", "grad_norm", "lr"}
  np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
  np.testing.assert_allclose(metrics["loss"], _np_loss(logits0, labels), rtol=1e-5)
  assert float(metrics["top1"]) == np.mean(pred == labels) == 0.375
  grad_norm = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in jax.tree.leaves(grads)))
  np.testing.assert_allclose(metrics["grad_norm"], grad_norm, rtol=1e-5)
  np.testing.assert_allclose(metrics["grad_norm"], optax.global_norm(grads), rtol=1e-6)
  assert float(metrics["lr"]) == 0.5
  assert int(state.step) == 0 and int(new.step) == 1
  new2, _ = step(new, {"image": images, "label": labels})
  assert int(new2.step) == 2 and int(new2.nonfinite_step) == -1


def test_lr_metric_is_the_schedule_and_the_lr_the_update_used(sgd_run):
  model, _, constant_step, start, _ = sgd_run
  tx, schedule = _sgd(start.params, lr=1.0, schedule={"warmup_steps": 2, "total_steps": 6, "decay": "linear"})
  step = jax.jit(steps.make_train_step(TASK, model, tx, schedule, steps.StepConfig()))
  batch = _batch(2)
  states, lrs = [_state(model, tx, VIT_SHAPE, variables=start.variables)], []
  for _ in range(4):
    state, metrics = step(states[-1], batch)
    lrs.append(float(metrics["lr"]))
    states.append(state)
  np.testing.assert_allclose(lrs, [0.0, 0.5, 1.0, 0.75], rtol=1e-6)
  np.testing.assert_allclose(lrs, [schedule(s) for s in range(4)], rtol=1e-7)
  _assert_trees(states[1].params, states[0].params, rtol=0)  # lr 0 at step 0: no change at all
  # Step 1 (lr 0.5) moved the params exactly as the constant-lr-0.5 step does from the same point.
  _assert_trees(states[2].params, constant_step(states[1], batch)[0].params, rtol=1e-6, atol=1e-7)
  assert _max_diff(states[2].params, states[1].params) > 1e-2


def test_dropout_key_changes_every_step_and_runs_reproduce_bit_for_bit(vit):
  f32_model, variables = vit
  model = _vit(dropout=0.3)
  tx, schedule = _sgd(variables["params"], lr=0.1)
  step = jax.jit(steps.make_train_step(TASK, model, tx, schedule, steps.StepConfig()))
  batch = _batch(3)
  start = _state(model, tx, VIT_SHAPE, variables=variables)

  def run(n):
    state, losses = start, []
    for _ in range(n):
      state, metrics = step(state, batch)
      losses.append(float(metrics["loss"]))
    return state, losses

  (a, losses_a), (b, losses_b) = run(3), run(3)
  assert losses_a == losses_b
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_array_equal(x, y)

  # Same params and batch, only the step differs: another dropout mask, hence another loss; the same step
  # again: the same loss. Dropout is on at all: the train loss differs from the deterministic loss.
  # (Replacements are put where the state's leaves live, so the step is not compiled again for new shardings.)
  place = lambda x, like: jax.device_put(x, like.sharding)
  loss_at = lambda s: float(step(start.replace(step=place(jnp.asarray(s, jnp.int32), start.step)), batch)[1]["loss"])
  l0, l1, l7 = loss_at(0), loss_at(1), loss_at(7)
  assert l0 == loss_at(0) == losses_a[0]
  assert len({l0, l1, l7}) == 3, (l0, l1, l7)
  clean = _np_loss(_logits(f32_model, variables, batch["image"]), batch["label"])
  assert abs(l0 - clean) > 1e-3
  # The saved rng seeds it: another key gives another mask at the same step.
  other = start.replace(rng=place(jax.random.key_data(jax.random.key(123)), start.rng))
  assert float(step(other, batch)[1]["loss"]) != l0


def test_frozen_parameters_have_no_gradient_computed(vit):
  model, variables = vit
  frozen = (r"^patch_embed/", r"^block_0/", r"^(pos_embed|cls_token)$")
  tx, schedule = _sgd(variables["params"], frozen=frozen)
  state = _state(model, tx, VIT_SHAPE, variables=variables)
  batch = _batch(7)
  step = jax.jit(steps.make_train_step(TASK, model, tx, schedule, steps.StepConfig(frozen=frozen)))
  new, metrics = step(state, batch)

  _, grads = _grad_fn(model)(variables["params"], batch["image"], batch["label"])
  is_frozen = _flat(opt.frozen_mask(variables["params"], frozen))
  trained = {k: g for k, g in _flat(grads).items() if not is_frozen[k]}
  expected_norm = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in trained.values()))
  np.testing.assert_allclose(float(metrics["grad_norm"]), expected_norm, rtol=1e-5)  # the trained ones' only
  before, after = _flat(variables["params"]), _flat(new.params)
  for key in before:  # SGD, lr 0.5: frozen ones still, the others one step down their gradient
    expected = before[key] if is_frozen[key] else before[key] - 0.5 * np.asarray(trained[key])
    np.testing.assert_allclose(after[key], expected, rtol=1e-5, atol=1e-6, err_msg=key)
  # XLA never computes what the frozen layers' gradients would need: the step does less work.
  plain = jax.jit(steps.make_train_step(TASK, model, tx, schedule, steps.StepConfig()))
  flops = [throughput.compiled_flops(f.lower(state, batch).compile()) for f in (plain, step)]
  assert flops[1] < 0.9 * flops[0], flops


def test_resnet_batch_stats_update_in_train_and_are_used_by_eval():
  model = _resnet()
  variables = _variables(model, seed=4)
  tx, schedule = _sgd(variables["params"], lr=0.1)
  config = steps.StepConfig()
  state = _state(model, tx, RESNET_SHAPE, variables=variables)
  images = np.random.default_rng(4).normal(1.0, 2.0, size=(8, 32, 32, 3)).astype(np.float32)
  labels = np.arange(8, dtype=np.int32) % NUM_CLASSES
  new, _ = jax.jit(steps.make_train_step(TASK, model, tx, schedule, config))(state, {"image": images, "label": labels})

  # The stem BatchNorm's running stats after one step: momentum 0.9 towards the batch's (biased) statistics
  # of the stem conv output, computed here with numpy from the conv's kernel (no bias: BatchNorm follows).
  kernel = np.asarray(variables["params"]["stem_conv"]["kernel"], np.float64)  # [7, 7, 3, 8], stride 2, pad 3
  padded = np.pad(images.astype(np.float64), ((0, 0), (3, 3), (3, 3), (0, 0)))
  patches = np.stack([padded[:, i : i + 32 : 2, j : j + 32 : 2, :] for i in range(7) for j in range(7)], axis=3)
  conv = np.einsum("nhwkc,kcd->nhwd", patches, kernel.reshape(49, 3, 8))
  assert conv.shape == (8, 16, 16, 8)
  old_mean = np.asarray(variables["batch_stats"]["stem_bn"]["mean"], np.float64)
  old_var = np.asarray(variables["batch_stats"]["stem_bn"]["var"], np.float64)
  np.testing.assert_allclose(
    new.batch_stats["stem_bn"]["mean"], 0.9 * old_mean + 0.1 * conv.mean((0, 1, 2)), rtol=1e-4, atol=1e-6
  )
  np.testing.assert_allclose(new.batch_stats["stem_bn"]["var"], 0.9 * old_var + 0.1 * conv.var((0, 1, 2)), rtol=1e-4)
  for name, stats in new.batch_stats.items():  # every BatchNorm moved
    assert _max_diff(stats, state.batch_stats[name]) > 1e-4, name

  # Eval uses the running statistics in `state.variables` (train=False), and leaves them as they are.
  eval_step = jax.jit(steps.make_eval_step(TASK, model, config))
  batch = {"image": images, "label": labels, "mask": np.ones(8, np.float32)}
  before = jax.tree.map(np.array, new.batch_stats)
  sums = eval_step(new.variables, batch)
  _assert_trees(new.batch_stats, before, rtol=0)
  np.testing.assert_allclose(sums["loss"], 8 * _np_loss(_logits(model, new.variables, images), labels), rtol=1e-5)
  stale = eval_step({"params": new.params, "batch_stats": state.batch_stats}, batch)
  assert abs(float(stale["loss"]) - float(sums["loss"])) > 1e-3


def test_uint8_normalized_on_device_equals_prenormalized_floats(sgd_run):
  model, tx, on_host_step, state, _ = sgd_run
  uint8 = np.random.default_rng(5).integers(0, 256, size=(8, 16, 16, 3), dtype=np.uint8)
  floats = ((uint8 / 255.0 - np.array(IMAGENET[0])) / np.array(IMAGENET[1])).astype(np.float32)
  labels = np.arange(8, dtype=np.int32) % NUM_CLASSES
  on_device = steps.StepConfig(normalize=IMAGENET)
  schedule = lambda step: jnp.full((), 0.5)

  a, ma = jax.jit(steps.make_train_step(TASK, model, tx, schedule, on_device))(state, {"image": uint8, "label": labels})
  b, mb = on_host_step(state, {"image": floats, "label": labels})
  np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-5)
  _assert_trees(a.params, b.params, rtol=1e-5, atol=1e-6)
  sums = jax.jit(steps.make_eval_step(TASK, model, on_device))(
    state.variables, {"image": uint8, "label": labels, "mask": np.ones(8)}
  )
  np.testing.assert_allclose(sums["loss"], 8 * _np_loss(_logits(model, state.variables, floats), labels), rtol=1e-5)
  # The same uint8 batch unnormalized is another input: the comparisons above can fail.
  c, _ = on_host_step(state, {"image": uint8.astype(np.float32), "label": labels})
  assert _max_diff(c.params, b.params) > 1e-2


# ----------------------------------------------------------------------------------- accumulation and the EMA


@pytest.fixture(scope="module")
def accumulation(vit):
  """AdamW lr 1e-2 with a linear decay over 4 updates: k=2 (with EMA 0.5) fed half batches for 4 micro-steps,
  and k=1 fed the whole batches twice. (Linear rather than constant: it also shows both count updates.)"""
  model, variables = vit
  batches = [_batch(10), _batch(11)]
  block = dict(name="adamw", lr=1e-2, schedule={"decay": "linear", "total_steps": 4})
  tx2, sched2 = _tx(variables["params"], accumulate_steps=2, **block)
  step2 = jax.jit(steps.make_train_step(TASK, model, tx2, sched2, steps.StepConfig(ema_decay=0.5, accumulate_steps=2)))
  micro = [_state(model, tx2, VIT_SHAPE, variables=variables, use_ema=True)]
  lrs = []
  for batch in batches:
    for half in (slice(0, 4), slice(4, 8)):
      state, metrics = step2(micro[-1], {k: v[half] for k, v in batch.items()})
      micro.append(state)
      lrs.append(float(metrics["lr"]))

  tx1, sched1 = _tx(variables["params"], accumulate_steps=1, **block)
  step1 = jax.jit(steps.make_train_step(TASK, model, tx1, sched1, steps.StepConfig()))
  whole = [_state(model, tx1, VIT_SHAPE, variables=variables)]
  for batch in batches:
    whole.append(step1(whole[-1], batch)[0])
  return micro, lrs, whole


def _without_key_bias(tree):
  # The attention key bias has zero gradient in exact arithmetic (softmax ignores a shift shared by all keys);
  # its float gradient is rounding noise (~1e-8) that Adam scales to +-lr, differently for any summation order.
  return {k: v for k, v in _flat(tree).items() if not k.endswith("attn/key/bias")}


def _assert_adam_close(actual, expected, max_off):
  """Within 1/10 of an Adam step (lr 1e-2) everywhere, and within rtol 1e-5 / atol 1e-6 for all but `max_off`
  of the weights: Adam divides each gradient by its own magnitude, so a weight whose gradient is almost 0
  turns float rounding of the summation order into a visible difference."""
  a, e = _without_key_bias(actual), _without_key_bias(expected)
  _assert_trees(a, e, rtol=0, atol=1e-3)
  off = sum(int(np.sum(~np.isclose(x, y, rtol=1e-5, atol=1e-6))) for x, y in zip(*map(jax.tree.leaves, (a, e))))
  assert off <= max_off, off


def test_accumulated_half_batches_equal_one_whole_batch(accumulation):
  micro, _, whole = accumulation
  _assert_trees(micro[1].params, micro[0].params, rtol=0)  # first micro-step: no update yet
  _assert_trees(micro[3].params, micro[2].params, rtol=0)
  n = sum(x.size for x in _without_key_bias(micro[0].params).values())
  assert n == 23_621
  _assert_adam_close(
    micro[2].params, whole[1].params, max_off=5
  )  # measured: 1 of 23,621 (3.7e-4; 5.5e-4 with erf GELU)
  _assert_adam_close(micro[4].params, whole[2].params, max_off=200)  # measured: 55 (all but that one < 2e-5)
  assert _max_diff(micro[2].params, micro[0].params) > 5e-3  # Adam's first step moves every weight by ~lr
  assert [int(s.step) for s in micro] == [0, 1, 2, 3, 4]


def test_lr_metric_counts_optimizer_updates(accumulation):
  _, lrs, _ = accumulation
  np.testing.assert_allclose(lrs, [1e-2, 1e-2, 7.5e-3, 7.5e-3], rtol=1e-6)  # schedule(step // 2)


def test_accumulated_sgd_uses_the_mean_gradient(sgd_run):
  # Adam cannot tell a mean from a sum of micro-batch gradients (it is scale-invariant); plain SGD can.
  model, _, step1, state, _ = sgd_run
  tx2, schedule = _sgd(state.params, lr=0.5, accumulate_steps=2)
  step2 = jax.jit(steps.make_train_step(TASK, model, tx2, schedule, steps.StepConfig(accumulate_steps=2)))
  batch = _batch(30)
  micro = _state(model, tx2, VIT_SHAPE, variables=state.variables)
  for half in (slice(0, 4), slice(4, 8)):
    micro, _ = step2(micro, {k: v[half] for k, v in batch.items()})
  whole, _ = step1(state, batch)
  _assert_trees(micro.params, whole.params, rtol=1e-5, atol=1e-5)
  assert _max_diff(whole.params, state.params) > 1e-2


def test_ema_moves_only_when_params_do_and_follows_the_formula(accumulation):
  micro, _, _ = accumulation
  ema = [jax.tree.map(lambda x: np.asarray(x, np.float64), s.ema_params) for s in micro]
  params = [jax.tree.map(lambda x: np.asarray(x, np.float64), s.params) for s in micro]
  _assert_trees(ema[0], params[0], rtol=0)  # starts as a copy of the params
  _assert_trees(ema[1], ema[0], rtol=0)  # micro-step 0: params did not move, nor does the EMA
  _assert_trees(ema[2], jax.tree.map(lambda e, p: 0.5 * e + 0.5 * p, ema[1], params[2]), rtol=1e-6, atol=1e-8)
  _assert_trees(ema[3], ema[2], rtol=0)
  _assert_trees(ema[4], jax.tree.map(lambda e, p: 0.5 * e + 0.5 * p, ema[3], params[4]), rtol=1e-6, atol=1e-8)
  # = 0.25 p0 + 0.25 p2 + 0.5 p4 (an EMA that also moved on the micro-steps would weigh p0 by 1/16).
  _assert_trees(
    ema[4],
    jax.tree.map(lambda a, b, c: 0.25 * a + 0.25 * b + 0.5 * c, params[0], params[2], params[4]),
    rtol=1e-6,
    atol=1e-8,
  )
  assert _max_diff(ema[4], params[4]) > 2e-3


# --------------------------------------------------------------------------------------------------- NaN / Inf


def test_nonfinite_step_records_the_first_bad_step(sgd_run):
  _, _, step, state, _ = sgd_run
  good = _batch(6)
  bad = {**good, "image": np.full((8, 16, 16, 3), np.nan, np.float32)}
  seen = []
  for batch in (good, good, bad, good, bad):
    state, metrics = step(state, batch)
    seen.append((int(state.nonfinite_step), bool(np.isfinite(metrics["loss"]))))
  assert seen == [(-1, True), (-1, True), (2, False), (2, False), (2, False)]
  assert int(state.step) == 5


# ----------------------------------------------------------------------------------------------------- eval


def test_eval_sums_over_the_mask_match_numpy_and_summarize_gives_means():
  model = _vit(num_classes=10)  # 10 classes so top-5 is not always right
  variables = _variables(model, seed=1)
  task = Classification(10, label_smoothing=0.2)  # no smoothing in eval
  eval_step = jax.jit(steps.make_eval_step(task, model, steps.StepConfig()))
  rng = np.random.default_rng(7)
  batches, expected = [], {"count": 0.0, "top1": 0.0, "top5": 0.0, "loss": 0.0}
  for b in range(2):
    images = rng.normal(size=(8, 16, 16, 3)).astype(np.float32)
    mask = np.array([1, 1, 1, 0, 1, 0, 1, 1] if b == 0 else [1, 0, 0, 1, 1, 1, 0, 0], np.int32)
    images[mask == 0] *= 100.0  # padding contributes nothing however it looks
    logits = np.asarray(_logits(model, variables, images), np.float64)
    order = np.argsort(-logits, -1)
    # Labels the model ranks 1st, 3rd, 7th, ..., so top-1 / top-5 / neither all occur.
    labels = order[np.arange(8), [0, 2, 6, 0, 4, 9, 1, 0]].astype(np.int32)
    m = mask.astype(bool)
    expected["count"] += m.sum()
    expected["top1"] += (order[m, 0] == labels[m]).sum()
    expected["top5"] += (order[m, :5] == labels[m, None]).any(-1).sum()
    expected["loss"] += -_np_log_softmax(logits)[np.arange(8), labels][m].sum()
    batches.append({"image": images, "label": labels, "mask": mask})

  sums = [eval_step(variables, batch) for batch in batches]
  # Batch 0's real examples have ranks 1, 3, 7, 5, 2, 1: count 6, top-1 2, top-5 5.
  assert [float(sums[0][k]) for k in ("count", "top1", "top5")] == [6, 2, 5]
  assert float(sums[1]["count"]) == 4
  total = {k: sum(float(s[k]) for s in sums) for k in expected}
  np.testing.assert_allclose([total[k] for k in expected], [expected[k] for k in expected], rtol=1e-5)
  summary = task.summarize_eval(sums)
  assert set(summary) == {"top1", "top5", "loss"}
  np.testing.assert_allclose(
    [summary["top1"], summary["top5"], summary["loss"]],
    [expected["top1"] / 10, expected["top5"] / 10, expected["loss"] / 10],
    rtol=1e-5,
  )
  # Soft labels in eval count against their argmax.
  soft = dict(batches[0], label=np.eye(10, dtype=np.float32)[batches[0]["label"]] * 0.7 + 0.03)
  _assert_trees(eval_step(variables, soft), sums[0], rtol=1e-6)


# ------------------------------------------------------------------------------------------ mixed precision


def test_bf16_model_trains_with_float32_params_opt_state_and_ema(vit):
  f32_model, variables = vit
  model = _vit(dtype=jnp.bfloat16)
  tx, schedule = _tx(variables["params"], name="adamw", lr=1e-3)
  state = _state(model, tx, VIT_SHAPE, variables=variables, use_ema=True)
  config = steps.StepConfig(ema_decay=0.9)
  batch = _batch(8)
  new, metrics = jax.jit(steps.make_train_step(TASK, model, tx, schedule, config))(state, batch)

  floats = [
    x for x in jax.tree.leaves((new.params, new.opt_state, new.ema_params)) if jnp.issubdtype(x.dtype, jnp.floating)
  ]
  assert len(floats) == 4 * len(jax.tree.leaves(new.params))  # params, EMA, Adam mu and nu
  assert {x.dtype for x in floats} == {jnp.dtype(jnp.float32)}
  assert metrics["loss"].dtype == jnp.float32 and metrics["grad_norm"].dtype == jnp.float32
  assert np.isfinite(float(metrics["loss"])) and int(new.nonfinite_step) == -1
  assert _max_diff(new.params, state.params) > 5e-4
  assert _max_diff(new.ema_params, state.params) > 5e-5
  # It did compute in bf16: the loss is close to, but not equal to, the float32 model's.
  f32_loss = _np_loss(_logits(f32_model, variables, batch["image"]), batch["label"])
  assert 0 < abs(float(metrics["loss"]) - f32_loss) < 0.05


# ----------------------------------------------------------------------------------------------------- state


def test_create_from_scratch_is_model_init_with_the_documented_key_split():
  model = _vit(depth=1)  # model.init compiles every initializer: one block is enough here
  tx, _ = _tx(lvm_jax.abstract_variables(model)["params"], name="adamw", lr=1e-3)
  state = _state(model, tx, VIT_SHAPE, use_ema=True, seed=3)
  init_key, state_key = jax.random.split(jax.random.key(3))
  expected = jax.jit(lambda k: nn.meta.unbox(model.init(k, jnp.zeros(VIT_SHAPE, jnp.float32), train=False)))(init_key)
  _assert_trees(state.params, expected["params"], rtol=1e-6, atol=1e-7)
  _assert_trees(state.ema_params, state.params, rtol=0)
  _assert_trees(state.opt_state, tx.init(state.params), rtol=0)  # Adam moments zero, count 0
  assert _max_diff(state.params["pos_embed"], 0.0) > 1e-3  # a random init, not zeros
  np.testing.assert_array_equal(state.rng, jax.random.key_data(state_key))
  assert state.rng.dtype == jnp.uint32
  assert int(state.step) == 0 and state.step.dtype == jnp.int32
  assert int(state.nonfinite_step) == -1 and state.nonfinite_step.dtype == jnp.int32
  assert state.batch_stats == {} and set(state.variables) == {"params"}


def test_create_with_given_variables_keeps_them():
  model = _resnet()
  given = _variables(model, seed=9)
  tx, _ = _sgd(given["params"], lr=0.1)
  state = _state(model, tx, RESNET_SHAPE, variables=given, use_ema=True, seed=3)
  _assert_trees(state.params, given["params"], rtol=0)
  _assert_trees(state.batch_stats, given["batch_stats"], rtol=0)
  _assert_trees(state.ema_params, given["params"], rtol=0)
  assert set(state.variables) == {"params", "batch_stats"}
  assert int(state.step) == 0 and int(state.nonfinite_step) == -1
  # No EMA unless asked for.
  assert _state(model, tx, RESNET_SHAPE, variables=given).ema_params == {}


def _specs(tree):
  return {opt._path_str(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def fsdp_setup():
  model = _vit(width=128, mlp_dim=256, num_heads=4)
  params = lvm_jax.abstract_variables(model)["params"]
  tx, _ = _tx(params, name="adamw", lr=1e-3)
  mesh = parallel.create_mesh({"fsdp": -1})
  assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "model": 1}
  return model, params, tx, mesh


def _adam_state(opt_state):
  found = [
    x
    for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
    if isinstance(x, optax.ScaleByAdamState)
  ]
  assert len(found) == 1
  return found[0]


def test_fsdp_shardings_shard_big_kernels_and_their_adam_moments_alike(fsdp_setup):
  model, params, tx, mesh = fsdp_setup
  sh = state_lib.shardings(model, tx, VIT_SHAPE, mesh, "fsdp", use_ema=False)
  param_specs = _specs(sh.params)
  shapes = {k: v.shape for k, v in _flat(params).items()}
  assert param_specs.keys() == shapes.keys()
  big = {p for p, s in shapes.items() if np.prod(s) >= 2**14}
  # 2 blocks x (q, k, v, out: 128*128 = 16384; fc1, fc2: 32768) + patch_embed (8*8*3*128 = 24576).
  assert len(big) == 13
  for path, spec in param_specs.items():
    if path in big:  # sharded over fsdp along the largest dimension that 8 divides
      shape = shapes[path]
      dim = max((i for i in range(len(shape)) if shape[i] % 8 == 0), key=lambda i: (shape[i], -i))
      assert tuple(spec) == tuple("fsdp" if i == dim else None for i in range(len(shape))), (path, spec)
    else:
      assert all(a is None for a in spec), (path, spec)
  assert param_specs["block_0/mlp/fc1/kernel"] == P(None, "fsdp")
  assert param_specs["block_0/mlp/fc2/kernel"] == P("fsdp", None)

  # Adam's mu and nu shard exactly like their parameter; its count, the step, rng, nonfinite_step replicate.
  adam = _adam_state(sh.opt_state)
  assert _specs(adam.mu) == param_specs and _specs(adam.nu) == param_specs
  assert all(a is None for a in adam.count.spec)
  for leaf in (sh.step, sh.rng, sh.nonfinite_step):
    assert all(a is None for a in leaf.spec) and leaf.mesh.shape == mesh.shape
  assert sh.ema_params == {}

  # create() places given variables (and builds the moments) in those shards: each device holds 1/8 of fc1.
  given = _variables(model, seed=5)
  state = state_lib.create(model, tx, jax.random.key(0), VIT_SHAPE, sh, use_ema=False, variables=given)
  for tree in (state.params, _adam_state(state.opt_state).mu):
    fc1 = tree["block_0"]["mlp"]["fc1"]["kernel"]
    assert fc1.sharding.spec == P(None, "fsdp") and len(fc1.sharding.device_set) == 8
    assert {s.data.shape for s in fc1.addressable_shards} == {(128, 32)}
  _assert_trees(state.params, given["params"], rtol=0)


def test_shardings_with_ema(fsdp_setup):
  """With use_ema=True (optimizer.ema_decay set) the shardings are built, and the EMA copy of the parameters
  is laid out exactly as the parameters."""
  model, _, tx, mesh = fsdp_setup
  sh = state_lib.shardings(model, tx, VIT_SHAPE, mesh, "fsdp", use_ema=True)
  assert _specs(sh.ema_params) == _specs(sh.params)
  assert _specs(sh.ema_params)["block_0/mlp/fc1/kernel"] == P(None, "fsdp")
