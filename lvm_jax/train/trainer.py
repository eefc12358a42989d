"""The training loop: resume or start, train with periodic logs, evals and checkpoints, stop cleanly on SIGTERM.

    final_metrics = train_and_evaluate(config, workdir)
    metrics = evaluate(config, workdir)            # the latest checkpoint in workdir

The steps are jitted once with the state's shardings (donated) and the batch sharding. The host only waits for
the devices at log, eval and checkpoint time, so input and compute overlap in between.
"""

import os
from typing import Optional

import jax

from lvm_jax.data import device_batches, host_memory
from lvm_jax.parallel import partitioning
from lvm_jax.tf_host import tf
from lvm_jax.train import checkpoints as checkpoints_lib
from lvm_jax.train import preemption, reporting, setup, steps, throughput
from lvm_jax.train import workdir_checkpoint


TRAIN_METRICS = ("loss", "lr", "top1", "grad_norm")  # the console's order


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or Inf; the run stopped without saving the broken state."""


def _jit_train_step(run: setup.Run):
  step = steps.make_train_step(run.model, run.tx, run.schedule, run.step_config)
  return steps.jit_train_step(step, run.mesh, run.strategy, run.state_shardings, run.batch_sharding)


def _jit_eval_step(run: setup.Run):
  step = partitioning.with_sharding_rules(steps.make_eval_step(run.model, run.step_config), run.mesh,
                                          run.strategy)
  return jax.jit(step)  # variables and batch arrive already sharded; the sums come back replicated


def _evaluate(run: setup.Run, eval_step, state) -> dict[str, dict]:
  """{"eval": metrics} (+ {"eval_ema": ...} with EMA) over the whole eval split."""
  variable_sets = {"eval": state.variables}
  if run.use_ema:
    variable_sets["eval_ema"] = state.ema_variables
  sums = {name: [] for name in variable_sets}
  for batch in device_batches.global_batches(run.eval_dataset().as_numpy_iterator(), run.batch_sharding):
    for name, variables in variable_sets.items():
      sums[name].append(eval_step(variables, batch))
  return {name: steps.summarize_eval(jax.device_get(s)) for name, s in sums.items()}


def _check_finite(state, checkpoints: checkpoints_lib.Checkpoints) -> None:
  bad = int(state.nonfinite_step)
  if bad >= 0:
    checkpoints.wait()  # saves still being written are of earlier, finite steps: let them finish
    last = checkpoints.latest_step()
    kept = f"the last good checkpoint is step {last}" if last is not None else "no checkpoint was saved yet"
    raise NonFiniteLossError(f"The training loss became NaN or Inf at step {bad + 1}; stopping without saving "
                             f"({kept}). Lower the learning rate, add warmup or clipping (optimizer.clip_norm).")


def _checkpoints(run: setup.Run, workdir: str) -> checkpoints_lib.Checkpoints:
  return checkpoints_lib.Checkpoints(os.path.join(workdir, workdir_checkpoint.CHECKPOINT_DIR),
                                     keep=run.config.keep_checkpoints, best_metric=run.config.best_metric,
                                     best_mode="max", async_save=run.config.async_checkpoints)


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains `config` in `workdir` (resuming from its latest checkpoint) and returns the last eval metrics."""
  run = setup.build(config)
  tf.io.gfile.makedirs(workdir)  # a local path or a gs:// bucket
  with _checkpoints(run, workdir) as checkpoints:  # on any exit, pending saves finish and Orbax's threads stop
    start = checkpoints.latest_step() or 0
    if start >= run.num_steps:
      if jax.process_index() == 0:
        print(f"{workdir} already holds the final checkpoint (step {start} of {run.num_steps}): nothing to train. "
              "Evaluate it with --mode=eval, or raise num_steps / num_epochs to train on.")
      return {}
    state = checkpoints.restore(run.abstract_state) if start else run.new_state()
    if jax.process_index() == 0:
      reporting.save_config(workdir, run.config)
      run.train_source.save_class_names(os.path.join(workdir, workdir_checkpoint.CLASS_NAMES_FILE))
      workdir_checkpoint.save_model_description(workdir, run.model, run.step_config.normalize)
    return _train(run, workdir, checkpoints, state, start)


def _train(run: setup.Run, workdir: str, checkpoints: checkpoints_lib.Checkpoints, state, start: int) -> dict:
  config = run.config
  host_memory.keep_large_buffers()  # batch-sized host buffers are reused, not zero-filled afresh each step
  batches = device_batches.global_batches(run.train_dataset(start).as_numpy_iterator(), run.batch_sharding,
                                          prefetch=config.data.prefetch)
  first = next(batches)
  # Compiled ahead once (and only once): the same executable runs every step and tells its FLOPs for the MFU.
  train_step = _jit_train_step(run).lower(state, first).compile()
  eval_step = _jit_eval_step(run)
  flops_per_step = throughput.compiled_flops(train_step)
  peak = throughput.total_peak_flops(config.dtype, run.mesh.devices.flatten())
  pending = [first]
  clock = throughput.Throughput(total_steps=run.num_steps, global_batch_size=config.data.batch_size,
                                start_step=start)
  eval_metrics: dict = {}
  with reporting.MetricLogger(workdir, total_steps=run.num_steps,
                              progress_bar=None if config.progress_bar else False) as logger, \
       preemption.PreemptionWatch(sync_every=config.log_every_steps) as watch:
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
        logger.write(step, "train", {**{k: values[k] for k in TRAIN_METRICS}, **rates, "mfu": mfu})
        _check_finite(state, checkpoints)  # after the line: the log shows which metric blew up

      evaluated = None
      if run.eval_source is not None and (last or (config.eval_every_steps and
                                                   step % config.eval_every_steps == 0)):
        with clock.paused():
          _check_finite(state, checkpoints)
          eval_metrics = _evaluate(run, eval_step, state)
          for split, values in eval_metrics.items():
            logger.write(step, split, values)
        evaluated = {**eval_metrics["eval"],
                     **{f"ema_{k}": v for k, v in eval_metrics.get("eval_ema", {}).items()}}

      if step % config.checkpoint_every_steps == 0 or last or stopping or evaluated:
        with clock.paused():
          _check_finite(state, checkpoints)
          checkpoints.save(step, state, metrics=evaluated,
                           meta={"examples_seen": step * config.data.batch_size, "num_steps": run.num_steps})
      if stopping:
        logger.write(step, "train", {"preempted": 1.0})
        break
  checkpoints.wait()
  return eval_metrics


def evaluate(config, workdir: str, step: Optional[int] = None) -> dict:
  """Evaluates the latest (or the given) checkpoint in `workdir` on config.data.eval; logs split "eval"."""
  run = setup.build(config)
  if run.eval_source is None:
    raise ValueError("config.data.eval is None: there is nothing to evaluate on.")
  with _checkpoints(run, workdir) as checkpoints:
    step = checkpoints.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {checkpoints.directory} to evaluate.")
    state = checkpoints.restore(run.abstract_state, step=step)
  metrics = _evaluate(run, _jit_eval_step(run), state)
  with reporting.MetricLogger(workdir, total_steps=run.num_steps, progress_bar=False) as logger:
    for split, values in metrics.items():
      logger.write(step, split, values)
  return metrics
