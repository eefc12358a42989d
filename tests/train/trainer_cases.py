"""Helpers for tests/train/test_trainer.py: the digits recipe with overrides, pytree comparison, a SIGTERM sent
from a thread once the run has logged a given step, and a compile cache shared by the module's runs."""

import contextlib
import functools
import importlib.util
import json
import os
import pathlib
import signal
import threading
import time

import jax
import numpy as np
from jax.experimental.compilation_cache import compilation_cache

from lvm_jax.train import config as config_lib

REPO = pathlib.Path(__file__).parents[2]
DIGITS_RECIPE = REPO / "configs" / "digits.py"


def recipe(data_dir: str, arg: str = "runlocal", path: pathlib.Path = DIGITS_RECIPE, **overrides):
  """The recipe at `path` (configs/digits.py) with ARG, reading its prepared data in `data_dir`; overrides are
  dotted keys ("optimizer.ema_decay": 0.9 via optimizer__ema_decay=0.9)."""
  spec = importlib.util.spec_from_file_location(f"recipe_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  config.data.train.data_dir = data_dir
  config.data.eval.data_dir = data_dir
  config.progress_bar = False
  for key, value in overrides.items():
    config_lib.set_path(config, key, value, sep="__")
  return config


def flat(tree) -> dict:
  """{"params/conv_init/kernel": array, ...} for a restore_arrays() tree."""
  return {
    jax.tree_util.keystr(path, simple=True, separator="/"): np.asarray(leaf)
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def read_lines(path) -> list[dict]:
  """metrics.jsonl as written so far (a line being written is skipped)."""
  if not os.path.exists(path):
    return []
  events = []
  with open(path) as f:
    for line in f:
      try:
        events.append(json.loads(line))
      except json.JSONDecodeError:
        pass
  return events


@contextlib.contextmanager
def sigterm_after_step(workdir: str, step: int):
  """Sends this process SIGTERM from a thread as soon as WORKDIR/metrics.jsonl has a train line of `step` or
  later. Yields an Event set when it was sent. A no-op handler stands below the trainer's own, so a signal that
  lands after the trainer restored its predecessor cannot kill pytest."""
  sent, done = threading.Event(), threading.Event()
  path = os.path.join(workdir, "metrics.jsonl")

  def watch():
    while not done.is_set():
      if any(e.get("split") == "train" and e.get("step", 0) >= step for e in read_lines(path)):
        os.kill(os.getpid(), signal.SIGTERM)
        sent.set()
        return
      time.sleep(0.005)

  previous = signal.signal(signal.SIGTERM, lambda *_: None)
  thread = threading.Thread(target=watch, daemon=True)
  thread.start()
  try:
    yield sent
  finally:
    done.set()
    thread.join()
    signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def shared_compile_cache(directory: str, monkeypatch):
  """A persistent compilation cache for the module's runs: every run traces anew (new closures), and without
  the cache each one recompiles init, train and eval steps (~30 s of CPU per ResNet run). Also measures the
  CPU matmul peak for MFU once instead of once a run. Both are restored afterwards."""
  names = (
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
  )
  before = {name: getattr(jax.config, name) for name in names}
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  compilation_cache.reset_cache()
  from lvm_jax.train import throughput

  monkeypatch.setattr(throughput, "measured_matmul_peak", functools.cache(throughput.measured_matmul_peak))
  try:
    yield
  finally:
    for name, value in before.items():
      jax.config.update(name, value)
    compilation_cache.reset_cache()
