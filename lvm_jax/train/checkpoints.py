"""Checkpoints of a whole training state: an Orbax CheckpointManager with retention, atomic async saves and
restores onto any mesh.

One step directory holds two items: "state" (the pytree a resume needs: params, batch_stats, optimizer state,
EMA, step, rng key data, data position) and "meta" (small JSON). What Orbax already does, and we rely on:
  - atomic writes: a step is written under "<step>.orbax-checkpoint-tmp" and renamed when finalized; listings
    ignore the temporary names, so a save killed midway is never found, and the next manager deletes it;
  - async saves: save() returns once the arrays are staged; the write and the rename finish on a thread;
  - retention: LatestN(keep) OR BestN(1) by the metric, decided when a save starts, applied when it finalizes;
  - multi-process: every process calls save/restore; each writes its own shards, process 0 the JSON.
"""

import math
from typing import Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers as policies

_STATE, _META = "state", "meta"
_MODES = ("max", "min")


class Checkpoints:
  """Orbax CheckpointManager over `directory` (e.g. WORKDIR/checkpoints).

  keep: the newest `keep` checkpoints are kept; with `best_metric`, also the single best one by that eval
  metric ("max" or "min" by `best_mode`) among saves that carried metrics. async_save: save() returns before
  the write finishes (wait() or the next save() blocks until it is finalized).
  """

  def __init__(self, directory: str, *, keep: int = 3, best_metric: Optional[str] = None,
               best_mode: str = "max", async_save: bool = True):
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
      raise ValueError(f"keep must be an int >= 1 (the newest checkpoints to keep), got {keep!r}.")
    if best_mode not in _MODES:
      raise ValueError(f"best_mode must be one of {_MODES}, got {best_mode!r}.")
    self.directory = str(directory)
    self.best_metric = best_metric
    self.best_mode = best_mode
    keep_policies = [policies.LatestN(n=keep)]
    if best_metric is not None:
      # keep_checkpoints_without_metrics=False: saves without metrics are LatestN's business only.
      keep_policies.append(policies.BestN(get_metric_fn=self._score, reverse=best_mode == "min", n=1,
                                          keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policies.AnyPreservationPolicy(keep_policies),
        best_fn=self._score if best_metric is not None else None,  # makes Orbax write the metrics file
        best_mode=best_mode,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,  # leftovers of a killed save must not block saving that step again
        create=True)
    # Handlers named up front: a fresh manager (a resumed run) can then read the saved layout before restoring.
    registry = ocp.handlers.create_default_handler_registry(
        **{_STATE: ocp.StandardCheckpointHandler(), _META: ocp.JsonCheckpointHandler()})
    self._manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=registry)
    self._in_flight: Optional[int] = None  # the step an async save may still be writing
    self._scores: dict[int, float] = {}
    if best_metric is not None:
      for step in self._manager.all_steps():
        metrics = self._manager.metrics(step)
        if metrics is not None:
          self._scores[step] = self._score(metrics)

  # -- what is on disk -------------------------------------------------------------------------------------

  def all_steps(self) -> list[int]:
    """Steps of the finalized checkpoints, ascending (a save still being written is not listed)."""
    steps = sorted(self._manager.all_steps())
    if self._in_flight is not None and self._manager.is_saving_in_progress():
      steps = [s for s in steps if s != self._in_flight]
    return steps

  def latest_step(self) -> Optional[int]:
    """The newest finalized checkpoint's step, None if there is none."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def best_step(self) -> Optional[int]:
    """The finalized checkpoint with the best `best_metric` (ties: the newest); None without metrics."""
    sign = 1.0 if self.best_mode == "max" else -1.0
    scored = [(sign * self._scores[s], s) for s in self.all_steps()
              if s in self._scores and math.isfinite(self._scores[s])]
    return max(scored)[1] if scored else None  # BestN's stable sort also keeps the newest of equal scores

  # -- save / restore ---------------------------------------------------------------------------------------

  def save(self, step: int, state, *, metrics: Optional[dict] = None, meta: Optional[dict] = None) -> None:
    """Starts saving `state` (any pytree of jax.Arrays, numpy arrays, Python scalars) as `step`.

    Every process must call it. metrics: this step's eval metrics (floats); with `best_metric` set they must
    contain it (without best_metric they are not used). meta: small JSON returned by restore_meta. A step that
    already exists is left as it is.
    """
    step = int(step)
    if step in self._manager.all_steps():
      return
    _check_no_typed_keys(state)
    scores = None
    if self.best_metric is not None and metrics is not None:
      if self.best_metric not in metrics:
        raise ValueError(f"Checkpoint metrics {sorted(metrics)} lack best_metric={self.best_metric!r}, which "
                         "decides the best checkpoint to keep; pass it or change best_metric.")
      scores = _json_floats(metrics)
    # force: Orbax's own interval policy would skip steps; the trainer decides when to save.
    self._manager.save(step, force=True, metrics=scores, args=ocp.args.Composite(**{
        _STATE: ocp.args.StandardSave(state), _META: ocp.args.JsonSave(dict(meta or {}))}))
    self._in_flight = step
    if scores is not None:
      self._scores[step] = self._score(scores)
    if jax.process_index() == 0:
      logging.info("Checkpoint of step %d started in %s.", step, self.directory)

  def restore(self, target, step: Optional[int] = None):
    """The state saved at `step` (None: the latest), laid out like `target`.

    target: a pytree like the saved state whose leaves are jax.ShapeDtypeStruct with a sharding, or concrete
    arrays (their sharding is used); numpy arrays / Python scalars restore as such. The result has exactly the
    target's shardings (and dtypes), whatever mesh or device count the checkpoint was saved with.
    """
    step = self._existing_step(step)
    abstract = jax.tree.map(_abstract_leaf, target)
    saved = self._manager.item_metadata(step)[_STATE]
    _check_same_layout(saved.tree if hasattr(saved, "tree") else saved, abstract, step, self.directory)
    restored = self._manager.restore(step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(abstract)}))
    if jax.process_index() == 0:
      logging.info("Restored the checkpoint of step %d from %s.", step, self.directory)
    return restored[_STATE]

  def restore_arrays(self, step: Optional[int] = None):
    """The state saved at `step` (None: the latest) without a target: numpy arrays on the host, in the saved
    structure as Orbax stores it (named tuples and dataclasses become dicts, tuples lists). For tools that
    only read a checkpoint (export, inference), on any number of devices."""
    step = self._existing_step(step)
    saved = self._manager.item_metadata(step)[_STATE]
    # np.zeros is calloc'ed: the full-size targets only tell Orbax the type, their pages are never touched.
    target = jax.tree.map(_host_leaf, saved.tree if hasattr(saved, "tree") else saved, is_leaf=_is_metadata)
    restored = self._manager.restore(step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(target)}))
    return restored[_STATE]

  def restore_meta(self, step: Optional[int] = None) -> dict:
    """The `meta` dict saved with `step` (None: the latest)."""
    step = self._existing_step(step)
    return dict(self._manager.restore(step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))[_META])

  def wait(self) -> None:
    """Blocks until pending async saves are finalized; raises if one failed."""
    self._manager.wait_until_finished()
    self._manager.check_for_errors()
    self._in_flight = None

  def close(self) -> None:
    """Finishes pending saves and releases Orbax's threads."""
    self._manager.close()
    self._in_flight = None

  def __enter__(self) -> "Checkpoints":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # -- helpers ----------------------------------------------------------------------------------------------

  def _score(self, metrics) -> float:
    """The metric Orbax's BestN sorts by (it handles best_mode); NaN (a diverged eval) ranks worst."""
    value = float(metrics[self.best_metric])
    if math.isnan(value):
      return -math.inf if self.best_mode == "max" else math.inf
    return value

  def _existing_step(self, step: Optional[int]) -> int:
    self.wait()  # a save still being written cannot be read yet
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f"No checkpoint in {self.directory}.")
    if step is None:
      return steps[-1]
    if int(step) not in steps:
      raise FileNotFoundError(f"No checkpoint of step {step} in {self.directory}; it has steps {steps}.")
    return int(step)


