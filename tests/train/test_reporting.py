"""Reporting: metrics.jsonl lines, TensorBoard events, console lines, the progress bar, the saved config."""

import glob
import io
import json
import math
import os
import time

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lvm_jax.train import reporting

TRAIN = {
  "loss": np.float32(0.5),
  "lr": jnp.asarray(1e-3),
  "img_per_sec": 1950.4,
  "mfu": None,
  "grad_norm": math.nan,
  "overflow": math.inf,
  "underflow": -math.inf,
}


def _strict_json(line):
  def reject(constant):
    raise AssertionError(f"non-standard JSON constant {constant} in {line!r}")

  return json.loads(line, parse_constant=reject)


def _tensorboard_scalars(workdir):
  """{(tag, step): value} and {tag: plugin names} from every event file under WORKDIR/tensorboard."""
  import tensorflow as tf

  values, plugins = {}, {}
  for path in sorted(glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for v in event.summary.value:
        values[(v.tag, event.step)] = float(tf.make_ndarray(v.tensor))
        if v.metadata.plugin_data.plugin_name:
          plugins.setdefault(v.tag, set()).add(v.metadata.plugin_data.plugin_name)
  return values, plugins


def test_jsonl_tensorboard_and_console_hold_the_same_values(tmp_path):
  workdir, console = str(tmp_path / "run"), io.StringIO()
  before = time.time()
  with reporting.MetricLogger(workdir, total_steps=100, progress_bar=False, stream=console) as log:
    log.write(10, "train", TRAIN)
    # Flushed at once: readable before close, as after a crash.
    lines = open(os.path.join(workdir, "metrics.jsonl")).read().splitlines()
    assert len(lines) == 1
  first = _strict_json(lines[0])
  assert before <= first.pop("time") <= time.time()
  assert first == {
    "step": 10,
    "split": "train",
    "loss": 0.5,
    "lr": float(np.float32(1e-3)),
    "img_per_sec": 1950.4,
    "grad_norm": "NaN",
    "overflow": "Infinity",
    "underflow": "-Infinity",
  }  # None (mfu) left out

  # A resumed run appends to the same files.
  with reporting.MetricLogger(workdir, total_steps=100, progress_bar=False, stream=console) as log:
    log.write(100, "eval", {"top1": 0.98333, "top5": 1.0, "loss": np.float64(0.0612)})
  events = [_strict_json(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [(e["step"], e["split"]) for e in events] == [(10, "train"), (100, "eval")]
  assert {k: events[1][k] for k in ("top1", "top5", "loss")} == {"top1": 0.98333, "top5": 1.0, "loss": 0.0612}
  back = reporting.read_metrics(workdir, split="train")
  assert len(back) == 1 and math.isnan(back[0]["grad_norm"]) and back[0]["underflow"] == -math.inf

  scalars, plugins = _tensorboard_scalars(workdir)
  assert scalars == {
    ("train/loss", 10): 0.5,
    ("train/lr", 10): float(np.float32(1e-3)),
    ("train/img_per_sec", 10): float(np.float32(1950.4)),
    ("train/overflow", 10): math.inf,
    ("train/underflow", 10): -math.inf,
    ("train/grad_norm", 10): scalars[("train/grad_norm", 10)],
    ("eval/top1", 100): float(np.float32(0.98333)),
    ("eval/top5", 100): 1.0,
    ("eval/loss", 100): float(np.float32(0.0612)),
  }
  assert math.isnan(scalars[("train/grad_norm", 10)])
  assert set(plugins) == {tag for tag, _ in scalars} and all(p == {"scalars"} for p in plugins.values())

  assert console.getvalue().splitlines() == [
    "[train] step 10/100  loss 0.5000  lr 1.00e-03  grad_norm nan  overflow inf  underflow -inf  1,950 img/s",
    "[eval]  step 100/100  top1 0.9833  top5 1.0000  loss 0.0612",
  ]


def test_console_line_format():
  line = reporting.format_line(
    120,
    1000,
    "train",
    {"eta_seconds": 190.0, "mfu": 0.1234, "img_per_sec": 1950.4, "loss": 0.53214, "lr": 1.2e-3, "epoch_frac": 2.5e-5},
  )
  assert (
    line == "[train] step 120/1000  loss 0.5321  lr 1.20e-03  epoch_frac 2.500e-05  1,950 img/s  MFU 12.3%  ETA 3m10s"
  )


@pytest.mark.parametrize(
  "seconds, text", [(0.4, "0s"), (45, "45s"), (190, "3m10s"), (7500, "2h05m"), (97200 + 60, "1d03h"), (math.inf, "?")]
)
def test_format_duration(seconds, text):
  assert reporting.format_duration(seconds) == text


def test_bad_metrics_are_clear_errors(tmp_path):
  with reporting.MetricLogger(
    str(tmp_path), total_steps=10, progress_bar=False, stream=io.StringIO(), tensorboard=False
  ) as log:
    with pytest.raises(TypeError, match="'hist'.*scalar"):
      log.write(1, "train", {"hist": np.zeros(3)})
    with pytest.raises(ValueError, match="reserved"):
      log.write(1, "train", {"step": 1.0})


def test_disabled_logger_writes_nothing(tmp_path):
  workdir, console, tty = tmp_path / "run", io.StringIO(), FakeTTY()
  log = reporting.MetricLogger(str(workdir), total_steps=10, enabled=False, stream=console, bar_stream=tty)
  log.write(1, "train", {"loss": 1.0})
  log.info("hello")
  log.progress(1)
  log.close()
  log.close()
  reporting.save_config(str(workdir), ml_collections.ConfigDict({"a": 1}), enabled=False)
  assert not workdir.exists() and console.getvalue() == "" and tty.getvalue() == ""


class FakeTTY(io.StringIO):
  def isatty(self):
    return True


def _screen(text):
  """What a terminal shows after `text`: "\\r" returns to column 0 and later characters overwrite."""
  lines, col = [[]], 0
  for ch in text:
    if ch == "\r":
      col = 0
    elif ch == "\n":
      lines.append([])
      col = 0
    else:
      line = lines[-1]
      line[col : col + 1] = [ch]
      col += 1
  return ["".join(line).rstrip() for line in lines]


def test_progress_bar_on_a_tty_keeps_console_lines_whole(tmp_path, monkeypatch):
  monkeypatch.setenv("COLUMNS", "120")
  tty = FakeTTY()  # console lines and the bar on one terminal, as stdout and stderr usually are
  with reporting.MetricLogger(str(tmp_path), total_steps=100, stream=tty, bar_stream=tty, tensorboard=False) as log:
    log.progress(1)
    assert _screen(tty.getvalue()) == ["  1/100   1% [..............................]"]
    for step in range(2, 51):
      log.progress(step)
    log.write(50, "train", {"loss": 0.25, "img_per_sec": 1950.0, "eta_seconds": 100.0})
    assert _screen(tty.getvalue()) == [
      "[train] step 50/100  loss 0.2500  1,950 img/s  ETA 1m40s",
      " 50/100  50% [###############...............]  1,950 img/s  ETA 1m40s",
    ]
    for step in range(51, 101):
      log.progress(step)  # the last step always draws; the ETA scales with the steps left
    log.info("saved checkpoint 100")
  assert _screen(tty.getvalue()) == [
    "[train] step 50/100  loss 0.2500  1,950 img/s  ETA 1m40s",
    "saved checkpoint 100",
    "100/100 100% [##############################]  1,950 img/s  ETA 0s",
    "",
  ]


def test_progress_bar_is_off_without_a_tty(tmp_path):
  pipe = io.StringIO()
  with reporting.MetricLogger(str(tmp_path), total_steps=10, stream=pipe, bar_stream=pipe, tensorboard=False) as log:
    log.progress(5)
    log.write(5, "train", {"loss": 1.0})
  assert pipe.getvalue() == "[train] step 5/10  loss 1.0000\n"


def test_config_round_trip(tmp_path):
  config = ml_collections.ConfigDict(
    {
      "model": {"name": "vit_ti16", "num_classes": 10, "drop_path": 0.1, "dtype": "bfloat16", "pretrained": None},
      "optimizer": {"lr": 1e-3, "eps": 1e-12, "schedule": {"warmup_steps": 0, "total_steps": 1000}},
      "mesh": (("data", -1), ("model", 2)),
      "seed": 0,
      "half": 0.5,
      "one": 1.0,
      "flip": True,
      "title": "café",
    }
  )
  workdir = str(tmp_path / "run")
  reporting.save_config(workdir, config)
  reporting.save_config(workdir, config)  # overwrites
  assert sorted(os.listdir(workdir)) == ["config.json"]  # no temporary file left behind
  text = open(os.path.join(workdir, "config.json"), encoding="utf-8").read()
  assert list(json.loads(text)) == sorted(config.keys())
  back = reporting.load_config(workdir)
  assert isinstance(back, ml_collections.ConfigDict) and isinstance(back.model, ml_collections.ConfigDict)
  expected = config.to_dict()
  expected["mesh"] = [["data", -1], ["model", 2]]  # JSON has arrays, not tuples
  assert back.to_dict() == expected
  assert back.model.pretrained is None and type(back.seed) is int and type(back.one) is float
  assert back.optimizer.eps == 1e-12 and back.flip is True and back.title == "café"


def test_save_config_accepts_a_dict_and_load_names_the_workdir(tmp_path):
  reporting.save_config(str(tmp_path), {"a": {"b": 2}})
  assert reporting.load_config(str(tmp_path)).a.b == 2
  with pytest.raises(FileNotFoundError, match="No config.json in workdir .*empty"):
    reporting.load_config(str(tmp_path / "empty"))
