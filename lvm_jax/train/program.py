"""A train program: a task's model, the optimizer and the sharded state layout, and the train and eval steps
jitted from them, exactly as the trainer runs them. setup.build makes one (a Run) from a config and its data;
the benchmarks make one directly, so what they time is what users train.

    program = TrainProgram.create(task=Classification(10), model=create_model("resnet50", num_classes=10),
                                  optimizer={"name": "adamw", "lr": 1e-3}, mesh=create_mesh(),
                                  strategy=get_strategy("dp"), input_shape=(1, 224, 224, 3))
    train_step = program.train_step().lower(program.abstract_state, batch).compile()
    state, metrics = train_step(program.new_state(), batch)
"""

import dataclasses
from typing import Any, Callable, Optional

import flax.linen as nn
import jax

from lvm_jax.models import registry
from lvm_jax.parallel import mesh as mesh_lib
from lvm_jax.parallel import partitioning
from lvm_jax.train import optimizer as optimizer_lib
from lvm_jax.train import state as state_lib
from lvm_jax.train import steps
from lvm_jax.train.task import Task


@dataclasses.dataclass(kw_only=True)
class TrainProgram:
  task: Task
  model: nn.Module
  tx: Any  # the optax.GradientTransformation
  schedule: Callable  # optimizer update -> learning rate
  step_config: steps.StepConfig
  mesh: jax.sharding.Mesh
  strategy: partitioning.Strategy
  input_shape: tuple[int, ...]  # (1, H, W, 3): one example
  # The state as ShapeDtypeStructs with their shardings: where to create it, and the target to restore onto.
  abstract_state: state_lib.TrainState
  pretrained_variables: Optional[dict] = None  # initial variables when fine-tuning, else None (fresh init)
  seed: int = 0

  @classmethod
  def create(
    cls,
    *,
    task: Task,
    model: nn.Module,
    optimizer: dict,
    mesh: jax.sharding.Mesh,
    strategy: partitioning.Strategy,
    input_shape: tuple[int, ...],
    normalize: Optional[tuple] = None,
    pretrained_variables: Optional[dict] = None,
    seed: int = 0,
    **fields,
  ) -> "TrainProgram":
    """Builds the optimizer and the sharded state layout; nothing is allocated or compiled.

    Args:
      task: what the steps compute (loss, train metrics, eval values).
      model: the network, as task.build_model gives it.
      optimizer: an optimizer block (see lvm_jax.train.optimizer.read_config); its schedule needs total_steps.
      mesh, strategy: where the state and batches live, and the logical sharding rules.
      input_shape: (1, H, W, 3), one example as the model sees it.
      normalize: (mean, std) to normalize uint8 images with on the device; None when the pp normalized.
      pretrained_variables: variables to start from instead of the model's init.
      seed: the init and dropout key of a new state.
      **fields: the fields of a subclass (setup.Run).
    """
    block = optimizer_lib.read_config(optimizer)
    params = (
      registry.abstract_variables(model)["params"] if pretrained_variables is None else pretrained_variables["params"]
    )
    tx, schedule = optimizer_lib.make_optimizer(block, params, model)
    step_config = steps.StepConfig(
      normalize=normalize,
      ema_decay=block["ema_decay"],
      accumulate_steps=block["accumulate_steps"],
      frozen=tuple(block["frozen"] or ()),
    )
    abstract = state_lib.sharded_abstract_state(
      model, tx, input_shape, mesh, strategy, use_ema=step_config.ema_decay is not None
    )
    return cls(
      task=task,
      model=model,
      tx=tx,
      schedule=schedule,
      step_config=step_config,
      mesh=mesh,
      strategy=strategy,
      input_shape=tuple(input_shape),
      abstract_state=abstract,
      pretrained_variables=pretrained_variables,
      seed=seed,
      **fields,
    )

  @property
  def use_ema(self) -> bool:
    return self.step_config.ema_decay is not None

  @property
  def state_shardings(self) -> state_lib.TrainState:
    return jax.tree.map(lambda a: a.sharding, self.abstract_state)

  @property
  def batch_sharding(self) -> jax.sharding.NamedSharding:
    return mesh_lib.batch_sharding(self.mesh)

  def new_state(self) -> state_lib.TrainState:
    """A fresh state in its shards: the model's init from `seed`, or the pretrained variables."""
    return state_lib.create(
      self.model,
      self.tx,
      jax.random.key(self.seed),
      self.input_shape,
      self.state_shardings,
      use_ema=self.use_ema,
      variables=self.pretrained_variables,
    )

  def train_step(self) -> Callable:
    """(state, batch) -> (state, metrics), jitted under the sharding rules with the state donated."""
    step = steps.make_train_step(self.task, self.model, self.tx, self.schedule, self.step_config)
    return jax.jit(
      partitioning.with_sharding_rules(step, self.mesh, self.strategy),
      in_shardings=(self.state_shardings, self.batch_sharding),
      out_shardings=(self.state_shardings, None),
      donate_argnums=(0,),
    )

  def eval_step(self) -> Callable:
    """(variables, batch) -> the task's eval values; variables and batch arrive sharded, the values replicated."""
    step = steps.make_eval_step(self.task, self.model, self.step_config)
    return jax.jit(partitioning.with_sharding_rules(step, self.mesh, self.strategy))
