"""The task interface: what a task (classification, detection, segmentation, ...) adds on the one trainer.

The trainer owns everything that is the same for every task: the mesh and sharding, the TrainState, the optimizer,
gradient accumulation, EMA, Orbax checkpoints, resume, preemption and reporting. A task owns the rest:

  - `from_config`: the task built from the run's config and its data sources (class names, heads, loss settings);
  - `build_model`: the network (a registered model, or a pretrained checkpoint adapted to the task);
  - `check_data`: that the pipeline's batches carry what the loss reads (raises ValueError naming the pp);
  - `loss`: model outputs + batch -> (mean loss, train metrics), inside the jitted train step;
  - `eval_batch` + `summarize_eval`: per-batch device values (sums, or predictions to score on the host) and the
    host-side reduction into the eval metrics (top-1, COCO AP, mIoU, ...);
  - `save_run_files`: what a trained workdir needs besides the checkpoints to predict (e.g. class names);
  - `predict`: what `main.py --mode=predict --workdir=DIR --image=FILE` prints (or draws) for a trained run.

A new task is a module under lvm_jax/tasks/ with a Task subclass, named in lvm_jax/tasks/__init__.py TASKS, plus
recipes under configs/ that set `config.task`.
"""

import abc
import dataclasses
from typing import Any, ClassVar, Optional, Sequence

import flax.linen as nn
import jax


@dataclasses.dataclass(frozen=True)
class ModelInit:
  """The network a run trains, and where its parameters start."""

  model: nn.Module
  variables: Optional[dict] = None  # pretrained variables to start from; None: the model's own init
  mean_std: Optional[tuple] = None  # the pretrained checkpoint's input (mean, std) in 0..1 units, if known


class Task(abc.ABC):
  """One training task. Instances are immutable settings (captured by the jitted steps), not state."""

  name: ClassVar[str]
  # The metrics `loss` returns besides the loss, in the order the console shows them (after loss and lr).
  train_metrics: ClassVar[tuple[str, ...]] = ()
  # The metrics summarize_eval returns, each with which way is better ("max" or "min"); config.best_metric names
  # one of them (or "ema_<name>", the same metric of the EMA parameters) to keep the best checkpoint by.
  eval_metrics: ClassVar[dict[str, str]] = {}

  @classmethod
  @abc.abstractmethod
  def from_config(cls, config, train_source, eval_source) -> "Task":
    """The task for a validated run config and its sources (eval_source may be None)."""

  @abc.abstractmethod
  def build_model(self, config) -> ModelInit:
    """The model the config asks for, shaped for this task."""

  def check_data(self, element_spec: dict, pp_name: str) -> None:
    """Raises ValueError when a batch of `element_spec` (a tf.data element spec) lacks what `loss` reads."""

  @abc.abstractmethod
  def loss(self, outputs: Any, batch: dict) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(mean loss over the batch, {name: scalar} for every name in train_metrics), from the model's outputs."""

  @abc.abstractmethod
  def eval_batch(self, outputs: Any, batch: dict) -> dict[str, jax.Array]:
    """Per-batch eval values; batch["mask"] is 1 for real examples and 0 for the padding of the last batch."""

  @abc.abstractmethod
  def summarize_eval(self, per_batch: Sequence[dict]) -> dict[str, float]:
    """The eval metrics from the host copies of every eval_batch result of the split."""

  def save_run_files(self, workdir: str, model: nn.Module, normalize: Optional[tuple]) -> None:
    """Writes what predicting from the trained workdir needs besides the checkpoint (called on process 0): e.g.
    class names, and how to rebuild `model` (the network trained) with its input `normalize` ((mean, std) the
    steps normalize uint8 images with, or None)."""

  @classmethod
  @abc.abstractmethod
  def predict(
    cls,
    workdir: str,
    image: str,
    *,
    step: Optional[int] = None,
    top_k: int = 5,
    as_json: bool = False,
    output: Optional[str] = None,
    min_score: Optional[float] = None,
  ) -> str:
    """The text `main.py --mode=predict` prints for `image` with the run in `workdir` (at `step`, or its newest
    intact checkpoint); `output`: a file to draw the prediction into, and `min_score`: the least score of what is
    shown, for tasks that draw and score (else an error)."""