def _json_floats(metrics: dict) -> dict:
  out = {}
  for key, value in metrics.items():
    try:
      out[str(key)] = float(value)
    except (TypeError, ValueError):
      raise ValueError(f"Checkpoint metric {key!r}={value!r} is not a number.") from None
  return out


def _check_no_typed_keys(state) -> None:
  """Typed PRNG keys are saved as their data and cannot be restored as keys; ask for the data up front."""
  for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
    if hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      raise ValueError(f"State entry {jax.tree_util.keystr(path)} is a typed PRNG key; save "
                       "jax.random.key_data(key) (uint32) and rebuild it with jax.random.wrap_key_data.")


def _abstract_leaf(x):
  """What Orbax restores a target leaf as: arrays keep their sharding, numpy and Python values their type."""
  if isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  return x


def _host_leaf(metadata):
  """A target that makes Orbax restore a saved leaf as a numpy array (a Python scalar if it was saved so)."""
  dtype = np.dtype(metadata.dtype)
  if isinstance(metadata, ocp.metadata.ScalarMetadata):
    return dtype.type(0).item()
  return np.zeros(metadata.shape, dtype)


def _key_name(entry) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _shapes_by_path(tree, is_leaf=None) -> dict[str, tuple]:
  """{"opt_state/0/mu/params/kernel": shape}: tuples, named tuples and dicts addressed alike, as Orbax stores
  them (a named tuple's fields become dict keys, a tuple's items list indices)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  return {"/".join(_key_name(e) for e in path): tuple(x.shape) if hasattr(x, "shape") else np.shape(x)
          for path, x in flat}


def _is_metadata(x) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype")


def _check_same_layout(saved, target, step: int, directory: str) -> None:
  """Raises a ValueError naming the first keys / shapes that differ between the checkpoint and the target."""
  have, want = _shapes_by_path(saved, is_leaf=_is_metadata), _shapes_by_path(target)
  missing = [k for k in want if k not in have]
  extra = [k for k in have if k not in want]
  problems = []
  if missing:
    problems.append(f"the target has {len(missing)} entries the checkpoint lacks, first {missing[:3]}")
  if extra:
    problems.append(f"the checkpoint has {len(extra)} entries the target lacks, first {extra[:3]}")
  differ = [k for k in want if k in have and have[k] != want[k]]
  if differ:
    problems.append(f"{len(differ)} shapes differ, first " +
                    ", ".join(f"{k}: checkpoint {have[k]} vs target {want[k]}" for k in differ[:3]))
  if problems:
    raise ValueError(f"The checkpoint of step {step} in {directory} does not match the state to restore "
                     f"(did the model, optimizer or config change?): {'; '.join(problems)}.")
