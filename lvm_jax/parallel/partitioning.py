"""Sharding strategies: logical axis rules (+ FSDP) -> PartitionSpecs for variables, optimizer state, activations.

A strategy maps the models' logical axis names ("batch", "embed", "mlp", "heads", ...; lvm_jax.logical_axes
declares them all, and a rule naming another is an error) onto the mesh axes ("data", "fsdp", "model"). FSDP
additionally shards every tensor of at least `fsdp_min_size` elements over the fsdp axis along its largest
dimension that divides evenly and no rule already shards (big_vision's idea), so conv kernels, position
embeddings and BatchNorm statistics are covered without naming their dimensions.
The decision depends only on a tensor's shape and names, so optimizer state mirrors its parameter exactly.
"""

import contextlib
import dataclasses
import difflib
import functools
import math
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lvm_jax import logical_axes
from lvm_jax.parallel import mesh as mesh_lib

Rules = tuple[tuple[str, Any], ...]

_BATCH_RULE = (logical_axes.BATCH, mesh_lib.BATCH_AXES)
# Megatron-style: attention heads and the MLP hidden layer split over "model"; the residual stream ("embed")
# stays whole, so each block needs one all-reduce after attention and one after the MLP.
_TP_RULES = ((logical_axes.HEADS, "model"), (logical_axes.MLP, "model"))
LAYER_AXIS = logical_axes.LAYERS  # the stacked axis of scanned layers (ViT scan_layers): never sharded by FSDP


def _preset_rules(*sharded) -> tuple:
  """`sharded` then every other declared name replicated, so each preset's table names every logical axis."""
  named = {name for name, _ in sharded}
  return tuple(sharded) + tuple((name, None) for name in logical_axes.NAMES if name not in named)


@dataclasses.dataclass(frozen=True)
class Strategy:
  """rules: (logical name, mesh axis | tuple of axes | None) pairs, earlier pairs first (flax's semantics).
  fsdp_axis: shard big tensors over this mesh axis (None: no FSDP); fsdp_min_size: "big" in elements."""

  rules: Rules
  fsdp_axis: Optional[str] = None
  fsdp_min_size: int = 2**14
  name: str = "custom"


PRESETS = {
  "dp": Strategy(_preset_rules(_BATCH_RULE), name="dp"),
  "fsdp": Strategy(_preset_rules(_BATCH_RULE), fsdp_axis="fsdp", name="fsdp"),
  "tp": Strategy(_preset_rules(_BATCH_RULE, *_TP_RULES), name="tp"),
  "fsdp_tp": Strategy(_preset_rules(_BATCH_RULE, *_TP_RULES), fsdp_axis="fsdp", name="fsdp_tp"),
}
_SPEC_KEYS = ("preset", "rules", "fsdp_axis", "fsdp_min_size")


def _normalize_rules(rules) -> Rules:
  out = []
  for rule in rules:
    if isinstance(rule, str) or len(rule) != 2 or not isinstance(rule[0], str):
      raise ValueError(f"Sharding rule {rule!r} must be a (logical name, mesh axes) pair, e.g. ('mlp', 'model').")
    if rule[0] not in logical_axes.NAMES:  # it would match no tensor: whatever it meant to shard stays whole
      close = difflib.get_close_matches(rule[0], logical_axes.NAMES, n=1)
      hint = f" Did you mean {close[0]!r}?" if close else ""
      raise ValueError(
        f"Sharding rule {tuple(rule)!r} names the unknown logical axis {rule[0]!r}.{hint} "
        f"The logical axes are {', '.join(logical_axes.NAMES)} (lvm_jax.logical_axes)."
      )
    axes = rule[1]
    if isinstance(axes, (list, tuple)):  # configs hold lists; flax wants tuples
      axes = tuple(axes)
    if not (axes is None or isinstance(axes, str) or all(isinstance(a, str) for a in axes)):
      raise ValueError(f"Sharding rule {rule!r}: mesh axes must be None, a name or a sequence of names.")
    out.append((rule[0], axes))
  return tuple(out)


