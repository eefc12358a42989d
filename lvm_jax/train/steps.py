"""The pure train and eval steps: (state, batch) -> (state, metrics) and (variables, batch) -> metric sums.

Nothing here knows about meshes, files or the data source; the trainer jits these with shardings. A batch is
{"image": [B, H, W, 3] uint8 (or float 0..255 after mixup/cutmix; or already-normalised float when the pp
normalises), "label": [B] int class ids or [B, C] soft labels}, plus "mask" [B] (1 real, 0 padding) for eval.
"""

import dataclasses
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from lvm_jax.data import device_batches
from lvm_jax.parallel import partitioning
from lvm_jax.train import optimizer as optimizer_lib
from lvm_jax.train.state import TrainState


@dataclasses.dataclass(frozen=True)
class StepConfig:
  num_classes: int
  label_smoothing: float = 0.0
  # Per-channel (mean, std) in 0..1 units to normalise on the device, or None when the pp already did.
  normalize: Optional[tuple[Sequence[float], Sequence[float]]] = None
  ema_decay: Optional[float] = None
  accumulate_steps: int = 1


def targets(labels: jax.Array, num_classes: int, smoothing: float = 0.0) -> jax.Array:
  """Soft targets [B, C]: int labels one-hot with label smoothing; [B, C] labels as given."""
  if labels.ndim == 2:
    return labels.astype(jnp.float32)
  hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  return hot * (1.0 - smoothing) + smoothing / num_classes


def cross_entropy(logits: jax.Array, soft_targets: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy in float32 (bf16 logits would lose the small probabilities)."""
  return -jnp.sum(soft_targets * jax.nn.log_softmax(logits.astype(jnp.float32)), axis=-1)


def _inputs(batch: dict, config: StepConfig) -> jax.Array:
  images = batch["image"]
  if config.normalize is not None:
    return device_batches.normalize(images, *config.normalize)
  return images.astype(jnp.float32)


def _class_ids(labels: jax.Array) -> jax.Array:
  return labels if labels.ndim == 1 else jnp.argmax(labels, axis=-1)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, schedule: Callable,
                    config: StepConfig) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """One step on one (micro-)batch: loss, gradients, optimizer update, BatchNorm statistics, EMA, metrics."""
  k = config.accumulate_steps

  def train_step(state: TrainState, batch: dict):
    images = _inputs(batch, config)
    soft = targets(batch["label"], config.num_classes, config.label_smoothing)
    # A fresh key a step, derived from the saved key and the step, so a resumed run draws the same dropout.
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def loss_fn(params):
      variables = {"params": params}
      mutable = []
      if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
        mutable = ["batch_stats"]
      logits, updates = model.apply(variables, images, train=True, mutable=mutable, rngs={"dropout": key})
      loss = jnp.mean(cross_entropy(logits, soft))
      return loss, (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
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
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema,
                              batch_stats=updates.get("batch_stats", state.batch_stats),
                              nonfinite_step=nonfinite_step)
    metrics = {
        "loss": loss,
        "top1": jnp.mean(jnp.argmax(logits, -1) == _class_ids(batch["label"])),
        "grad_norm": optax.tree.norm(grads),
        "lr": schedule(state.step // k),
    }
    return new_state, metrics

  return train_step


def jit_train_step(step: Callable, mesh, strategy, state_shardings, batch_sharding):
  """A train step jitted as the trainer runs it: under `strategy`'s logical sharding rules, the state kept in its
  shardings and donated (updated in place), the batch sharded over the data axes."""
  return jax.jit(partitioning.with_sharding_rules(step, mesh, strategy), in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, None), donate_argnums=(0,))


def make_eval_step(model: nn.Module, config: StepConfig) -> Callable[[dict, dict], dict]:
  """Sums over the real (mask 1) examples of a batch: count, correct top-1 / top-5, loss."""

  def eval_step(variables: dict, batch: dict) -> dict:
    logits = model.apply(variables, _inputs(batch, config), train=False).astype(jnp.float32)
    labels = _class_ids(batch["label"])
    mask = batch["mask"].astype(jnp.float32)
    loss = cross_entropy(logits, targets(labels, config.num_classes))
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    return {
        "count": jnp.sum(mask),
        "top1": jnp.sum(mask * (jnp.argmax(logits, -1) == labels)),
        "top5": jnp.sum(mask * jnp.any(top5 == labels[:, None], axis=-1)),
        "loss": jnp.sum(jnp.where(mask > 0, loss, 0.0)),  # a padded example never turns the sum into NaN
    }

  return eval_step


def summarize_eval(sums: Sequence[dict]) -> dict:
  """Metric sums of all eval batches -> means over the real examples (top1, top5, loss)."""
  total = {name: sum(float(s[name]) for s in sums) for name in sums[0]}
  count = total.pop("count")
  if count == 0:
    raise ValueError("The eval split has no examples (every batch was padding).")
  return {name: value / count for name, value in total.items()}
