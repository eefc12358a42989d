"""Checkpoints of a whole training state: an Orbax CheckpointManager with retention, atomic async saves and
restores onto any mesh.

One step directory holds two items: "state" (the pytree a resume needs: params, batch_stats, optimizer state,
EMA, step, rng key data, data position) and "meta" (small JSON: the caller's meta and the step's eval
metrics), plus an integrity record (integrity.py) written before the step is renamed into place and checked
before any restore. What Orbax already does, and we rely on:
  - atomic writes: a step is written under "<step>.orbax-checkpoint-tmp" and renamed when finalized; listings
    ignore the temporary names, so a save killed midway is never found, and the next manager deletes it;
  - async saves: save() returns once the arrays are staged; the write and the rename finish on a thread;
  - retention: LatestN(keep) OR the best by the metric, decided when a save starts, applied when it finalizes;
  - multi-process: every process calls save/restore; each writes its own shards, process 0 the JSON.
What we add: the integrity record; the choice of the newest intact step (process 0 verifies, every process
restores the step it chose); bad steps of a resumed run moved aside; the best-by-metric retention from our own
metrics (Orbax's `best_fn` would warn at every save without metrics).
"""

import math
import os
import time
from typing import Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from lvm_jax.errors import UserError
from lvm_jax.train import integrity
from lvm_jax.train.integrity import CorruptCheckpointError

_STATE, _META = "state", "meta"
_MODES = ("max", "min")
QUARANTINE_SUFFIX = "-quarantine"  # WORKDIR/checkpoints-quarantine/<step>-<time>: bad steps moved aside


class CheckpointSaveError(UserError, RuntimeError):
  """Writing a checkpoint failed; the run stops rather than train on with nothing it could resume from."""


def absolute(path: str) -> str:
  """`path` made absolute once, where it enters (Orbax rejects relative paths, and the working directory of a
  resumed run may differ); URLs such as gs://bucket/run are left as they are."""
  path = os.fspath(path)
  return path if "://" in path else os.path.abspath(os.path.expanduser(path))


class _BestByMetric:
  """Orbax preservation policy: keeps the one step with the best score among those that have one."""

  def __init__(self, checkpoints: "CheckpointManager"):
    self._checkpoints = checkpoints

  def should_preserve(self, infos, *, context):
    del context
    best = self._checkpoints.best_step([info.step for info in infos])
    return [info.step == best for info in infos]


def _state_handler() -> ocp.StandardCheckpointHandler:
  """Orbax's standard handler (its files and args unchanged). In a single process on CPU devices, which share one
  host's memory, each replicated array is written whole from one replica: Orbax otherwise has every replica write a
  slice of it, which compiles a slicing program per array shape and device and writes no faster there. Several
  processes keep Orbax's default: each host writes its part."""
  handler = ocp.StandardCheckpointHandler()
  if jax.default_backend() == "cpu" and jax.process_count() == 1:
    array_handler = ocp.type_handlers.get_type_handler(jax.Array)
    one_replica = ocp.type_handlers.ArrayHandler(
      use_replica_parallel=False, array_metadata_store=array_handler._array_metadata_store
    )
    types = ocp.type_handlers.supported_types()
    handlers = [(t, one_replica if t is jax.Array else ocp.type_handlers.get_type_handler(t)) for t in types]
    # StandardCheckpointHandler takes no registry of its own: its PyTree handler is given one (orbax is pinned).
    handler._impl = ocp.PyTreeCheckpointHandler(
      type_handler_registry=ocp.type_handlers.create_type_handler_registry(*handlers)
    )
  return handler


