"""The training loop: resume or start, train with periodic logs, evals and checkpoints, stop cleanly on SIGTERM.

    final_metrics = train_and_evaluate(config, workdir)
    metrics = evaluate(config, workdir)            # the newest intact checkpoint in workdir (or step=N)

The steps are jitted once with the state's shardings (donated) and the batch sharding. The host only waits for
the devices at log, eval and checkpoint time, so input and compute overlap in between.
"""

import io
import os
from typing import Optional

import jax
from absl import logging

from lvm_jax.data import device_batches, host_memory
from lvm_jax.tf_host import tf
from lvm_jax.train import checkpoints as checkpoints_lib
from lvm_jax.train import preemption, reporting, setup, throughput
from lvm_jax.train import workdir_checkpoint
from lvm_jax.train.workdir_lock import WorkdirLock


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or Inf; the run stopped without saving the broken state."""


def _train_metric_names(run: setup.Run) -> tuple[str, ...]:
  return ("loss", "lr", *run.task.train_metrics, "grad_norm")  # the console's order


def _evaluate(run: setup.Run, eval_step, state) -> dict[str, dict]:
  """{"eval": metrics} (+ {"eval_ema": ...} with EMA) over the whole eval split."""
  variable_sets = {"eval": state.variables}
  if run.use_ema:
    variable_sets["eval_ema"] = state.ema_variables
  sums = {name: [] for name in variable_sets}
  for batch in device_batches.global_batches(run.eval_dataset().as_numpy_iterator(), run.batch_sharding):
    for name, variables in variable_sets.items():
      sums[name].append(eval_step(variables, batch))
  return {name: run.task.summarize_eval(jax.device_get(s)) for name, s in sums.items()}


def _check_finite(state, checkpoints: checkpoints_lib.CheckpointManager) -> None:
  bad = int(state.nonfinite_step)
  if bad >= 0:
    checkpoints.wait()  # saves still being written are of earlier, finite steps: let them finish
    last = checkpoints.latest_step()
    kept = f"the last good checkpoint is step {last}" if last is not None else "no checkpoint was saved yet"
    raise NonFiniteLossError(
      f"The training loss became NaN or Inf at step {bad + 1}; stopping without saving "
      f"({kept}). Lower the learning rate, add warmup or clipping (optimizer.clip_norm)."
    )


def _checkpoints(run: setup.Run, workdir: str, read_only: bool = False) -> checkpoints_lib.CheckpointManager:
  return checkpoints_lib.CheckpointManager(
    os.path.join(workdir, workdir_checkpoint.CHECKPOINT_DIR),
    keep=run.config.keep_checkpoints,
    best_metric=run.config.best_metric,
    best_mode=run.best_mode,
    async_save=run.config.async_checkpoints,
    read_only=read_only,
  )


def _resume_step(checkpoints: checkpoints_lib.CheckpointManager) -> int:
  """The newest intact checkpoint's step (bad newer ones moved aside with a warning), 0 if there is none."""
  try:
    return checkpoints.intact_step(quarantine=True)
  except FileNotFoundError:
    return 0
  except checkpoints_lib.CorruptCheckpointError as e:
    logging.warning("No intact checkpoint to resume from (%s): training starts again from step 0.", e.reason)
    return 0


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains `config` in `workdir`, resuming from its newest intact checkpoint.

  Args:
    config: a run config (lvm_jax.train.config.defaults() with a recipe's settings); validated here.
    workdir: a local path or gs:// URL for checkpoints, logs, the config and what predict needs. One run at a time.

  Returns:
    The last eval metrics, {"eval": {...}} plus {"eval_ema": {...}} with EMA; {} when there was nothing to train
    or no eval split.
  """
  workdir = checkpoints_lib.absolute(workdir)
  run = setup.build(config)
  tf.io.gfile.makedirs(workdir)  # a local path or a gs:// bucket
  # The lock comes first: opening the checkpoints cleans up unfinished saves, which may be another run's.
  with WorkdirLock(workdir), _checkpoints(run, workdir) as checkpoints:  # on exit, pending saves finish
    start = _resume_step(checkpoints)
    if start >= run.num_steps:
      if jax.process_index() == 0:
        print(
          f"{workdir} already holds the final checkpoint (step {start} of {run.num_steps}): nothing to train. "
          "Evaluate it with --mode=eval, or raise num_steps / num_epochs to train on."
        )
      return {}
    state = checkpoints.restore(run.abstract_state, step=start) if start else run.new_state()
    if jax.process_index() == 0:
      if start:
        print(f"resumed from step {start} of {run.num_steps} ({workdir})", flush=True)
      reporting.save_config(workdir, run.config)
      run.task.save_run_files(workdir, run.model, run.step_config.normalize)
    return _train(run, workdir, checkpoints, state, start)


def _train(run: setup.Run, workdir: str, checkpoints: checkpoints_lib.CheckpointManager, state, start: int) -> dict:
  config = run.config
  host_memory.keep_large_buffers()  # batch-sized host buffers are reused, not zero-filled afresh each step
  batches = device_batches.global_batches(
    run.train_dataset(start).as_numpy_iterator(), run.batch_sharding, prefetch=config.data.prefetch
  )
  first = next(batches)
  # Compiled ahead once (and only once): the same executable runs every step and tells its FLOPs for the MFU.
  train_step = run.train_step().lower(state, first).compile()
  eval_step = run.eval_step()
  flops_per_step = throughput.compiled_flops(train_step)
  peak = throughput.total_peak_flops(config.dtype, run.mesh.devices.flatten())
  pending = [first]
  clock = throughput.Throughput(total_steps=run.num_steps, global_batch_size=config.data.batch_size, start_step=start)
  eval_metrics: dict = {}
  first_save = True
  with (
    reporting.MetricLogger(
      workdir, total_steps=run.num_steps, progress_bar=None if config.progress_bar else False
    ) as logger,
    preemption.PreemptionWatch(sync_every=config.log_every_steps) as watch,
  ):
    for step in range(start + 1, run.num_steps + 1):
      batch = pending.pop() if pending else next(batches)
      state, metrics = train_step(state, batch)
      logger.progress(step)
      last = step == run.num_steps
      stopping = watch.should_stop(step)

      if step % config.log_every_steps == 0 or last or stopping:
        rates = clock.update(step)
        mfu = throughput.mfu(flops_per_step, rates.get("steps_per_sec"), peak)
        values = jax.device_get(metrics)
        logger.write(step, "train", {**{k: values[k] for k in _train_metric_names(run)}, **rates, "mfu": mfu})
        _check_finite(state, checkpoints)  # after the line: the log shows which metric blew up
        checkpoints.check()  # a failed background save stops the run now, not hours later

      evaluated = None
      if run.eval_source is not None and (last or (config.eval_every_steps and step % config.eval_every_steps == 0)):
        with clock.paused():
          _check_finite(state, checkpoints)
          eval_metrics = _evaluate(run, eval_step, state)
          for split, values in eval_metrics.items():
            logger.write(step, split, values)
        evaluated = {**eval_metrics["eval"], **{f"ema_{k}": v for k, v in eval_metrics.get("eval_ema", {}).items()}}

      if step % config.checkpoint_every_steps == 0 or last or stopping or evaluated:
        with clock.paused():
          _check_finite(state, checkpoints)
          checkpoints.save(
            step,
            state,
            metrics=evaluated,
            meta={"examples_seen": step * config.data.batch_size, "num_steps": run.num_steps},
          )
          if first_save:  # a workdir that cannot take a checkpoint fails within seconds of the first save
            checkpoints.wait()
            first_save = False
      if stopping:
        logger.write(step, "train", {"preempted": 1.0})
        break
  checkpoints.wait()
  return eval_metrics


def evaluate(config, workdir: str, step: Optional[int] = None) -> dict:
  """Evaluates the newest intact (or the given) checkpoint in `workdir` on config.data.eval.

  Args:
    config: the run's config (its model, task and data.eval).
    workdir: the run's workdir.
    step: the checkpoint step to evaluate; None: the newest intact one.

  Returns:
    {"eval": metrics} (plus "eval_ema" when the run kept an EMA), the task's eval metrics.

  The metrics are printed first; then they are logged (split "eval") to metrics.jsonl and TensorBoard, where a
  workdir that cannot be written (read-only, a copy) only gives a warning. The workdir is only read otherwise,
  so a run may still be training in it.
  """
  workdir = checkpoints_lib.absolute(workdir)
  run = setup.build(config)
  if run.eval_source is None:
    raise ValueError("config.data.eval is None: there is nothing to evaluate on.")
  with _checkpoints(run, workdir, read_only=True) as checkpoints:
    step = checkpoints.intact_step(step)
    state = checkpoints.restore(run.abstract_state, step=step)
  metrics = _evaluate(run, run.eval_step(), state)
  if jax.process_index() == 0:
    for split, values in metrics.items():
      print(reporting.format_line(step, run.num_steps, split, values), flush=True)
  try:
    with reporting.MetricLogger(
      workdir, total_steps=run.num_steps, progress_bar=False, stream=io.StringIO()
    ) as logger:  # the console lines are printed above
      for split, values in metrics.items():
        logger.write(step, split, values)
  except (OSError, tf.errors.OpError) as e:
    logging.warning("The eval metrics were not logged in %s: %s", workdir, str(e).splitlines()[0])
  return metrics
