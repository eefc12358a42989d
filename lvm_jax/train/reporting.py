"""What a user sees while training: console lines, a progress bar, TensorBoard, WORKDIR/metrics.jsonl, the config.

Every log event goes to three places with the same values: one line of WORKDIR/metrics.jsonl, TensorBoard
scalars "<split>/<name>" under WORKDIR/tensorboard/, and one console line. Only process 0 writes (the metrics
are global, so the other hosts would write copies).

metrics.jsonl: one JSON object a line, {"step": int, "split": str, "time": unix seconds, name: value, ...}.
Values are floats; NaN and +-Inf, which strict JSON has no numbers for, are written as the strings "NaN",
"Infinity" and "-Infinity" (`float()` of each gives the value back; `read_metrics` does it), so a diverging run
still says which metric blew up and how. A resumed run appends: after a restore, steps logged between the
checkpoint and the interruption appear again, and the later line is the one of the run that continued.
"""

import json
import math
import os
import shutil
import sys
import time
from collections.abc import Mapping

import jax
import ml_collections
import numpy as np

from lvm_jax.tf_host import tf

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
TENSORBOARD_DIR = "tensorboard"
_RESERVED = ("step", "split", "time")
# Throughput keys go last on the console line, in this order, whatever order the trainer built the dict in.
_SPEED_KEYS = ("steps_per_sec", "img_per_sec", "mfu", "eta_seconds")
_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def format_duration(seconds: float) -> str:
  """45s, 3m10s, 2h05m, 1d03h: two units, the first one unpadded."""
  if not math.isfinite(seconds):
    return "?"
  s = max(int(round(seconds)), 0)
  if s < 60:
    return f"{s}s"
  if s < 3600:
    return f"{s // 60}m{s % 60:02d}s"
  if s < 86400:
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
  return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _format_value(name: str, value: float) -> str:
  if name == "lr":
    return f"lr {value:.2e}"
  if name == "img_per_sec":
    return f"{value:,.0f} img/s"
  if name == "steps_per_sec":
    return f"{value:.2f} steps/s"
  if name == "mfu":
    return f"MFU {100 * value:.1f}%"
  if name == "eta_seconds":
    return f"ETA {format_duration(value)}"
  if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3):
    return f"{name} {value:.3e}"
  return f"{name} {value:.4f}"


def format_line(step: int, total_steps: int, split: str, metrics: Mapping[str, float]) -> str:
  """One console line, e.g. `[train] step 120/1000  loss 0.5321  lr 1.20e-03  1,950 img/s  MFU 12.3%  ETA 3m10s`."""
  names = [n for n in metrics if n not in _SPEED_KEYS] + [n for n in _SPEED_KEYS if n in metrics]
  fields = [f"[{split}]".ljust(7), f"step {step}/{total_steps}"] + [_format_value(n, metrics[n]) for n in names]
  return " ".join(fields[:2]) + "".join("  " + f for f in fields[2:])


def _as_float(name, value) -> float:
  try:
    array = np.asarray(value)  # numpy and jax scalars, 0-d and one-element arrays
    if array.size != 1 or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
      raise TypeError
    return float(array.reshape(()))
  except (TypeError, ValueError):
    raise TypeError(f"Metric {name!r} must be a number (a scalar), got {type(value).__name__}: {value!r}") from None


def _json_number(value: float):
  if math.isnan(value):
    return "NaN"
  if math.isinf(value):
    return "Infinity" if value > 0 else "-Infinity"
  return value


def read_metrics(workdir: str, split: str | None = None) -> list[dict]:
  """The lines of WORKDIR/metrics.jsonl (of one split if given), with "NaN"/"Infinity" turned back into floats."""
  with tf.io.gfile.GFile(os.path.join(workdir, METRICS_FILE)) as f:
    events = [json.loads(line) for line in f if line.strip()]
  for event in events:
    for name, value in event.items():
      if name != "split" and value in _NON_FINITE:
        event[name] = _NON_FINITE[value]
  return [e for e in events if split is None or e["split"] == split]


