"""TrainState: everything a resumed run needs besides the data position (which is `step` times the batch), as
one pytree that Orbax saves whole and that the mesh shards leaf by leaf.

It is created directly in its shards: jax.eval_shape gives the shapes and logical names, state_shardings maps
them onto the mesh, and one jit with out_shardings builds the state, so no device ever holds it whole.
"""

from typing import Any, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from lvm_jax.parallel import partitioning


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array  # batches consumed (micro-batches when gradients are accumulated)
  params: Any
  batch_stats: Any  # BatchNorm running statistics ({} for models without them)
  opt_state: Any
  ema_params: Any  # exponential moving average of params ({} when EMA is off)
  rng: jax.Array  # raw uint32 key data: plain arrays save and restore anywhere
  nonfinite_step: jax.Array  # first step whose loss was NaN/Inf, -1 while all were finite

  @property
  def variables(self) -> dict:
    """What model.apply takes for evaluation with the trained parameters."""
    return self._variables(self.params)

  @property
  def ema_variables(self) -> dict:
    return self._variables(self.ema_params)

  def _variables(self, params) -> dict:
    return {"params": params, **({"batch_stats": self.batch_stats} if self.batch_stats else {})}


def _new_state(variables: dict, tx: optax.GradientTransformation, rng: jax.Array, use_ema: bool) -> TrainState:
  params = variables["params"]
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=variables.get("batch_stats", {}),
    opt_state=tx.init(params),
    ema_params=jax.tree.map(jnp.copy, params) if use_ema else {},
    rng=jax.random.key_data(rng),
    nonfinite_step=jnp.full((), -1, jnp.int32),
  )


def abstract_state(model: nn.Module, tx, input_shape, *, use_ema: bool) -> tuple[TrainState, dict]:
  """(the TrainState as ShapeDtypeStructs, the model's boxed abstract variables that name its axes)."""
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(input_shape, jnp.float32), train=False))
  state = jax.eval_shape(lambda v: _new_state(v, tx, jax.random.key(0), use_ema), nn.meta.unbox(boxed))
  return state, boxed


def sharded_abstract_state(model: nn.Module, tx, input_shape, mesh, strategy, *, use_ema: bool) -> TrainState:
  """The TrainState as ShapeDtypeStructs carrying their NamedShardings: parameters and everything shaped like them
  (optimizer moments, EMA) follow the strategy's rules; counters and the rng are replicated. It is both the
  layout to create the state in and the target to restore a checkpoint onto."""
  abstract, boxed = abstract_state(model, tx, input_shape, use_ema=use_ema)
  shardings_ = partitioning.state_shardings(abstract, boxed, mesh, strategy)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings_)


def shardings(model: nn.Module, tx, input_shape, mesh, strategy, *, use_ema: bool) -> TrainState:
  """NamedShardings for every leaf of the TrainState (see sharded_abstract_state)."""
  return jax.tree.map(
    lambda a: a.sharding, sharded_abstract_state(model, tx, input_shape, mesh, strategy, use_ema=use_ema)
  )


def create(
  model: nn.Module,
  tx,
  rng: jax.Array,
  input_shape,
  state_shardings: TrainState,
  *,
  use_ema: bool,
  variables: Optional[dict] = None,
) -> TrainState:
  """A fresh TrainState in its shards: the model's own init, or `variables` (e.g. pretrained) when given.

  Given variables are first placed in their shards (device_put from the host sends each device only its part).
  """
  if variables is None:

    def init(key):
      init_key, state_key = jax.random.split(key)
      variables = nn.meta.unbox(model.init(init_key, jnp.zeros(input_shape, jnp.float32), train=False))
      return _new_state(variables, tx, state_key, use_ema)

    return jax.jit(init, out_shardings=state_shardings)(rng)

  variables = nn.meta.unbox(variables)
  placed = {"params": jax.device_put(variables["params"], state_shardings.params)}
  if variables.get("batch_stats"):
    placed["batch_stats"] = jax.device_put(variables["batch_stats"], state_shardings.batch_stats)
  state_key = jax.random.split(rng)[1]  # the same state rng as a fresh init from this key
  return jax.jit(lambda v, key: _new_state(v, tx, key, use_ema), out_shardings=state_shardings)(placed, state_key)
