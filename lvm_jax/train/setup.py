"""A run's pieces built from its config: mesh, sources, the task and its model (fresh or pretrained), optimizer,
shardings.

Everything here is checked before anything is compiled: config keys and types, mesh against the device count,
batch sizes against the data-parallel devices, source and pp errors, optimizer settings.
"""

import dataclasses
import math
from typing import Optional

import ml_collections

from lvm_jax import tasks
from lvm_jax.data import ops as data_ops
from lvm_jax.data import pipeline, pp, sources
from lvm_jax.parallel import mesh as mesh_lib
from lvm_jax.parallel import partitioning
from lvm_jax.train import config as config_lib
from lvm_jax.train import optimizer as optimizer_lib
from lvm_jax.train import program as program_lib

_NORMALIZING_OPS = ("normalize", "value_range")


@dataclasses.dataclass(kw_only=True)
class Run(program_lib.TrainProgram):
  """A TrainProgram with the data it trains and evaluates on."""

  config: ml_collections.ConfigDict
  train_source: sources.Source
  eval_source: Optional[sources.Source]
  num_steps: int

  @property
  def best_mode(self) -> str:
    """ "max" or "min": which way config.best_metric is better (checked against the task's eval metrics)."""
    return _best_mode(self.task, self.config.best_metric, self.use_ema)

  @property
  def eval_batch_size(self) -> int:
    return _eval_batch_size(self.config)

  def train_dataset(self, start_step: int):
    return _train_dataset(self.config, self.train_source, start_step)

  def eval_dataset(self):
    return _eval_dataset(self.config, self.eval_source)


def _best_mode(task, best_metric: Optional[str], use_ema: bool) -> str:
  if best_metric is None:
    return "max"
  name = best_metric.removeprefix("ema_")
  if name != best_metric and not use_ema:
    raise ValueError(
      f"best_metric={best_metric!r} ranks checkpoints by the EMA parameters' {name}, but optimizer.ema_decay is "
      f"not set: set it, or use best_metric={name!r}."
    )
  if name not in task.eval_metrics:
    raise ValueError(
      f"best_metric={best_metric!r} is not an eval metric of task {task.name!r}: one of "
      f"{sorted(task.eval_metrics)} (or ema_<name> for the EMA parameters), or None."
    )
  return task.eval_metrics[name]


def _eval_batch_size(config) -> int:
  return config.data.eval_batch_size or config.data.batch_size


def _train_dataset(config, source: sources.Source, start_step: int):
  shard = pipeline.Shard.current()
  num_shards = config.data.num_shards or shard.count
  return pipeline.train_dataset(
    source,
    config.data.pp_train,
    global_batch_size=config.data.batch_size,
    seed=config.seed,
    start=start_step * (config.data.batch_size // num_shards),
    shard=shard,
    num_shards=num_shards,
    shuffle_buffer=config.data.shuffle_buffer,
    prefetch=config.data.prefetch,
  )


def _eval_dataset(config, source: sources.Source):
  return pipeline.eval_dataset(
    source, config.data.pp_eval, global_batch_size=_eval_batch_size(config), prefetch=config.data.prefetch
  )


def _make_source(block, where: str) -> sources.Source:
  args = dict(block)
  kind = args.pop("kind", None)
  if kind is None:
    raise ValueError(f"{where} needs a 'kind' (e.g. 'tfds', 'folder', 'digits', 'coco_folder', 'digits_detection').")
  try:
    return sources.make_source(kind, **args)
  except TypeError as e:
    raise ValueError(f"{where}: {e}") from None


def _pp_normalizes(spec) -> bool:
  return any(getattr(op, "pp_name", None) in _NORMALIZING_OPS for op in pp.parse(spec))


def _normalization(config, pretrained_mean_std) -> Optional[tuple]:
  if _pp_normalizes(config.data.pp_train) != _pp_normalizes(config.data.pp_eval):
    raise ValueError(
      "data.pp_train and data.pp_eval must both normalize (normalize/value_range op) or both "
      "leave it to the device (data.normalize)."
    )
  if _pp_normalizes(config.data.pp_train):
    return None
  if config.data.normalize is None:
    return pretrained_mean_std
  if config.data.normalize not in data_ops.NORMALIZATIONS:
    raise ValueError(
      f"data.normalize={config.data.normalize!r} is not one of {sorted(data_ops.NORMALIZATIONS)} "
      "or None (the pretrained checkpoint's own mean/std)."
    )
  return data_ops.NORMALIZATIONS[config.data.normalize]


def _num_steps(config, train_source) -> int:
  if config.num_steps:
    return int(config.num_steps)
  return max(1, math.ceil(config.num_epochs * train_source.num_examples / config.data.batch_size))


def _optimizer_config(config, num_steps: int) -> dict:
  """The optimizer block with the schedule's total_steps filled in from the run length (in optimizer updates)."""
  block = optimizer_lib.read_config(config.optimizer)
  if block["schedule"]["total_steps"] is None:
    block["schedule"]["total_steps"] = max(1, num_steps // block["accumulate_steps"])
  return block


def build(config) -> Run:
  """Everything a train or eval run needs, checked, nothing compiled. `config` is validated here."""
  config = config_lib.validate(config)
  mesh = mesh_lib.create_mesh(dict(config.mesh))
  strategy = partitioning.get_strategy(config.sharding)
  partitioning.check_strategy(strategy, mesh)
  mesh_lib.check_batch_size(config.data.batch_size, mesh)
  if config.data.eval_batch_size:
    mesh_lib.check_batch_size(config.data.eval_batch_size, mesh)

  train_source = _make_source(config.data.train, "data.train")
  eval_source = _make_source(config.data.eval, "data.eval") if config.data.eval else None
  task = tasks.get_task(config.task).from_config(config, train_source, eval_source)
  num_steps = _num_steps(config, train_source)
  optimizer = _optimizer_config(config, num_steps)
  _best_mode(task, config.best_metric, use_ema=optimizer["ema_decay"] is not None)
  model_init = task.build_model(config)
  normalize = _normalization(config, model_init.mean_std)

  # The pipeline's own element shape says what the model sees (built here, not iterated); this also checks
  # the pp and that the batch splits over the processes and data shards.
  element = _train_dataset(config, train_source, 0).element_spec
  image_shape = tuple(element["image"].shape[1:])
  if None in image_shape:
    raise ValueError(
      f"data.pp_train={config.data.pp_train!r} gives images of unknown size {image_shape}; end it "
      "with a fixed-size crop or resize."
    )
  if eval_source is not None:
    eval_shape = tuple(_eval_dataset(config, eval_source).element_spec["image"].shape[1:])
    if (
      len(eval_shape) != 3
      or eval_shape[-1] != 3
      or (hasattr(model_init.model, "image_size") and eval_shape != image_shape)
    ):
      raise ValueError(
        f"data.pp_eval={config.data.pp_eval!r} gives images of shape {eval_shape}, but the model "
        f"trains on {image_shape}: start the eval pp with decode and end it at the training size."
      )
  task.check_data(element, "data.pp_train")

  return Run.create(
    task=task,
    model=model_init.model,
    optimizer=optimizer,
    mesh=mesh,
    strategy=strategy,
    input_shape=(1,) + image_shape,
    normalize=normalize,
    pretrained_variables=model_init.variables,
    seed=config.seed,
    config=config,
    train_source=train_source,
    eval_source=eval_source,
    num_steps=num_steps,
  )