class ProgressBar:
  """One line rewritten with "\\r": `  120/1000  12% [###.......]  1,950 img/s  ETA 3m10s`.

  Speed and ETA come from the last train log (measured after a device sync); between logs the ETA is scaled by
  the steps left. Redraws at most every `min_interval` seconds so calling it every step costs next to nothing.
  """

  def __init__(self, total_steps: int, stream, *, width: int = 30, min_interval: float = 0.1, clock=time.monotonic):
    self.total_steps, self.stream, self.width = total_steps, stream, width
    self.min_interval, self._clock = min_interval, clock
    self._step = None
    self._drawn = ""  # what is on the terminal line now
    self._last_draw = -math.inf
    self._speed = None  # (img_per_sec, seconds per step) from the last train log

  def set_speed(self, step: int, img_per_sec: float | None, eta_seconds: float | None) -> None:
    seconds_per_step = None
    if eta_seconds is not None and step < self.total_steps:
      seconds_per_step = eta_seconds / (self.total_steps - step)
    self._speed = (img_per_sec, seconds_per_step)

  def update(self, step: int) -> None:
    self._step = step
    now = self._clock()
    if now - self._last_draw >= self.min_interval or step >= self.total_steps:
      self._last_draw = now
      self.redraw()

  def render(self) -> str:
    step, total = self._step, self.total_steps
    done = min(max(step / total, 0.0), 1.0)
    filled = int(done * self.width)
    text = f"{step:>{len(str(total))}}/{total} {100 * done:3.0f}% [{'#' * filled}{'.' * (self.width - filled)}]"
    if self._speed is not None:
      img_per_sec, seconds_per_step = self._speed
      if img_per_sec is not None and math.isfinite(img_per_sec):
        text += f"  {img_per_sec:,.0f} img/s"
      if seconds_per_step is not None:
        text += f"  ETA {format_duration(max(total - step, 0) * seconds_per_step)}"
    # A line longer than the terminal wraps, and "\r" then rewrites only its last part.
    return text[: shutil.get_terminal_size().columns - 1]

  def redraw(self) -> None:
    if self._step is None:
      return
    text = self.render()
    self.stream.write("\r" + text + " " * max(len(self._drawn) - len(text), 0))
    self.stream.flush()
    self._drawn = text

  def clear(self) -> None:
    """Blank the bar's line so a console line can take it; `redraw` puts the bar back below."""
    if self._drawn:
      self.stream.write("\r" + " " * len(self._drawn) + "\r")
      self.stream.flush()
      self._drawn = ""

  def close(self) -> None:
    """Leave the final state on screen and move to a new line."""
    if self._step is not None:
      self.redraw()
      self.stream.write("\n")
      self.stream.flush()
      self._step, self._drawn = None, ""