def get_strategy(spec: Union[str, Strategy, Mapping, Any], **overrides) -> Strategy:
  """A Strategy from a preset name ("dp", "fsdp", "tp", "fsdp_tp"), a Strategy, or a config mapping.

  A mapping (dict or ml_collections.ConfigDict) may give "preset" (the base, default "dp"), "rules" (replace
  the base's), "fsdp_axis" and "fsdp_min_size"; keyword overrides apply last.
  """
  if isinstance(spec, Strategy):
    strategy = spec
  elif isinstance(spec, str):
    if spec not in PRESETS:
      close = difflib.get_close_matches(spec, PRESETS, n=1)
      hint = f" Did you mean {close[0]!r}?" if close else ""
      raise ValueError(
        f"Unknown sharding strategy {spec!r}; the presets are {sorted(PRESETS)}.{hint} "
        "A config can also give its own rules: {'rules': [('mlp', 'model'), ...]}."
      )
    strategy = PRESETS[spec]
  else:
    fields = dict(spec.to_dict() if hasattr(spec, "to_dict") else spec)
    unknown = sorted(set(fields) - set(_SPEC_KEYS))
    if unknown:
      raise ValueError(f"Unknown sharding strategy keys {unknown}; accepted: {list(_SPEC_KEYS)}.")
    strategy = get_strategy(fields.pop("preset", "dp"))
    if "rules" in fields:
      strategy = dataclasses.replace(strategy, name="custom", rules=_normalize_rules(fields.pop("rules")))
    strategy = dataclasses.replace(strategy, **fields)
  if overrides:
    strategy = dataclasses.replace(strategy, **overrides)
  return dataclasses.replace(strategy, rules=_normalize_rules(strategy.rules))


def check_strategy(strategy: Strategy, mesh: Mesh) -> None:
  """Raises if a rule or the fsdp axis names a mesh axis the mesh lacks (a typo would silently replicate)."""
  named = [a for _, axes in strategy.rules for a in ((axes,) if isinstance(axes, str) else axes or ())]
  if strategy.fsdp_axis is not None:
    named.append(strategy.fsdp_axis)
  missing = sorted(set(named) - set(mesh.axis_names))
  if missing:
    raise ValueError(
      f"Sharding strategy {strategy.name!r} uses mesh axes {missing} that the mesh {dict(mesh.shape)} does not have."
    )


def _axes_size(mesh: Mesh, axes) -> int:
  return math.prod(mesh.shape[a] for a in axes)


def partition_spec(shape: Sequence[int], names: Optional[Sequence[Optional[str]]], mesh: Mesh, strategy: Strategy) -> P:
  """Where one tensor of `shape` with logical `names` (None: unnamed) goes on `mesh`."""
  strategy = get_strategy(strategy)
  shape = tuple(shape)
  if names is None:
    names = (None,) * len(shape)
  if len(names) != len(shape):
    raise ValueError(f"Logical names {tuple(names)} do not match a tensor of shape {shape}.")
  spec = []
  for dim, axes in zip(shape, nn.logical_to_mesh_axes(tuple(names), strategy.rules)):
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if mesh.shape[a] > 1)  # size-1 axes shard nothing; leave the dim free
    # A dimension that does not split evenly (e.g. 3 heads over model=2) stays whole rather than padded.
    spec.append(axes if axes and dim % _axes_size(mesh, axes) == 0 else None)

  fsdp = strategy.fsdp_axis
  used = {a for axes in spec if axes for a in axes}
  if fsdp is not None and mesh.shape[fsdp] > 1 and fsdp not in used and math.prod(shape) >= strategy.fsdp_min_size:
    # Never the stacked layer axis of scanned layers: each scan step would gather its layer from other devices.
    free = [
      i for i, axes in enumerate(spec) if axes is None and shape[i] % mesh.shape[fsdp] == 0 and names[i] != LAYER_AXIS
    ]
    if free:
      spec[max(free, key=lambda i: (shape[i], -i))] = (fsdp,)  # the largest; ties go to the earliest dim
  return P(*(axes[0] if axes and len(axes) == 1 else axes for axes in spec))


def _is_boxed(x) -> bool:
  return isinstance(x, nn.meta.Partitioned)


def _leaf_spec(x, mesh: Mesh, strategy: Strategy) -> P:
  if isinstance(x, nn.LogicallyPartitioned):
    return partition_spec(np.shape(x.value), x.names, mesh, strategy)
  if _is_boxed(x):  # plain nn.Partitioned names mesh axes, not logical ones
    return P(*x.names)
  return partition_spec(np.shape(x), None, mesh, strategy)


def variable_specs(abstract_variables, mesh: Mesh, strategy) -> Any:
  """PartitionSpecs for a (boxed) variables tree: the unboxed tree's structure, one spec a tensor.

  Works for any pytree whose leaves are arrays / ShapeDtypeStructs, optionally boxed with logical names:
  model variables from jax.eval_shape(model.init, ...), or optimizer state from jax.eval_shape(tx.init,
  boxed_params) (optax keeps the boxes, so moments get their parameter's names).
  """
  strategy = get_strategy(strategy)
  check_strategy(strategy, mesh)
  return jax.tree.map(lambda x: _leaf_spec(x, mesh, strategy), abstract_variables, is_leaf=_is_boxed)


