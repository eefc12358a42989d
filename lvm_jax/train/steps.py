"""The pure train and eval steps: (state, batch) -> (state, metrics) and (variables, batch) -> eval values.

Nothing here knows about meshes, files, the data source or the task's loss: the task (lvm_jax.train.task) gives
the loss and eval values, the trainer jits these with shardings. A batch is {"image": [B, H, W, 3] uint8 (or
float 0..255 after mixup/cutmix; or already-normalized float when the pp normalizes), and what the task reads
(e.g. "label")}, plus "mask" [B] (1 real, 0 padding) for eval.
"""

import dataclasses
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from lvm_jax.data import device_batches
from lvm_jax.train import optimizer as optimizer_lib
from lvm_jax.train.state import TrainState
from lvm_jax.train.task import Task


@dataclasses.dataclass(frozen=True)
class StepConfig:
  # Per-channel (mean, std) in 0..1 units to normalize on the device, or None when the pp already did.
  normalize: Optional[tuple[Sequence[float], Sequence[float]]] = None
  ema_decay: Optional[float] = None
  accumulate_steps: int = 1
  # optimizer.frozen's regexes: those parameters' gradients are zeros from the start, so XLA never computes them
  # (nor the backward pass below the last trained layer), and grad_norm is the trained parameters' alone.
  frozen: tuple[str, ...] = ()


def _inputs(batch: dict, config: StepConfig) -> jax.Array:
  images = batch["image"]
  if config.normalize is not None:
    return device_batches.normalize(images, *config.normalize)
  return images.astype(jnp.float32)


def make_train_step(
  task: Task, model: nn.Module, tx: optax.GradientTransformation, schedule: Callable, config: StepConfig
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """One step on one (micro-)batch: the task's loss, gradients, optimizer update, BatchNorm statistics, EMA,
  metrics ({"loss", *task.train_metrics, "grad_norm", "lr"})."""
  k = config.accumulate_steps

  def train_step(state: TrainState, batch: dict):
    images = _inputs(batch, config)
    # A fresh key a step, derived from the saved key and the step, so a resumed run draws the same dropout.
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def loss_fn(params):
      variables = {"params": params}
      mutable = []
      if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
        mutable = ["batch_stats"]
      outputs, updates = model.apply(variables, images, train=True, mutable=mutable, rngs={"dropout": key})
      loss, metrics = task.loss(outputs, batch)
      return loss, (metrics, updates)

    (loss, (task_metrics, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    if config.frozen:
      mask = optimizer_lib.frozen_mask(grads, config.frozen)
      grads = jax.tree.map(lambda g, frozen: jnp.zeros_like(g) if frozen else g, grads, mask)
    param_updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, param_updates)

    ema = state.ema_params
    if config.ema_decay is not None:
      # With accumulation the parameters only move on every k-th micro-batch: average those, not repeats.
      new_ema = optimizer_lib.ema_update(ema, params, config.ema_decay)
      moved = (state.step % k) == (k - 1)
      ema = jax.tree.map(lambda n, o: jnp.where(moved, n, o), new_ema, ema)

    finite = jnp.isfinite(loss)
    nonfinite_step = jnp.where((state.nonfinite_step < 0) & ~finite, state.step, state.nonfinite_step)
    new_state = state.replace(
      step=state.step + 1,
      params=params,
      opt_state=opt_state,
      ema_params=ema,
      batch_stats=updates.get("batch_stats", state.batch_stats),
      nonfinite_step=nonfinite_step,
    )
    metrics = {
      "loss": loss,
      **task_metrics,
      "grad_norm": optax.tree.norm(grads),
      "lr": schedule(state.step // k),
    }
    return new_state, metrics

  return train_step


def make_eval_step(task: Task, model: nn.Module, config: StepConfig) -> Callable[[dict, dict], dict]:
  """(variables, batch) -> the task's eval_batch values for the batch."""

  def eval_step(variables: dict, batch: dict) -> dict:
    return task.eval_batch(model.apply(variables, _inputs(batch, config), train=False), batch)

  return eval_step