class MetricLogger:
  """Writes every log event to metrics.jsonl, TensorBoard and the console; draws a progress bar on a terminal.

  enabled: None -> only on process 0. progress_bar: None -> on when `bar_stream` (default sys.stderr) is a TTY.
  stream: the console lines (default sys.stdout). tensorboard: False skips the event files (TensorFlow is only
  imported when they are written). Metrics whose value is None (not measured, e.g. MFU on an unknown device) are
  left out everywhere.
  """

  def __init__(
    self,
    workdir: str,
    *,
    total_steps: int,
    enabled: bool | None = None,
    progress_bar: bool | None = None,
    stream=None,
    bar_stream=None,
    tensorboard: bool = True,
  ):
    self.workdir, self.total_steps = workdir, int(total_steps)
    self.enabled = jax.process_index() == 0 if enabled is None else bool(enabled)
    self._stream = stream if stream is not None else sys.stdout
    self._jsonl = self._tb = self._bar = None
    self._closed = False
    if not self.enabled:
      return
    tf.io.gfile.makedirs(workdir)  # gfile: local paths and gs:// buckets alike
    self._jsonl = tf.io.gfile.GFile(os.path.join(workdir, METRICS_FILE), "a")
    if tensorboard:
      self._tb = _TensorBoardWriter(os.path.join(workdir, TENSORBOARD_DIR))
    bar_stream = bar_stream if bar_stream is not None else sys.stderr
    if progress_bar is None:
      progress_bar = bool(getattr(bar_stream, "isatty", lambda: False)())
    if progress_bar:
      self._bar = ProgressBar(self.total_steps, bar_stream)

  def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    if self._closed:
      raise RuntimeError(f"MetricLogger for {self.workdir!r} is closed.")
    step = int(step)
    clash = [n for n in metrics if n in _RESERVED]
    if clash:
      raise ValueError(f"Metric names {clash} are reserved for the fields of a metrics.jsonl line {_RESERVED}.")
    values = {str(n): _as_float(n, v) for n, v in metrics.items() if v is not None}
    event = {"step": step, "split": split, "time": time.time()}
    event.update({n: _json_number(v) for n, v in values.items()})
    # Flushed at once: a run killed later keeps every line written so far (no fsync: the OS keeps flushed data
    # when a process dies, and an fsync a log line would stall training on network file systems).
    self._jsonl.write(json.dumps(event, allow_nan=False) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      self._tb.scalars(step, {f"{split}/{n}": v for n, v in values.items()})
    if self._bar is not None and ("img_per_sec" in values or "eta_seconds" in values):
      self._bar.set_speed(step, values.get("img_per_sec"), values.get("eta_seconds"))
    self.info(format_line(step, self.total_steps, split, values))

  def info(self, message: str) -> None:
    """A console line from process 0 (restores, checkpoints, warnings) that does not garble the progress bar."""
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.clear()
    self._stream.write(message + "\n")
    self._stream.flush()  # before the bar is redrawn on the other stream
    if self._bar is not None:
      self._bar.redraw()

  def progress(self, step: int) -> None:
    """Advances the progress bar (no-op without one); cheap enough to call every step."""
    if self._bar is not None:
      self._bar.update(int(step))

  def close(self) -> None:
    if self._closed:
      return
    self._closed = True
    if self._bar is not None:
      self._bar.close()
    if self._tb is not None:
      self._tb.close()
    if self._jsonl is not None:
      self._jsonl.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class _TensorBoardWriter:
  """Scalar summaries through one tf.summary file writer.

  tf.summary.scalar needs the tensorboard package, which tensorflow-cpu 2.21 does not install; the summary it
  writes is a float32 tensor tagged for the "scalars" plugin, which tf.summary.write does without it.
  """

  def __init__(self, logdir: str):
    from tensorflow.core.framework import summary_pb2

    self._writer = tf.summary.create_file_writer(logdir)
    self._metadata = summary_pb2.SummaryMetadata(
      plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
      data_class=summary_pb2.DATA_CLASS_SCALAR,
    )

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    with self._writer.as_default():
      for tag, value in values.items():
        tf.summary.write(tag, tf.constant(value, tf.float32), step=step, metadata=self._metadata)
    self._writer.flush()  # as metrics.jsonl: a killed run keeps what was logged

  def close(self) -> None:
    self._writer.close()


def save_config(workdir: str, config, *, enabled: bool | None = None) -> None:
  """WORKDIR/config.json with sorted keys, so eval/predict from the workdir and a human see exactly what ran.

  Written by process 0 only (enabled=None), atomically: a temporary file renamed over the old one, so a crash
  never leaves half a config. Values JSON cannot hold (dtypes, functions) are written as their repr strings.
  """
  if not (jax.process_index() == 0 if enabled is None else enabled):
    return
  if not isinstance(config, ml_collections.ConfigDict):
    if not isinstance(config, Mapping):
      raise TypeError(f"save_config needs a ConfigDict or a dict, got {type(config).__name__}.")
    config = ml_collections.ConfigDict(dict(config))
  text = config.to_json_best_effort(sort_keys=True, indent=2)
  tf.io.gfile.makedirs(workdir)
  path = os.path.join(workdir, CONFIG_FILE)
  tmp = f"{path}.tmp-{os.getpid()}"
  with tf.io.gfile.GFile(tmp, "w") as f:
    f.write(text + "\n")
  tf.io.gfile.rename(tmp, path, overwrite=True)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config saved by `save_config` (tuples come back as lists: JSON has only arrays)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(
      f"No {CONFIG_FILE} in workdir {workdir!r}: it is written when training starts "
      f"(save_config), so this directory is not a training workdir or the run never began."
    )
  with tf.io.gfile.GFile(path) as f:
    return ml_collections.ConfigDict(json.load(f))
