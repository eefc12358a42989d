"""Strategies -> PartitionSpecs, FSDP shard sizes, sharded init, optimizer state and activation rules."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import lvm_jax
from lvm_jax import ResNet, SwinTransformer, VisionTransformer
from lvm_jax import logical_axes, parallel
from lvm_jax.models import registry

# Width 64 / MLP 256: fc1 and fc2 kernels (16,384 elements) reach FSDP's default threshold of 2**14.
VIT = VisionTransformer(num_classes=10, image_size=32, patch_size=4, width=64, depth=2, mlp_dim=256, num_heads=4)
VIT_INPUT = (1, 32, 32, 3)


def paths(tree):
  return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def abstract(model, shape):
  return jax.eval_shape(lambda key: model.init(key, jnp.zeros(shape)), jax.random.key(0))


@pytest.mark.parametrize(
  "strategy, mesh, want",
  [
    ("dp", {"data": 8}, P(None, None)),
    ("fsdp", {"fsdp": 8}, P(None, "fsdp")),  # mlp (256) is the larger dimension
    ("tp", {"data": 4, "model": 2}, P(None, "model")),
    ("fsdp_tp", {"data": 2, "fsdp": 2, "model": 2}, P("fsdp", "model")),  # mlp taken by TP: fsdp gets embed
    ("fsdp_tp", {"fsdp": 8}, P(None, "fsdp")),  # model axis of size 1 leaves mlp free for fsdp
  ],
)
def test_presets_place_an_mlp_kernel(strategy, mesh, want):
  spec = parallel.partition_spec(
    (64, 256), ("embed", "mlp"), parallel.create_mesh(mesh), parallel.get_strategy(strategy, fsdp_min_size=1)
  )
  assert spec == want


@pytest.mark.parametrize(
  "shape, want, why",
  [
    ((3, 3, 64, 128), P(None, None, None, "fsdp"), "largest dimension"),
    ((3, 3, 100, 64), P(None, None, None, "fsdp"), "100 does not divide by 8: the next largest"),
    ((1, 197, 768), P(None, None, "fsdp"), "ViT-B/16 position embedding: 197 tokens do not divide, the width"),
    ((256, 256), P("fsdp", None), "a tie goes to the first dimension"),
    ((3, 5, 7, 313), P(None, None, None, None), "no dimension divides by 8 (32,865 elements): replicated"),
    ((8, 2047), P(None, None), "16,376 elements, below 2**14: replicated"),
    ((8, 2048), P(None, "fsdp"), "16,384 elements, at the threshold"),
  ],
)
def test_fsdp_shards_unnamed_tensors_along_their_largest_divisible_dimension(shape, want, why):
  mesh = parallel.create_mesh({"fsdp": 8})
  assert parallel.partition_spec(shape, None, mesh, parallel.get_strategy("fsdp")) == want, why


def test_a_dimension_that_does_not_split_evenly_stays_whole():
  mesh = parallel.create_mesh({"data": 4, "model": 2})
  # swin_t's first stage has 3 heads: TP cannot split them over model=2, the tensor is replicated.
  assert parallel.partition_spec((96, 3, 32), ("embed", "heads", "kv"), mesh, "tp") == P(None, None, None)
  assert parallel.partition_spec((96, 6, 16), ("embed", "heads", "kv"), mesh, "tp") == P(None, "model", None)


def shard_fraction(x):
  return x.addressable_shards[0].data.nbytes / x.nbytes


def test_fsdp_over_8_devices_holds_one_eighth_of_every_big_tensor():
  mesh = parallel.create_mesh({"fsdp": 8})
  variables = parallel.init_sharded(VIT, 0, VIT_INPUT, mesh, "fsdp")
  fractions = {path: shard_fraction(x) for path, x in paths(variables).items()}
  big = {path for path, x in paths(variables).items() if x.size >= 2**14}
  assert big == {f"['params']['block_{i}']['mlp']['{fc}']['kernel']" for i in range(2) for fc in ("fc1", "fc2")}
  for path, fraction in fractions.items():
    assert fraction == (1 / 8 if path in big else 1.0), path
  # Replicated, because below 2**14 elements: attention kernels (64*4*16 = 4,096), pos_embed (65*64 = 4,160),
  # patch_embed kernel (4*4*3*64 = 3,072), the head (64*10), every bias, LayerNorm scale and the class token.
  replicated = {path.split("']['")[-1].rstrip("']") for path in fractions if path not in big}
  assert replicated == {"kernel", "bias", "scale", "pos_embed", "cls_token"}
  # The same numbers as an unsharded init: no device ever needed the whole tensor to draw its shard.
  plain = jax.jit(lambda key: nn.meta.unbox(VIT.init(key, jnp.zeros(VIT_INPUT))))(jax.random.key(0))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), variables, plain)


@pytest.mark.parametrize(
  "strategy, mesh", [("tp", {"data": 4, "model": 2}), ("fsdp_tp", {"data": 2, "fsdp": 2, "model": 2})]
)
def test_tensor_parallel_splits_heads_and_mlp(strategy, mesh):
  mesh = parallel.create_mesh(mesh)
  variables = parallel.init_sharded(VIT, 0, VIT_INPUT, mesh, strategy)
  boxed = jax.tree_util.tree_flatten_with_path(
    abstract(VIT, VIT_INPUT), is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
  )[0]
  names = {jax.tree_util.keystr(path): x.names for path, x in boxed}
  for path, x in paths(variables).items():
    tp = 0.5 if {"heads", "mlp"} & set(names[path]) else 1.0
    fsdp = 0.5 if strategy == "fsdp_tp" and x.size >= 2**14 else 1.0
    assert shard_fraction(x) == tp * fsdp, (path, names[path])
  assert shard_fraction(variables["params"]["block_0"]["mlp"]["fc1"]["kernel"]) == (
    0.25 if strategy == "fsdp_tp" else 0.5
  )


@pytest.mark.parametrize(
  "model, shape",
  [
    (
      SwinTransformer(
        num_classes=10, image_size=16, patch_size=2, embed_dim=16, depths=(2, 1), num_heads=(2, 4), window_size=4
      ),
      (1, 16, 16, 3),
    ),
    (ResNet(num_classes=10, stage_sizes=(1, 1), block="basic", width=8), (1, 32, 32, 3)),
  ],
)
def test_init_sharded_swin_and_resnet(model, shape):
  mesh = parallel.create_mesh({"data": 2, "fsdp": 2, "model": 2})
  strategy = parallel.get_strategy("fsdp_tp", fsdp_min_size=2**8)
  variables = parallel.init_sharded(model, 0, shape, mesh, strategy)
  want = parallel.variable_shardings(abstract(model, shape), mesh, strategy)
  assert jax.tree.map(lambda x: x.sharding.spec, variables) == jax.tree.map(lambda s: s.spec, want)
  assert sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves(variables)) >= 5
  plain = jax.jit(lambda key: nn.meta.unbox(model.init(key, jnp.zeros(shape))))(jax.random.key(0))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), variables, plain)


def test_optimizer_state_mirrors_the_parameters():
  mesh = parallel.create_mesh({"data": 2, "fsdp": 2, "model": 2})
  strategy = parallel.get_strategy("fsdp_tp", fsdp_min_size=2**10)
  boxed = abstract(VIT, VIT_INPUT)["params"]
  param_specs = jax.tree.map(lambda s: s.spec, parallel.variable_shardings(boxed, mesh, strategy))
  # optax keeps flax's boxes, so eval_shape of init on the boxed params names every moment.
  adam = parallel.variable_shardings(jax.eval_shape(optax.adamw(1e-3).init, boxed), mesh, strategy)
  assert jax.tree.map(lambda s: s.spec, adam[0].mu) == param_specs
  assert jax.tree.map(lambda s: s.spec, adam[0].nu) == param_specs
  assert adam[0].count.spec == P()
  # A masked, chained optimizer initialised on plain params: leaves are matched to parameters by path.
  plain = nn.meta.unbox(boxed)
  mask = jax.tree.map(lambda x: x.ndim > 1, plain)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.masked(optax.adam(1e-3), mask))
  state = parallel.state_shardings(jax.eval_shape(tx.init, plain), boxed, mesh, strategy)
  mu = paths(state[1].inner_state[0].mu)
  for path, spec in paths(param_specs).items():
    if path in mu and mu[path] is not None:
      assert mu[path].spec == spec, path
  assert mu["['block_0']['mlp']['fc1']['kernel']"].spec == P("fsdp", "model")


def vit_loss(params, images):
  return VIT.apply({"params": params}, images).sum()


def test_activation_constraints_bind_while_traced():
  mesh = parallel.create_mesh({"data": 4, "model": 2})
  params = nn.meta.unbox(abstract(VIT, (8, 32, 32, 3)))["params"]
  images = jax.ShapeDtypeStruct((8, 32, 32, 3), jnp.float32)
  bound = jax.jit(jax.grad(parallel.with_sharding_rules(vit_loss, mesh, "tp"))).lower(params, images).as_text()
  plain = jax.jit(jax.grad(vit_loss)).lower(params, images).as_text()
  # ("batch", "length", "heads", "kv") -> batch over data/fsdp, heads over model; none without the rules.
  assert "sdy.sharding_constraint" in bound and '{"data", "fsdp"}, {}, {"model"}' in bound
  assert "sharding_constraint" not in plain
  with parallel.sharding_rules(mesh, "tp"):
    assert nn.get_logical_axis_rules() == parallel.PRESETS["tp"].rules


def test_custom_rules_from_a_config():
  config = ml_collections.ConfigDict(
    {"preset": "fsdp", "rules": [["batch", ["data", "fsdp"]], ["embed", "model"]], "fsdp_min_size": 2**10}
  )
  strategy = parallel.get_strategy(config)
  assert strategy.rules == (("batch", ("data", "fsdp")), ("embed", "model"))
  assert (strategy.fsdp_axis, strategy.fsdp_min_size) == ("fsdp", 2**10)
  mesh = parallel.create_mesh({"fsdp": 4, "model": 2})
  assert parallel.partition_spec((64, 256), ("embed", "mlp"), mesh, strategy) == P("model", "fsdp")


@pytest.mark.parametrize(
  "spec, match",
  [
    (
      "fdsp",
      r"Unknown sharding strategy 'fdsp'; the presets are \['dp', 'fsdp', 'fsdp_tp', 'tp'\]\. "
      r"Did you mean 'fsdp'\?",
    ),
    ({"preset": "tp", "axes": []}, r"Unknown sharding strategy keys \['axes'\]"),
    ({"rules": [("mlp",)]}, r"must be a \(logical name, mesh axes\) pair"),
    # A typo would match no tensor and silently replicate what it meant to shard.
    (
      {"rules": [["embd", "model"]]},
      r"Sharding rule \('embd', 'model'\) names the unknown logical axis 'embd'\. "
      r"Did you mean 'embed'\? The logical axes are batch, length, .*, layers",
    ),
    (
      parallel.Strategy(rules=(("batch", "data"), ("attention", "model"))),
      r"Sharding rule \('attention', 'model'\) names the unknown logical axis 'attention'\. The logical",
    ),
  ],
)
def test_bad_strategy_is_a_clear_error(spec, match):
  with pytest.raises(ValueError, match=match):
    parallel.get_strategy(spec)


def test_rule_naming_a_missing_mesh_axis_is_an_error():
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  with pytest.raises(ValueError, match=r"uses mesh axes \['fsdp', 'model'\] that the mesh \{'data': 8\}"):
    parallel.variable_shardings(abstract(VIT, VIT_INPUT), mesh, "fsdp_tp")


def test_fsdp_never_shards_the_stacked_layer_axis_of_scanned_layers():
  mesh = jax.sharding.AbstractMesh((1, 32, 1), ("data", "fsdp", "model"))
  # 32 stacked q/k/v biases of 16 heads x 80: only the layer axis divides by 32, so the tensor stays whole.
  assert parallel.partition_spec((32, 16, 80), ("layers", "heads", "kv"), mesh, "fsdp") == P(None, None, None)
  # Without the name the same shape would be split along its first axis.
  assert parallel.partition_spec((32, 16, 80), (None, "heads", "kv"), mesh, "fsdp") == P("fsdp", None, None)


def test_every_preset_names_every_logical_axis_once():
  for name, strategy in parallel.PRESETS.items():
    assert sorted(rule for rule, _ in strategy.rules) == sorted(logical_axes.NAMES), name
  assert parallel.LOGICAL_AXES == logical_axes.NAMES


def logical_names_used(model, monkeypatch) -> tuple[set, set]:
  """(names on the model's parameters, names its activation constraints use), from an abstract init."""
  constrained = set()

  def record(x, names, *args, **kwargs):
    constrained.update(names)
    return x

  monkeypatch.setattr(nn, "with_logical_constraint", record)
  size = getattr(model, "image_size", 224)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
  partitioned = [
    x
    for x in jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    if isinstance(x, nn.LogicallyPartitioned)
  ]
  assert partitioned, "the model tags no parameter with logical names"
  return {n for x in partitioned for n in x.names} - {None}, constrained - {None}


def _kinds(names: list[str]) -> list[str]:
  """One variant of each kind: the same class and the same non-numeric arguments (block type, padding, pooling, a
  hybrid's ResNet or none). Sizes and depths do not change which logical names a model uses."""
  seen, kept = set(), []
  for name in names:
    model = lvm_jax.create_model(name)
    kind = (type(model),) + tuple(
      (
        field,
        getattr(model, field) if isinstance(getattr(model, field), (str, bool)) else getattr(model, field) is None,
      )
      for field in registry.model_fields(type(model))
    )
    if kind not in seen:
      seen.add(kind)
      kept.append(name)
  return kept


def test_the_models_use_exactly_the_declared_logical_axes(monkeypatch):
  used = set()
  kinds = _kinds(lvm_jax.list_models())
  classes = lambda names: {type(lvm_jax.create_model(name)) for name in names}
  assert classes(kinds) == classes(lvm_jax.list_models()) and {"vit_b16", "vit_b16_r50"} <= set(kinds)
  for name in kinds:
    model = lvm_jax.create_model(name)
    variants = [model]
    if "scan_layers" in registry.model_fields(type(model)):  # the stacked layer axis appears only when scanned
      variants.append(model.clone(scan_layers=True))
    for variant in variants:
      params, activations = logical_names_used(variant, monkeypatch)
      unknown = (params | activations) - set(logical_axes.NAMES)
      assert not unknown, f"{name} uses logical axes {sorted(unknown)} that lvm_jax.logical_axes does not declare"
      used |= params | activations
  # A declared name no model uses would be a rule target that never matches anything.
  assert used == set(logical_axes.NAMES)
