"""A run's pieces built from its config: mesh, sources, model (fresh or pretrained), optimizer, shardings.

Everything here is checked before anything is compiled: config keys and types, mesh against the device count,
batch sizes against the data-parallel devices, source and pp errors, optimizer settings.
"""

import dataclasses
import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from lvm_jax.data import ops as data_ops
from lvm_jax.data import pipeline, pp, sources
from lvm_jax.models import registry
from lvm_jax.parallel import mesh as mesh_lib
from lvm_jax.parallel import partitioning
from lvm_jax.train import config as config_lib
from lvm_jax.train import optimizer as optimizer_lib
from lvm_jax.train import state as state_lib
from lvm_jax.train import steps
from lvm_jax.weights import pretrained as pretrained_lib

_NORMALIZING_OPS = ("normalize", "value_range")


@dataclasses.dataclass
class Run:
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  strategy: partitioning.Strategy
  train_source: sources.Source
  eval_source: Optional[sources.Source]
  class_names: list[str]
  model: nn.Module
  pretrained_variables: Optional[dict]   # initial variables when fine-tuning, else None (fresh init)
  tx: Any
  schedule: Callable
  num_steps: int
  batch_sharding: jax.sharding.NamedSharding
  # Filled in by build() once the pipeline says what the model sees:
  step_config: Optional[steps.StepConfig]
  input_shape: Optional[tuple[int, ...]]    # (1, H, W, 3): one example
  # The state as ShapeDtypeStructs with their shardings: where to create it, and the target to restore onto.
  abstract_state: Optional[state_lib.TrainState]

  @property
  def use_ema(self) -> bool:
    return self.step_config.ema_decay is not None

  @property
  def eval_batch_size(self) -> int:
    return self.config.data.eval_batch_size or self.config.data.batch_size

  @property
  def state_shardings(self) -> state_lib.TrainState:
    return jax.tree.map(lambda a: a.sharding, self.abstract_state)

  def new_state(self) -> state_lib.TrainState:
    return state_lib.create(self.model, self.tx, jax.random.key(self.config.seed), self.input_shape,
                            self.state_shardings, use_ema=self.use_ema, variables=self.pretrained_variables)

  def train_dataset(self, start_step: int):
    shard = pipeline.Shard.current()
    num_shards = self.config.data.num_shards or shard.count
    return pipeline.train_dataset(
        self.train_source, self.config.data.pp_train, global_batch_size=self.config.data.batch_size,
        seed=self.config.seed, start=start_step * (self.config.data.batch_size // num_shards), shard=shard,
        num_shards=num_shards, shuffle_buffer=self.config.data.shuffle_buffer, prefetch=self.config.data.prefetch)

  def eval_dataset(self):
    return pipeline.eval_dataset(self.eval_source, self.config.data.pp_eval,
                                 global_batch_size=self.eval_batch_size, prefetch=self.config.data.prefetch)


def _make_source(block, where: str) -> sources.Source:
  args = dict(block)
  kind = args.pop("kind", None)
  if kind is None:
    raise ValueError(f"{where} needs a 'kind' (one of 'tfds', 'folder', 'digits').")
  try:
    return sources.make_source(kind, **args)
  except TypeError as e:
    raise ValueError(f"{where}: {e}") from None


def _pp_normalizes(spec) -> bool:
  return any(getattr(op, "pp_name", None) in _NORMALIZING_OPS for op in pp.parse(spec))


def _normalization(config, pretrained_mean_std) -> Optional[tuple]:
  if _pp_normalizes(config.data.pp_train) != _pp_normalizes(config.data.pp_eval):
    raise ValueError("data.pp_train and data.pp_eval must both normalise (normalize/value_range op) or both "
                     "leave it to the device (data.normalize).")
  if _pp_normalizes(config.data.pp_train):
    return None
  if config.data.normalize is None:
    return pretrained_mean_std
  if config.data.normalize not in data_ops.NORMALIZATIONS:
    raise ValueError(f"data.normalize={config.data.normalize!r} is not one of {sorted(data_ops.NORMALIZATIONS)} "
                     "or None (the pretrained checkpoint's own mean/std).")
  return data_ops.NORMALIZATIONS[config.data.normalize]


def _model(config, num_classes: int):
  """(model, pretrained variables or None, the checkpoint's (mean, std) or None)."""
  dtype = jnp.dtype(config.dtype)
  overrides = dict(config.model_args)
  for key in ("num_classes", "dtype"):
    if key in overrides:
      raise ValueError(f"model_args.{key}: set the top-level config.{key} instead.")
  if config.pretrained is None:
    if config.image_size is not None:
      overrides["image_size"] = config.image_size
    return registry.create_model(config.model, num_classes=num_classes, dtype=dtype, **overrides), None, None
  checkpoint = pretrained_lib.load_checkpoint(config.pretrained, dtype=dtype, **overrides)
  model, variables = pretrained_lib.retarget(checkpoint.model, checkpoint.variables, num_classes=num_classes,
                                             image_size=config.image_size, seed=config.seed)
  mean_std = None
  if checkpoint.preprocessing is not None:
    mean_std = (checkpoint.preprocessing.mean, checkpoint.preprocessing.std)
  elif config.data.normalize is None:
    raise ValueError(f"pretrained={config.pretrained!r}: its preprocessing cannot be read "
                     f"({checkpoint.preprocessing_error}); set data.normalize to a preset.")
  return model, variables, mean_std


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
  if eval_source is not None and eval_source.class_names != train_source.class_names:
    raise ValueError(f"data.eval has classes {eval_source.class_names[:5]}... but data.train has "
                     f"{train_source.class_names[:5]}...: they must be the same, in the same order.")
  num_classes = config.num_classes or train_source.num_classes

  model, variables, mean_std = _model(config, num_classes)
  normalize = _normalization(config, mean_std)
  num_steps = _num_steps(config, train_source)
  opt_config = _optimizer_config(config, num_steps)
  params_shape = registry.abstract_variables(model)["params"] if variables is None else variables["params"]
  tx, schedule = optimizer_lib.make_optimizer(opt_config, params_shape)

  run = Run(config=config, mesh=mesh, strategy=strategy, train_source=train_source, eval_source=eval_source,
            class_names=list(train_source.class_names), model=model, pretrained_variables=variables, tx=tx,
            schedule=schedule, step_config=None, input_shape=None, num_steps=num_steps, abstract_state=None,
            batch_sharding=mesh_lib.batch_sharding(mesh))
  # The pipeline's own element shape says what the model sees (built here, not iterated); this also checks
  # the pp and that the batch splits over the processes and data shards.
  element = run.train_dataset(0).element_spec
  image_shape = tuple(element["image"].shape[1:])
  if None in image_shape:
    raise ValueError(f"data.pp_train={config.data.pp_train!r} gives images of unknown size {image_shape}; end it "
                     "with a fixed-size crop or resize.")
  input_shape = (1,) + image_shape
  if eval_source is not None:
    eval_shape = tuple(run.eval_dataset().element_spec["image"].shape[1:])
    if len(eval_shape) != 3 or eval_shape[-1] != 3 or (hasattr(model, "image_size") and eval_shape != image_shape):
      raise ValueError(f"data.pp_eval={config.data.pp_eval!r} gives images of shape {eval_shape}, but the model "
                       f"trains on {image_shape}: start the eval pp with decode and end it at the training size.")
  label_shape = tuple(element["label"].shape[1:])
  if label_shape not in ((), (num_classes,)):
    raise ValueError(f"data.pp_train gives labels of shape {label_shape}; the model has {num_classes} classes.")

  run.input_shape = input_shape
  run.step_config = steps.StepConfig(num_classes=num_classes, label_smoothing=config.label_smoothing,
                                     normalize=normalize, ema_decay=opt_config["ema_decay"],
                                     accumulate_steps=opt_config["accumulate_steps"])
  run.abstract_state = state_lib.sharded_abstract_state(model, tx, input_shape, mesh, strategy, use_ema=run.use_ema)
  return run