def variable_shardings(abstract_variables, mesh: Mesh, strategy) -> Any:
  """NamedShardings for a (boxed) variables tree, for jit's in/out_shardings or jax.device_put."""
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), variable_specs(abstract_variables, mesh, strategy))


def _dict_suffix(path) -> tuple:
  """The trailing dict keys of a pytree path: a parameter's address inside whatever state holds it."""
  keys = []
  for entry in reversed(path):
    if not isinstance(entry, jax.tree_util.DictKey):
      break
    keys.append(entry.key)
  return tuple(reversed(keys))


def state_shardings(abstract_state, abstract_params, mesh: Mesh, strategy) -> Any:
  """NamedShardings for any state (optax state, EMA, a TrainState) whose leaves mirror unboxed parameters.

  A leaf sitting at a parameter's path (its trailing dict keys; one ends with the other) with the same shape
  gets that parameter's spec, so Adam moments inside masked / multi_transform / MultiSteps states shard like
  their parameters; any other leaf is treated as an unnamed tensor (step counters end up replicated).
  """
  strategy = get_strategy(strategy)
  specs = variable_specs(abstract_params, mesh, strategy)
  leaves = jax.tree.leaves(abstract_params, is_leaf=_is_boxed)
  by_name = {}
  for (path, spec), leaf in zip(jax.tree_util.tree_flatten_with_path(specs)[0], leaves):
    keys, shape = _dict_suffix(path), np.shape(leaf.value if _is_boxed(leaf) else leaf)
    by_name.setdefault(keys[-1] if keys else None, []).append((keys, tuple(shape), spec))

  def one(path, leaf):
    keys, shape = _dict_suffix(path), tuple(np.shape(leaf))
    found = {}
    for pkeys, pshape, spec in by_name.get(keys[-1] if keys else object(), []):
      n = min(len(keys), len(pkeys))
      if pshape == shape and keys[-n:] == pkeys[-n:]:
        found.setdefault(n, set()).add(spec)
    best = found.get(max(found)) if found else None
    if best and len(best) == 1:
      return NamedSharding(mesh, next(iter(best)))
    return NamedSharding(mesh, partition_spec(shape, None, mesh, strategy))

  unboxed = jax.tree.map(lambda x: x.value if _is_boxed(x) else x, abstract_state, is_leaf=_is_boxed)
  return jax.tree_util.tree_map_with_path(one, unboxed)


@contextlib.contextmanager
def sharding_rules(mesh: Mesh, strategy):
  """Mesh + logical rules for code run outside jit that then traces (jax.jit calls, model.init, ...).

  flax's logical rules are not part of jit's cache key: trace a function under one strategy only, or use
  with_sharding_rules, which binds them inside the traced function.
  """
  strategy = get_strategy(strategy)
  check_strategy(strategy, mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(strategy.rules):
    yield strategy


def with_sharding_rules(fn: Callable, mesh: Mesh, strategy) -> Callable:
  """`fn` with the strategy's rules active while it is traced, so the models' activation constraints bind.

  Meant to be jitted (jax.jit(with_sharding_rules(step, mesh, "fsdp"), in_shardings=..., ...)); the
  arguments' shardings supply the devices, the abstract mesh lets flax turn logical names into constraints.
  """
  strategy = get_strategy(strategy)
  check_strategy(strategy, mesh)

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(strategy.rules):
      return fn(*args, **kwargs)

  return wrapped


def init_sharded(
  model: nn.Module, rng, input_shape: Sequence[int], mesh: Mesh, strategy, *, dtype=jnp.float32, **init_kwargs
) -> Any:
  """model.init's variables, unboxed, created directly in their shards (no device ever holds them whole).

  jax.eval_shape finds the shapes and names, then one jit with out_shardings creates every shard in place.
  rng: a key or an int seed. init_kwargs go to model.init (default train=False).
  """
  strategy = get_strategy(strategy)
  rng = jax.random.key(rng) if isinstance(rng, int) else rng
  init_kwargs.setdefault("train", False)

  def init(key):
    return model.init(key, jnp.zeros(input_shape, dtype), **init_kwargs)

  abstract = jax.eval_shape(init, rng)
  shardings = variable_shardings(abstract, mesh, strategy)
  return jax.jit(lambda key: nn.meta.unbox(init(key)), out_shardings=shardings)(rng)
