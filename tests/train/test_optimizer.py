"""Optimizer: schedules, decay masks, frozen groups, layer decay, clipping, accumulation, reference updates, EMA."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import lvm_jax
from lvm_jax.models import param_groups
from lvm_jax.train import optimizer as opt
from lvm_jax.train import schedules

VIT = dict(depth=4, width=32, mlp_dim=64, num_heads=2, image_size=32, num_classes=10)
SWIN = dict(embed_dim=16, depths=(2, 2), num_heads=(1, 2), image_size=32, window_size=4, num_classes=10)
RESNET = dict(stage_sizes=(1, 1), width=8, num_classes=10)


def _model_and_params(name, **kw):
  model = lvm_jax.create_model(name, **kw)
  return model, lvm_jax.abstract_variables(model)["params"]


def _config(**block):
  block.setdefault("lr", 0.1)
  block.setdefault("schedule", dict(total_steps=100))
  return ml_collections.ConfigDict({"optimizer": block})


def _constant(**block):  # no warmup, constant lr: one step's lr is exactly `lr`
  return _config(schedule=dict(warmup_steps=0, decay="constant"), **block)


def _random_like(tree, seed, dtype=jnp.float32):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape, dtype) for k, x in zip(keys, leaves)])


def _flat(tree):
  return {opt._path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ------------------------------------------------------------------------------------------------- schedules


def test_schedule_values_at_key_steps():
  kw = dict(warmup_steps=10, total_steps=110, end_lr_fraction=0.1)
  cos = schedules.warmup_then_decay(2.0, decay="cosine", **kw)
  lin = schedules.warmup_then_decay(2.0, decay="linear", **kw)
  const = schedules.warmup_then_decay(2.0, decay="constant", **kw)
  for f in (cos, lin, const):  # shared linear warmup: 0 at step 0, the peak at warmup end
    np.testing.assert_allclose([f(0), f(5), f(10)], [0.0, 1.0, 2.0], rtol=1e-6)
  # A quarter of the way through the decay, halfway, the end, and held after the end.
  np.testing.assert_allclose(
    [cos(35), cos(60), cos(110), cos(500)], [0.2 + 1.8 * 0.5 * (1 + math.cos(math.pi / 4)), 1.1, 0.2, 0.2], rtol=1e-6
  )
  np.testing.assert_allclose([lin(35), lin(60), lin(110), lin(500)], [1.55, 1.1, 0.2, 0.2], rtol=1e-6)
  np.testing.assert_allclose([const(35), const(110), const(10_000)], [2.0, 2.0, 2.0])
  # make_optimizer hands back the same schedule.
  _, fn = opt.make_optimizer(_config(lr=2.0, schedule=dict(decay="cosine", **kw)), {"w": jnp.zeros(2)})
  np.testing.assert_allclose(fn(60), 1.1, rtol=1e-6)


def test_schedule_errors():
  with pytest.raises(ValueError, match="decay='cosin'.*cosine"):
    schedules.warmup_then_decay(1.0, warmup_steps=0, total_steps=10, decay="cosin")
  with pytest.raises(ValueError, match="total_steps=5 must be an int > warmup_steps=10"):
    schedules.warmup_then_decay(1.0, warmup_steps=10, total_steps=5)


# ------------------------------------------------------------------------------------------ weight-decay masks


def _decayed(params, no_decay=None, model=None):
  return {p for p, d in _flat(opt.weight_decay_mask(params, no_decay, model)).items() if d}


def test_decay_mask_vit_is_kernels_only():
  model, params = _model_and_params("vit_ti16", **VIT)
  block = {f"attn/{n}/kernel" for n in ("query", "key", "value", "out")} | {"mlp/fc1/kernel", "mlp/fc2/kernel"}
  expected = {f"block_{i}/{k}" for i in range(4) for k in block} | {"patch_embed/kernel", "head/kernel"}
  assert _decayed(params, model=model) == expected
  assert len(expected) == 26  # pos_embed, cls_token, every bias and norm scale excluded


def test_decay_mask_swin_is_kernels_only():
  model, params = _model_and_params("swin_t", **SWIN)
  block = {f"attn/{n}/kernel" for n in ("query", "key", "value", "out")} | {"mlp/fc1/kernel", "mlp/fc2/kernel"}
  expected = {f"stage_{s}_block_{i}/{k}" for s in range(2) for i in range(2) for k in block} | {
    "patch_embed/kernel",
    "merge_0/reduction/kernel",
    "head/kernel",
  }
  assert _decayed(params, model=model) == expected
  assert len(expected) == 27  # relative_position_bias_table excluded


def test_decay_mask_resnet_is_kernels_only():
  model, params = _model_and_params("resnet18", **RESNET)
  assert _decayed(params, model=model) == {
    "stem_conv/kernel",
    "stage_0_block_0/conv1/kernel",
    "stage_0_block_0/conv2/kernel",
    "stage_1_block_0/conv1/kernel",
    "stage_1_block_0/conv2/kernel",
    "stage_1_block_0/shortcut_conv/kernel",
    "head/kernel",
  }  # BatchNorm scales and biases excluded


def test_user_no_decay_replaces_defaults_and_typos_fail():
  model, params = _model_and_params("resnet18", **RESNET)
  decayed = _decayed(params, no_decay=[r"^head/", r"_bn/"], model=model)
  assert "stem_conv/kernel" in decayed and "stage_0_block_0/bn1/scale" in decayed  # defaults replaced
  assert not {"head/kernel", "head/bias", "stem_bn/scale", "stage_1_block_0/shortcut_bn/bias"} & decayed
  with pytest.raises(ValueError, match=r"no_decay: regex 'pos_embd' matches no parameter"):
    opt.make_optimizer(_config(no_decay=["bias$", "pos_embd"]), params, model)


# --------------------------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
  "block, message",
  [
    (dict(nmae="adamw"), r"Unknown key optimizer.nmae. Did you mean 'name'\?"),
    (dict(name="adam"), r"optimizer.name='adam' is not one of \('adamw', 'sgd', 'lamb'\)"),
    (dict(schedule=dict(warmup=5)), r"Unknown key optimizer.schedule.warmup. Did you mean 'warmup_steps'\?"),
    (dict(schedule=dict(decay="cos", total_steps=9)), r"decay='cos' is not one of"),
    (dict(lr=None), r"optimizer.lr must be set"),
    (dict(accumulate_steps=0), r"accumulate_steps must be an int >= 1"),
    (dict(frozen="head"), r"optimizer.frozen must be a list of regexes"),
    (dict(frozen=["^haed/"]), r"frozen: regex '\^haed/' matches no parameter"),
    (dict(frozen=[".*"]), r"freezes every parameter"),
  ],
)
def test_config_errors_name_the_key(block, message):
  params = {"head": {"kernel": jnp.zeros((2, 2)), "bias": jnp.zeros(2)}, "stem_conv": {"kernel": jnp.zeros(3)}}
  with pytest.raises(ValueError, match=message):
    opt.make_optimizer(_config(**block), params)


# ------------------------------------------------------------------------------------------- one-step numerics


def _tiny():
  params = {"dense": {"kernel": jnp.array([[0.5, -1.0], [2.0, 0.25], [-0.75, 1.5]]), "bias": jnp.array([0.1, -0.2])}}
  grads = [
    {"dense": {"kernel": jnp.array([[0.3, -0.1], [0.2, 0.4], [-0.5, 0.05]]), "bias": jnp.array([0.7, -0.3])}},
    {"dense": {"kernel": jnp.array([[-0.2, 0.6], [0.1, -0.3], [0.4, 0.2]]), "bias": jnp.array([-0.1, 0.5])}},
  ]
  return params, grads


def _run(config, params, grads):
  tx, _ = opt.make_optimizer(config, params)
  state = tx.init(params)
  for g in grads:
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
  return params


def _np(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def _decays(path):  # the default mask on the tiny tree: the kernel decays, the bias does not
  return path.endswith("kernel")


def test_adamw_matches_numpy_two_steps():
  lr, b1, b2, eps, wd = 0.1, 0.9, 0.99, 1e-8, 0.05
  params, grads = _tiny()
  got = _run(_constant(name="adamw", lr=lr, b1=b1, b2=b2, eps=eps, weight_decay=wd), params, grads)
  p, m, v = _flat(_np(params)), {}, {}
  for t, g in enumerate(_flat(_np(gr)) for gr in grads):
    for k in p:
      m[k] = b1 * m.get(k, 0) + (1 - b1) * g[k]
      v[k] = b2 * v.get(k, 0) + (1 - b2) * g[k] ** 2
      mhat, vhat = m[k] / (1 - b1 ** (t + 1)), v[k] / (1 - b2 ** (t + 1))
      p[k] = p[k] - lr * (mhat / (np.sqrt(vhat) + eps) + (wd * p[k] if _decays(k) else 0))
  for k, x in _flat(got).items():
    np.testing.assert_allclose(x, p[k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_nesterov_sgd_matches_numpy_two_steps():
  lr, mu, wd = 0.1, 0.9, 0.01
  params, grads = _tiny()
  got = _run(_constant(name="sgd", lr=lr, momentum=mu, nesterov=True, weight_decay=wd), params, grads)
  p, buf = _flat(_np(params)), {}
  for g in (_flat(_np(gr)) for gr in grads):
    for k in p:  # torch.optim.SGD(nesterov=True, weight_decay=wd): coupled L2, buf = mu*buf + g, step g + mu*buf
      d = g[k] + (wd * p[k] if _decays(k) else 0)
      buf[k] = mu * buf.get(k, 0) + d
      p[k] = p[k] - lr * (d + mu * buf[k])
  for k, x in _flat(got).items():
    np.testing.assert_allclose(x, p[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_lamb_matches_numpy_two_steps():
  lr, b1, b2, eps, wd = 0.1, 0.9, 0.999, 1e-6, 0.1
  params, grads = _tiny()
  got = _run(_constant(name="lamb", lr=lr, b1=b1, b2=b2, eps=eps, weight_decay=wd), params, grads)
  p, m, v = _flat(_np(params)), {}, {}
  for t, g in enumerate(_flat(_np(gr)) for gr in grads):
    for k in p:
      m[k] = b1 * m.get(k, 0) + (1 - b1) * g[k]
      v[k] = b2 * v.get(k, 0) + (1 - b2) * g[k] ** 2
      u = (m[k] / (1 - b1 ** (t + 1))) / (np.sqrt(v[k] / (1 - b2 ** (t + 1))) + eps)
      u = u + (wd * p[k] if _decays(k) else 0)
      trust = np.linalg.norm(p[k]) / np.linalg.norm(u)  # per-tensor trust ratio
      p[k] = p[k] - lr * trust * u
  for k, x in _flat(got).items():
    np.testing.assert_allclose(x, p[k], rtol=1e-5, atol=1e-7, err_msg=k)


# ----------------------------------------------------------------------------------------------------- clipping


def test_clipping_caps_the_global_norm():
  params, _ = _tiny()
  tx, _ = opt.make_optimizer(_constant(name="sgd", lr=1.0, momentum=0.0, clip_norm=1.0), params)
  big = jax.tree.map(lambda x: jnp.full_like(x, 5.0), params)  # global norm 5*sqrt(8) = 14.14
  updates, _ = tx.update(big, tx.init(params), params)
  np.testing.assert_allclose(optax.tree.norm(updates), 1.0, rtol=1e-6)
  np.testing.assert_allclose(updates["dense"]["bias"], -5.0 / math.sqrt(200.0), rtol=1e-6)
  small = jax.tree.map(lambda x: jnp.full_like(x, 0.1), params)  # norm 0.28 < 1: untouched
  updates, _ = tx.update(small, tx.init(params), params)
  np.testing.assert_allclose(updates["dense"]["kernel"], -0.1, rtol=1e-6)


# ---------------------------------------------------------------------------------------------- frozen groups


def test_frozen_params_do_not_move_and_have_no_state():
  model, params = _model_and_params("vit_ti16", **VIT)
  params = _random_like(params, 0)
  frozen = [r"^patch_embed/", r"^block_0/", r"^(pos_embed|cls_token)$"]
  tx, _ = opt.make_optimizer(
    _config(name="adamw", lr=0.01, weight_decay=0.05, frozen=frozen, schedule=dict(warmup_steps=1, total_steps=10)),
    params,
    model,
  )
  state = tx.init(params)
  is_frozen = _flat(opt.frozen_mask(params, frozen))
  n_frozen = sum(x.size for k, x in _flat(params).items() if is_frozen[k])
  n_train = sum(x.size for k, x in _flat(params).items() if not is_frozen[k])
  assert sum(is_frozen.values()) == 2 + 16 + 2 and n_frozen > 0
  # Adam keeps mu and nu for trainable params only (plus scalar counters): nothing for the frozen ones.
  assert sum(x.size for x in jax.tree.leaves(state) if x.ndim) == 2 * n_train
  step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, s, p)))
  new = params
  for i in range(3):
    new, state = step(new, state, _random_like(params, i + 1))
  before, after = _flat(params), _flat(new)
  for k in before:
    if is_frozen[k]:
      np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    else:
      assert np.abs(after[k] - before[k]).max() > 1e-4, k


# ------------------------------------------------------------------------------------------ layer-wise lr decay


def test_layer_decay_multipliers_for_a_four_block_vit():
  model, params = _model_and_params("vit_ti16", **VIT)
  mult = _flat(opt.layer_decay_multipliers(params, 0.5, model))
  expected = {
    "patch_embed/kernel": 1 / 32,
    "patch_embed/bias": 1 / 32,
    "pos_embed": 1 / 32,
    "cls_token": 1 / 32,
    "norm/scale": 1.0,
    "norm/bias": 1.0,
    "head/kernel": 1.0,
    "head/bias": 1.0,
  }
  for i in range(4):  # block_i has id i+1 of 0..5: multiplier 0.5 ** (5 - (i + 1))
    expected |= {k: 0.5 ** (4 - i) for k in mult if k.startswith(f"block_{i}/")}
  assert mult == expected
  # Through the optimizer: plain SGD with lr 1 moves each param by exactly -multiplier * grad.
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)
  tx, _ = opt.make_optimizer(_constant(name="sgd", lr=1.0, momentum=0.0, layer_decay=0.5), params, model)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  for k, u in _flat(updates).items():
    np.testing.assert_allclose(u, -expected[k], err_msg=k)


def test_layer_ids_for_swin_and_resnet():
  swin, n = opt.layer_ids(*reversed(_model_and_params("swin_t", **SWIN)))
  assert n == 6
  assert (
    swin["patch_embed/kernel"],
    swin["patch_norm/scale"],
    swin["stage_0_block_0/attn/query/kernel"],
    swin["stage_0_block_1/mlp/fc1/bias"],
    swin["merge_0/reduction/kernel"],
    swin["stage_1_block_0/norm1/scale"],
    swin["stage_1_block_1/attn/relative_position_bias_table"],
    swin["norm/scale"],
    swin["head/kernel"],
  ) == (0, 0, 1, 2, 2, 3, 4, 5, 5)
  resnet, n = opt.layer_ids(*reversed(_model_and_params("resnet18", **RESNET)))
  assert n == 4
  assert (
    resnet["stem_conv/kernel"],
    resnet["stem_bn/scale"],
    resnet["stage_0_block_0/conv2/kernel"],
    resnet["stage_1_block_0/shortcut_bn/bias"],
    resnet["head/kernel"],
  ) == (0, 0, 1, 2, 3)
  with pytest.raises(ValueError, match="layer_decay needs the model's layer ids"):
    opt.layer_ids({"encoder": {"kernel": jnp.zeros(2)}}, None)
  with pytest.raises(ValueError, match=r"ResNet.layer_id gives no id for parameters \['encoder/kernel'\]"):
    opt.layer_ids({"encoder": {"kernel": jnp.zeros(2)}}, lvm_jax.create_model("resnet18", **RESNET))


# --------------------------------------------------------------------------------------------- accumulation


@pytest.mark.parametrize(
  "block",
  [
    # Clipping sees the whole batch's gradient. eps is raised because attention key biases have a true gradient
    # of 0 (softmax ignores a shift): with eps=1e-8 Adam turns ~1e-9 float noise into +-lr steps in either run.
    dict(name="adamw", lr=1e-3, eps=1e-4, weight_decay=0.05, clip_norm=0.5),
    dict(name="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),  # sgd: a summed gradient would show
  ],
)
def test_accumulation_equals_the_big_batch(block):
  model = lvm_jax.create_model("vit_ti16", **{**VIT, "depth": 2})
  images = jax.random.normal(jax.random.key(1), (16, 32, 32, 3))
  labels = jnp.arange(16) % 10
  params = nn.meta.unbox(model.init(jax.random.key(0), images[:1], train=False))["params"]

  def loss(p, x, y):  # a mean over the batch, so the mean of micro-batch grads is the big-batch grad
    logits = model.apply({"params": p}, x, train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def train(k):
    tx, _ = opt.make_optimizer(
      _config(accumulate_steps=k, schedule=dict(warmup_steps=0, total_steps=4), **block), params, model
    )

    @jax.jit
    def step(p, s, x, y):
      u, s = tx.update(jax.grad(loss)(p, x, y), s, p)
      return optax.apply_updates(p, u), s

    p, s = params, tx.init(params)
    for batch in range(2):  # two optimizer updates of 8 examples each
      x, y = images[8 * batch : 8 * batch + 8], labels[8 * batch : 8 * batch + 8]
      for micro in range(k):
        before = p
        p, s = step(p, s, x[micro * 8 // k : (micro + 1) * 8 // k], y[micro * 8 // k : (micro + 1) * 8 // k])
        if micro < k - 1:  # nothing moves until the k-th micro-batch
          assert all(bool((a == b).all()) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(before)))
    return p

  big, accumulated = train(1), train(4)
  diff = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(big), jax.tree.leaves(accumulated)))
  moved = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(big), jax.tree.leaves(params)))
  print(f"accumulation {block['name']}: moved {moved:.3g}, max |big - accumulated| {diff:.3g}")
  assert moved > 1e-3 and diff < 1e-6, (moved, diff)


# ------------------------------------------------------------------------------------------- mixed precision


@pytest.mark.parametrize("name", ["adamw", "sgd", "lamb"])
def test_state_stays_float32_with_bf16_grads(name):
  params, grads = _tiny()
  tx, _ = opt.make_optimizer(_constant(name=name, clip_norm=1.0, accumulate_steps=2), params)
  state = tx.init(params)
  bf16 = jax.tree.map(lambda g: g.astype(jnp.bfloat16), grads[0])
  for _ in range(2):
    updates, state = jax.jit(tx.update)(bf16, state, params)
  floats = [x.dtype for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
  assert floats and set(floats) == {jnp.dtype(jnp.float32)}
  assert {u.dtype for u in jax.tree.leaves(updates)} == {jnp.dtype(jnp.float32)}
  assert float(optax.tree.norm(updates)) > 0  # the second micro-batch emitted a real update


def test_bf16_grads_are_accumulated_in_float32():
  # Micro-batch grads 1 and 1 + 2**-7 are exact in bf16; their mean 1 + 2**-8 is not (bf16 would round it to 1).
  params = {"w": jnp.zeros(3)}
  tx, _ = opt.make_optimizer(_constant(name="sgd", lr=1.0, momentum=0.0, accumulate_steps=2), params)
  state = tx.init(params)
  for g in (1.0, 1.0 + 2**-7):
    updates, state = tx.update({"w": jnp.full(3, g, jnp.bfloat16)}, state, params)
  assert updates["w"].dtype == jnp.float32
  np.testing.assert_array_equal(updates["w"], -(1.0 + 2**-8))


# ------------------------------------------------------------------------------------------------------- EMA


def test_ema_update():
  ema = {"w": jnp.array([1.0, -2.0]), "b": jnp.array([0.0], jnp.bfloat16)}
  params = {"w": jnp.array([3.0, 2.0]), "b": jnp.array([1.0], jnp.float32)}
  out = opt.ema_update(ema, params, 0.9)
  np.testing.assert_allclose(out["w"], [1.2, -1.6], rtol=1e-6)
  assert out["b"].dtype == jnp.bfloat16 and float(out["b"][0]) == pytest.approx(0.1, rel=1e-2)
  # Jitted with a traced decay, n steps towards fixed params: ema_n = p + (ema_0 - p) * decay ** n.
  step = jax.jit(opt.ema_update)
  e = ema
  for _ in range(10):
    e = step(e, params, jnp.float32(0.8))
  np.testing.assert_allclose(e["w"], np.array([3.0, 2.0]) + np.array([-2.0, -4.0]) * 0.8**10, rtol=1e-5)


def test_layer_decay_on_a_scanned_vit_says_what_to_do():
  model, params = _model_and_params("vit_b16", scan_layers=True, **VIT)
  with pytest.raises(ValueError, match="scan_layers=True stacks them"):
    opt.layer_decay_multipliers(params, 0.5, model)


# ----------------------------------------------------------------------------------- models that wrap others


class _TinyDetector(nn.Module):
  """A backbone under "backbone", a neck and a head, describing its parameters through the backbone's
  description (models/param_groups.py): how a detector plugs into the optimizer without editing it."""

  backbone: nn.Module

  @nn.compact
  def __call__(self, x):
    features = self.backbone(x, return_features=True)["stride_8"]
    neck = nn.Dense(8, name="neck")(features)
    neck = nn.LayerNorm(name="neck_norm")(neck)
    return nn.Dense(3, name="box_head")(neck)

  def layer_id(self, path):
    inner = param_groups.relative_path(path, "backbone")
    # The neck and head train at the full lr, with the backbone's own head slot (unused: it has no classifier).
    return self.backbone.layer_id(inner) if inner is not None else self.num_layer_ids() - 1

  def num_layer_ids(self):
    return self.backbone.num_layer_ids()

  def no_weight_decay(self):
    return self.backbone.no_weight_decay()


def test_a_wrapper_delegates_to_its_backbones_description():
  backbone = lvm_jax.create_model("swin_t", **{**SWIN, "num_classes": 0})
  detector = _TinyDetector(backbone)
  params = nn.meta.unbox(jax.eval_shape(detector.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3))))["params"]
  ids, n = opt.layer_ids(params, detector)
  swin_ids, swin_n = opt.layer_ids(params["backbone"], backbone)
  assert n == swin_n == 6
  assert {p: ids[f"backbone/{p}"] for p in swin_ids} == swin_ids  # the backbone's ids under the prefix
  assert ids["neck/kernel"] == ids["box_head/bias"] == ids["neck_norm/scale"] == 5
  decayed = _decayed(params, model=detector)
  assert decayed == {f"backbone/{p}" for p in _decayed(params["backbone"], model=backbone)} | {
    "neck/kernel",
    "box_head/kernel",
  }
  assert "backbone/stage_0_block_0/attn/relative_position_bias_table" not in decayed


def test_step_decay_multiplies_by_the_factor_at_each_boundary():
  # torchvision's detection recipes: MultiStepLR at epochs 16 and 22 of 26, after a linear warmup.
  lr = schedules.warmup_then_decay(
    0.01, warmup_steps=10, total_steps=260, decay="steps", boundaries=(16 / 26, 22 / 26), factor=0.1
  )
  values = [float(lr(s)) for s in (5, 10, 159, 160, 219, 220, 400)]
  np.testing.assert_allclose(values, [0.005, 0.01, 0.01, 0.001, 0.001, 0.0001, 0.0001], rtol=1e-6)
  with pytest.raises(ValueError, match="boundaries"):
    schedules.warmup_then_decay(0.01, warmup_steps=0, total_steps=10, decay="steps", boundaries=(1.5,))
