"""Task-level code built on the backbones: what each task adds on the one trainer (lvm_jax.train.task.Task),
and the inference APIs (classify)."""

from lvm_jax.tasks.classification import Classification
from lvm_jax.tasks.detection.task import Detection

# config.task -> its Task class. A new task adds its line here.
TASKS = {cls.name: cls for cls in (Classification, Detection)}


def get_task(name: str) -> type:
  """The Task class named by config.task."""
  if name not in TASKS:
    raise ValueError(f"task={name!r} is not one of {sorted(TASKS)}.")
  return TASKS[name]


def task_of_workdir(workdir: str) -> type:
  """The Task class of the run in `workdir`, from its saved config (a run from before config.task, or a folder
  without one, is classification's, whose loader says what is missing)."""
  from lvm_jax.train import reporting

  try:
    config = reporting.load_config(workdir)
  except FileNotFoundError:
    return Classification
  return get_task(config.get("task", Classification.name))