class CheckpointManager:
  """Orbax CheckpointManager over `directory` (e.g. WORKDIR/checkpoints).

  keep: the newest `keep` checkpoints are kept; with `best_metric`, also the single best one by that eval
  metric ("max" or "min" by `best_mode`) among saves that carried metrics. async_save: save() returns before
  the write finishes (wait() or the next save() blocks until it is finalized). read_only: for readers (eval,
  predict): nothing is created, saved or cleaned up, so a training run may be writing the same directory.
  """

  def __init__(
    self,
    directory: str,
    *,
    keep: int = 3,
    best_metric: Optional[str] = None,
    best_mode: str = "max",
    async_save: bool = True,
    read_only: bool = False,
  ):
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
      raise ValueError(f"keep must be an int >= 1 (the newest checkpoints to keep), got {keep!r}.")
    if best_mode not in _MODES:
      raise ValueError(f"best_mode must be one of {_MODES}, got {best_mode!r}.")
    self.directory = absolute(directory)
    self.best_metric = best_metric
    self.best_mode = best_mode
    self.read_only = read_only
    self._async = async_save
    keep_policies = [policies.LatestN(n=keep)]
    if best_metric is not None:
      keep_policies.append(_BestByMetric(self))  # saves without metrics are LatestN's business only
    options = ocp.CheckpointManagerOptions(
      preservation_policy=policies.AnyPreservationPolicy(keep_policies),
      # Always Orbax's async checkpointer: only it runs the hook that seals a step before its rename; a
      # synchronous save is an async one waited for.
      enable_async_checkpointing=True,
      async_options=ocp.options.AsyncOptions(post_finalization_callback=self._seal),
      # Leftovers of a killed save must not block saving that step again; a reader leaves them (they may be
      # a live run's save in progress). Orbax's own read_only option only adds warnings to this.
      cleanup_tmp_directories=not read_only,
      create=not read_only,
    )
    # Handlers named up front: a fresh manager (a resumed run) can then read the saved layout before restoring.
    registry = ocp.handlers.create_default_handler_registry(
      **{_STATE: _state_handler(), _META: ocp.JsonCheckpointHandler()}
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=registry)
    self._in_flight: Optional[int] = None  # the step an async save may still be writing
    self._verified: set[int] = set()
    self._scores: dict[int, float] = {}
    if best_metric is not None:
      for step in self._manager.all_steps():
        metrics = self._saved_meta(step).get("metrics")
        if metrics and best_metric in metrics:
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

  def best_step(self, steps: Optional[list[int]] = None) -> Optional[int]:
    """The finalized checkpoint (or of `steps`) with the best `best_metric` (ties: the newest; NaN ranks
    worst); None without metrics."""
    steps = self.all_steps() if steps is None else steps
    scored = [(self._scores[s], s) for s in steps if math.isfinite(self._scores.get(s, math.nan))]
    return max(scored)[1] if scored else None

  # -- save / restore ---------------------------------------------------------------------------------------

  def save(self, step: int, state, *, metrics: Optional[dict] = None, meta: Optional[dict] = None) -> None:
    """Starts saving `state` (any pytree of jax.Arrays, numpy arrays, Python scalars) as `step`.

    Every process must call it. metrics: this step's eval metrics (floats); with `best_metric` set they must
    contain it (without best_metric they are not used). meta: small JSON returned by restore_meta. A step that
    already exists is left as it is.
    """
    step = int(step)
    if self.read_only:
      raise ValueError(f"{self.directory} was opened read-only: it cannot save step {step}.")
    self.wait()  # the previous save is sealed first (the hook seals the step in flight); raises if it failed
    if step in self._manager.all_steps():
      return
    _check_no_typed_keys(state)
    scores = None
    if self.best_metric is not None and metrics is not None:
      if self.best_metric not in metrics:
        raise ValueError(
          f"Checkpoint metrics {sorted(metrics)} lack best_metric={self.best_metric!r}, which "
          "decides the best checkpoint to keep; pass it or change best_metric."
        )
      scores = _json_floats(metrics)
      self._scores[step] = self._score(scores)  # before the save: retention runs when it finalizes
    self._in_flight = step
    try:
      # force: Orbax's own interval policy would skip steps; the trainer decides when to save.
      self._manager.save(
        step,
        force=True,
        args=ocp.args.Composite(
          **{
            _STATE: ocp.args.StandardSave(state),
            _META: ocp.args.JsonSave({"meta": dict(meta or {}), "metrics": scores}),
          }
        ),
      )
    except Exception as e:
      raise CheckpointSaveError(
        f"Saving the checkpoint of step {step} in {self.directory} failed: {type(e).__name__}: {e}"
      ) from e
    if jax.process_index() == 0:
      logging.info("Checkpoint of step %d started in %s.", step, self.directory)
    if not self._async:
      self.wait()

  def restore(self, target, step: Optional[int] = None):
    """The state saved at `step` (None: the latest), laid out like `target`.

    target: a pytree like the saved state whose leaves are jax.ShapeDtypeStruct with a sharding, or concrete
    arrays (their sharding is used); numpy arrays / Python scalars restore as such. The result has exactly the
    target's shardings (and dtypes), whatever mesh or device count the checkpoint was saved with.
    """
    step = self.intact_step(step)
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
    step = self.intact_step(step)
    saved = self._manager.item_metadata(step)[_STATE]
    # np.zeros is calloc'ed: the full-size targets only tell Orbax the type, their pages are never touched.
    target = jax.tree.map(_host_leaf, saved.tree if hasattr(saved, "tree") else saved, is_leaf=_is_metadata)
    restored = self._manager.restore(step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(target)}))
    return restored[_STATE]

  def restore_meta(self, step: Optional[int] = None) -> dict:
    """The `meta` dict saved with `step` (None: the latest intact step)."""
    return dict(self._saved_meta(self.intact_step(step), strict=True).get("meta") or {})

  def wait(self) -> None:
    """Blocks until pending async saves are finalized; raises CheckpointSaveError if one failed."""
    step = self._in_flight  # read by the sealing hook until the save is done
    try:
      self._manager.wait_until_finished()
      self._manager.check_for_errors()
    except Exception as e:
      raise CheckpointSaveError(
        f"Saving the checkpoint of step {step} in {self.directory} failed: {type(e).__name__}: {e}"
      ) from e
    finally:
      self._in_flight = None

  def check(self) -> None:
    """Raises CheckpointSaveError if a background save has failed (without waiting for one in progress)."""
    if not self._manager.is_saving_in_progress():
      self.wait()

  # -- integrity ----------------------------------------------------------------------------------------------

  def step_path(self, step: int) -> str:
    return os.path.join(self.directory, str(int(step)))

  def verify(self, step: int) -> None:
    """Raises CorruptCheckpointError if the finalized `step` differs from its integrity record (each step is
    read once per manager: a resume verifies, then restores the same step)."""
    if int(step) not in self._verified:
      integrity.verify(self.step_path(step), int(step))
      self._verified.add(int(step))

  def intact_step(self, step: Optional[int] = None, *, quarantine: bool = False) -> int:
    """`step` after verifying it, or (None) the newest step that verifies, with a warning for each newer one
    skipped. quarantine: move skipped steps to `<directory>-quarantine/` so that a resumed run can save
    those step numbers again. Every process gets process 0's answer. Raises FileNotFoundError without a
    checkpoint, CorruptCheckpointError when `step` (or every step) is bad."""
    self.wait()  # a save still being written cannot be read yet
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f"No checkpoint in {self.directory}.")
    if step is not None and int(step) not in steps:
      raise FileNotFoundError(f"No checkpoint of step {step} in {self.directory}; it has steps {steps}.")
    error, chosen = None, -1
    if jax.process_index() == 0:
      for candidate in [int(step)] if step is not None else reversed(steps):
        try:
          self.verify(candidate)
          chosen = candidate
          break
        except CorruptCheckpointError as e:
          error = e
          if step is None:
            moved = self._quarantine(candidate) if quarantine and not self.read_only else None
            logging.warning(
              "Skipped checkpoint step %d (%s): %s%s.", e.step, e.path, e.reason, f"; moved to {moved}" if moved else ""
            )
    chosen = _from_process_0(chosen)
    if quarantine:
      self._manager.reload()  # process 0 may have moved steps away
    if chosen < 0:
      if error is not None and step is not None:
        raise error
      raise CorruptCheckpointError(
        steps[-1] if step is None else int(step),
        self.directory,
        f"none of the {len(steps)} checkpoint(s) {steps} verifies"
        + (f"; the newest problem: {error.reason}" if error else ""),
      )
    return chosen

  def _quarantine(self, step: int) -> str:
    target = f"{self.directory.rstrip('/')}{QUARANTINE_SUFFIX}/{step}-{int(time.time())}"
    epath.Path(target).parent.mkdir(parents=True, exist_ok=True)
    epath.Path(self.step_path(step)).rename(target)
    self._scores.pop(step, None)
    return target

  def _seal(self) -> None:
    """Orbax's post-finalization hook (process 0, after every process wrote its files, before the rename)."""
    step = self._in_flight
    folder = epath.Path(self.directory)
    pending = sorted(folder.glob(f"{step}.orbax-checkpoint-tmp*"))
    # Object stores are not renamed into place: there the step is written under its final name.
    integrity.write_record(pending[-1] if pending else folder / str(step))

  def close(self) -> None:
    """Finishes pending saves and releases Orbax's threads."""
    self._manager.close()
    self._in_flight = None

  def __enter__(self) -> "CheckpointManager":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # -- helpers ----------------------------------------------------------------------------------------------

  def _score(self, metrics) -> float:
    """Higher is better whatever best_mode is; NaN (a diverged eval) ranks worst."""
    value = float(metrics[self.best_metric])
    if math.isnan(value):
      return -math.inf
    return value if self.best_mode == "max" else -value

  def _saved_meta(self, step: int, strict: bool = False) -> dict:
    """The meta item of `step` ({"meta": ..., "metrics": ...}); {} if it cannot be read and not strict."""
    try:
      saved = self._manager.restore(step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))[_META]
    except Exception:  # a damaged step: verification says what is wrong with it when it is restored
      if strict:
        raise
      return {}
    return dict(saved) if isinstance(saved, dict) else {}


def _from_process_0(value: int) -> int:
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils

  return int(multihost_utils.broadcast_one_to_all(np.int64(value)))


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
      raise ValueError(
        f"State entry {jax.tree_util.keystr(path)} is a typed PRNG key; save "
        "jax.random.key_data(key) (uint32) and rebuild it with jax.random.wrap_key_data."
      )


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
  return {
    "/".join(_key_name(e) for e in path): tuple(x.shape) if hasattr(x, "shape") else np.shape(x) for path, x in flat
  }


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
    problems.append(
      f"{len(differ)} shapes differ, first "
      + ", ".join(f"{k}: checkpoint {have[k]} vs target {want[k]}" for k in differ[:3])
    )
  if problems:
    raise ValueError(
      f"The checkpoint of step {step} in {directory} does not match the state to restore "
      f"(did the model, optimizer or config change?): {'; '.join(problems)}."
    )
