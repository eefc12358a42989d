"""The digits recipe through main.py as 2 processes x 2 CPU devices (jax.distributed on loopback, gloo
collectives, one shared workdir as on a pod) against 1 process x 4 devices.

The three processes run at once (one 4-device run, two 2-device ones): ~120 CPU-seconds in all, mostly XLA
compiles (train step and state init, ~15 s each per process), so ~60 s on two idle cores and 100-240 s
measured on a loaded 2-core machine. What is checked:
  - the same train loss at every logged step and the same final eval metrics (rtol 5e-5; a wrong or shifted
    batch moves a loss by more than 1e-3);
  - only process 0 logs (one metrics.jsonl line per logged step, one TensorBoard writer, console lines
    from process 0 only), while every process writes its part of each checkpoint;
  - the two processes are fed different examples, and their local batches put together are the 1-process
    global batch (the recipe's data.num_shards makes it so; equal losses could not happen otherwise);
  - the final parameters and batch_stats, tensor by tensor: each differs between the runs by a small fraction
    of how far training moved it over the last checkpoint interval (steps 3 to 6), see below.

Parameters are not within 1e-5 element-wise, and cannot be: the two layouts sum gradients across devices in
different orders (gloo's ring vs XLA's in-process all-reduce), which differ in the last bits, and Adam's
normalization turns such ulp-level noise into lr-sized updates wherever a gradient is pure cancellation
(BatchNorm biases feeding BatchNorm, the zero-initialised last BN of each block). Measured (jax 0.10.2, CPU):
after step 1 (lr 0) the parameters are bit-identical and the step-1 gradients agree to 3.6e-6 per tensor;
after 6 steps ~1e-5 to 4e-4 apart in relative L2 over all parameters together. The same happens between 1x2
and 1x4 devices in one process (1.5e-6 L2), so it is the optimizer's sensitivity, not the multi-host path.
The losses follow that drift: measured up to 7.9e-6 relative, and 1.2e-5 at step 6 once the 1x1
convolutions became matrix products (another summation order); hence rtol 5e-5.

One bound over all parameters together would hide a small tensor (a BatchNorm bias is ~1e-3 of the total
norm), so each tensor is held to its own scale: how far it moved from step 3 to step 6 (every tensor moves).
A tensor left untrained, reset, swapped or given another gradient in one run differs by about that much or
more. Measured: params at most 0.026 of it (a BatchNorm bias fed by cancelling gradients; conv kernels
<= 2e-3), batch_stats at most 2.2e-5.

The last test loses a process: the same 2-process run, SIGKILLed in one process once a checkpoint is written,
must stop in the other within 40 s (lvm_jax/parallel/distributed.py), and the same command must then resume it
and end with the uninterrupted run's numbers. Its 3 launches load the executables the 2-process run above
compiled (a persistent compilation cache shared by the module; the command is the same but for
checkpoint_every_steps, which is not compiled in), so each costs its imports and setup, ~30 s on a loaded 2-core
machine, plus ~20 s for the loss to be seen: ~2 minutes.
"""

import glob
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RTOL = 5e-5
# A generous bound: it only catches hangs (a process waiting in a collective for a peer that died); a failing
# process ends the others at once. The runs took up to 240 s on a loaded machine.
TIMEOUT_S = 600

# Per tensor: |two - one| (L2) over how far one moved from step 3 to 6; see the module docstring.
MOVED_FRACTION = {"params": 0.2, "batch_stats": 1e-3}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int, compile_cache: str | None = None) -> dict:
  env = {
    k: v
    for k, v in os.environ.items()
    if k != "XLA_FLAGS"
    and not k.startswith(("JAX_COORDINATOR", "JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE", "LVM_JAX_HEARTBEAT"))
    and k not in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
  }
  env.update(
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    JAX_PLATFORMS="cpu",
    PYTHONPATH=ROOT,
    TF_CPP_MIN_LOG_LEVEL="2",
  )
  if compile_cache:
    env.update(
      JAX_COMPILATION_CACHE_DIR=compile_cache,
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
  return env


def _cli(workdir: str, data_dir: str) -> list[str]:
  return [
    sys.executable,
    "main.py",
    "--config=configs/digits.py:runlocal",
    f"--workdir={workdir}",
    f"--config.data.train.data_dir={data_dir}",
    f"--config.data.eval.data_dir={data_dir}",
    "--config.log_every_steps=1",
  ]


def _tail(path: str, chars: int = 3000) -> str:
  with open(path, errors="replace") as f:
    return f.read()[-chars:]


def _run_all(jobs: dict) -> dict:
  """Starts every job at once ({name: (argv, env, log path)}); all must exit 0 within TIMEOUT_S. On the first
  failure or at the deadline the others are killed (a 2-process run would otherwise wait for its dead peer)."""
  procs = {}
  try:
    for name, (argv, env, log) in jobs.items():
      with open(log, "w") as out:
        procs[name] = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + TIMEOUT_S
    while any(p.poll() is None for p in procs.values()):
      failed = [n for n, p in procs.items() if p.returncode not in (None, 0)]
      if failed or time.monotonic() > deadline:
        break
      time.sleep(0.5)
  finally:
    for p in procs.values():
      if p.poll() is None:
        p.kill()
        p.wait()
  bad = {n: p.returncode for n, p in procs.items() if p.returncode != 0}
  if bad:
    tails = "\n".join(
      f"--- {n} (exit {rc}; negative: killed after the first failure or the {TIMEOUT_S} s "
      f"deadline) ---\n{_tail(jobs[n][2])}"
      for n, rc in bad.items()
    )
    pytest.fail(f"main.py failed: {bad}\n{tails}")
  return {name: _tail(log, chars=10**7) for name, (_, _, log) in jobs.items()}


def _distributed(port: int, process_id: int) -> list[str]:
  return ["--distributed", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={process_id}"]


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory) -> str:
  """The 2-process runs' persistent compilation cache: the restarts of the lost-process test load what the
  2-process run compiled (identical programs, every process the same) instead of compiling again."""
  return str(tmp_path_factory.mktemp("compile_cache"))


@pytest.fixture(scope="module")
def runs(digits_dir, tmp_path_factory, compile_cache):
  base = tmp_path_factory.mktemp("multihost_training")
  one, two = str(base / "one_process"), str(base / "two_processes")  # two: one workdir shared by both
  port = _free_port()
  jobs = {"1x4": (_cli(one, digits_dir), _env(4), str(base / "1x4.log"))}
  for i in range(2):
    jobs[f"2x2 process {i}"] = (
      _cli(two, digits_dir) + _distributed(port, i),
      _env(2, compile_cache),
      str(base / f"2x2_{i}.log"),
    )
  start = time.monotonic()
  logs = _run_all(jobs)
  print(f"1x4 and 2x2 runs together: {time.monotonic() - start:.0f} s")
  return {"one": one, "two": two, "logs": logs}


def _metrics(workdir: str) -> list[dict]:
  from lvm_jax.train import reporting

  with open(os.path.join(workdir, reporting.METRICS_FILE)) as f:
    return [json.loads(line) for line in f]


def _by_step(lines: list[dict], split: str) -> dict[int, dict]:
  return {line["step"]: line for line in lines if line["split"] == split}


def _max_rel(a: float, b: float) -> float:
  return abs(a - b) / max(abs(a), 1e-30)


def test_two_processes_log_the_same_losses_and_final_eval_as_one(runs):
  one, two = _metrics(runs["one"]), _metrics(runs["two"])
  train_one, train_two = _by_step(one, "train"), _by_step(two, "train")
  assert sorted(train_one) == sorted(train_two) == list(range(1, 7))  # runlocal: 6 steps, every one logged
  report = {s: _max_rel(train_one[s]["loss"], train_two[s]["loss"]) for s in train_one}
  print("train loss, relative difference by step:", {s: f"{r:.1e}" for s, r in report.items()})
  for step in train_one:
    np.testing.assert_allclose(train_two[step]["loss"], train_one[step]["loss"], rtol=RTOL, err_msg=f"step {step}")
    assert train_two[step]["top1"] == train_one[step]["top1"] and train_two[step]["lr"] == train_one[step]["lr"]
  # The final models evaluated over the whole test split (sharded over the processes in the 2-process run).
  eval_one, eval_two = _by_step(one, "eval"), _by_step(two, "eval")
  assert sorted(eval_one) == sorted(eval_two) == [6]
  for key in ("loss", "top1", "top5"):
    np.testing.assert_allclose(eval_two[6][key], eval_one[6][key], rtol=RTOL, err_msg=f"eval {key}")


def test_only_process_0_logs_and_every_process_writes_checkpoints(runs):
  two = _metrics(runs["two"])
  keys = [(line["step"], line["split"]) for line in two]
  assert keys == [(s, "train") for s in range(1, 7)] + [(6, "eval")]  # one line each: no second writer
  assert keys == [(line["step"], line["split"]) for line in _metrics(runs["one"])]
  assert len(glob.glob(os.path.join(runs["two"], "tensorboard", "events.out.tfevents.*"))) == 1
  console = {i: runs["logs"][f"2x2 process {i}"] for i in range(2)}
  assert console[0].count("[train] step") == 6 and console[0].count("[eval]") == 1
  assert "[train]" not in console[1] and "[eval]" not in console[1]

  from lvm_jax.train.checkpoints import CheckpointManager

  ckpt = CheckpointManager(os.path.join(runs["two"], "checkpoints"))
  assert ckpt.all_steps() == [3, 6]  # runlocal: checkpoint_every_steps=3, and the last step
  ckpt.close()
  for step in (3, 6):  # Orbax: each process writes the shards it holds, into its own ocdbt.process_<i>
    state = os.path.join(runs["two"], "checkpoints", str(step), "state")
    assert all(os.path.isdir(os.path.join(state, f"ocdbt.process_{i}")) for i in range(2)), os.listdir(state)


def _digits_config(data_dir: str):
  spec = importlib.util.spec_from_file_location("digits_recipe", os.path.join(ROOT, "configs", "digits.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("runlocal")
  config.data.train.data_dir = config.data.eval.data_dir = data_dir
  return config


def test_processes_read_different_examples_that_make_the_same_global_batch(digits_dir, monkeypatch):
  """What the trainer feeds each process (Run.train_dataset, with the process index it would see)."""
  from lvm_jax.data import pipeline
  from lvm_jax.train import setup

  run = setup.build(_digits_config(digits_dir))

  def feed(index: int, count: int, steps: int = 3) -> list[dict]:
    monkeypatch.setattr(pipeline.Shard, "current", classmethod(lambda cls: pipeline.Shard(index, count)))
    return list(run.train_dataset(0).take(steps).as_numpy_iterator())

  whole, parts = feed(0, 1), [feed(0, 2), feed(1, 2)]
  for step, batch in enumerate(whole):
    local = [p[step] for p in parts]
    assert len(batch["label"]) == 16 and all(len(b["label"]) == 8 for b in local)
    assert not np.array_equal(local[0]["image"], local[1]["image"])  # different examples ...
    for key in ("image", "label"):  # ... that together are the 1-process global batch
      np.testing.assert_array_equal(np.concatenate([local[0][key], local[1][key]]), batch[key])


def _flat(tree) -> dict:
  import jax

  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_two_processes_end_with_the_same_parameters_as_one(runs):
  from lvm_jax.train.checkpoints import CheckpointManager

  saved = {}
  for name in ("one", "two"):
    ckpt = CheckpointManager(os.path.join(runs[name], "checkpoints"))
    saved[name] = {step: ckpt.restore_arrays(step) for step in (3, 6)}
    ckpt.close()
  for collection, bound in MOVED_FRACTION.items():
    one, two, earlier = (_flat(saved[name][step][collection]) for name, step in (("one", 6), ("two", 6), ("one", 3)))
    assert one.keys() == two.keys() == earlier.keys()
    ratio = {}
    for key in one:
      x, y, x3 = (t[key].astype(np.float64) for t in (one, two, earlier))
      moved = np.linalg.norm(x - x3)
      assert moved > 0, f"{collection} {key} did not change from step 3 to 6"
      ratio[key] = np.linalg.norm(x - y) / moved
    worst = sorted(ratio, key=ratio.get)[-3:]
    print(f"{collection}: |two - one| / |one(6) - one(3)|, largest: " + ", ".join(f"{k} {ratio[k]:.1e}" for k in worst))
    bad = {k: f"{r:.2e}" for k, r in ratio.items() if not r <= bound}
    assert not bad, f"{collection} tensors further apart than {bound} of their last 3 steps' change: {bad}"


# The survivor of a lost process must stop within this (measured: ~20 s when process 1 is lost, the watch's
# default timeout; under a second when process 0 is, as jax aborts at once when the coordinator goes).
LOST_PROCESS_DEADLINE_S = 40


def _committed_checkpoints(workdir: str) -> list[int]:
  """Orbax writes a step into a temporary directory and renames it to the bare step number once complete."""
  directory = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(directory) else []


def _metrics_lines(workdir: str) -> list[dict]:
  return _metrics(workdir) if os.path.exists(os.path.join(workdir, "metrics.jsonl")) else []


class _Launch:
  """Both processes of the run, started with the same command every time (as a user restarts a run)."""

  def __init__(self, name: str, workdir: str, data_dir: str, port: int, env: dict, logs: str):
    self.logs = [os.path.join(logs, f"{name}_{i}.log") for i in range(2)]
    self.metrics_before = len(_metrics_lines(workdir))  # metrics.jsonl is appended to by each launch
    self.checkpoints_before = _committed_checkpoints(workdir)
    self.procs = []
    for i in range(2):
      with open(self.logs[i], "w") as out:
        self.procs.append(
          subprocess.Popen(
            _cli(workdir, data_dir) + ["--config.checkpoint_every_steps=1"] + _distributed(port, i),
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
          )
        )

  def output(self, i: int) -> str:
    return _tail(self.logs[i], chars=10**7)

  def describe(self) -> str:
    return "\n".join(f"--- process {i} (exit {p.poll()}) ---\n{_tail(self.logs[i])}" for i, p in enumerate(self.procs))

  def wait_until(self, condition, what: str, while_running: bool = True) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
      if while_running and any(p.poll() is not None for p in self.procs):
        pytest.fail(f"a process exited while waiting for {what}\n{self.describe()}")
      if time.monotonic() > deadline:
        pytest.fail(f"no {what} after {TIMEOUT_S} s\n{self.describe()}")
      time.sleep(0.05)

  def kill_and_time_the_other(self, victim: int) -> tuple[int, float]:
    """SIGKILLs process `victim`; returns the other's exit status and how long after the kill it exited."""
    self.procs[victim].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    try:
      status = self.procs[1 - victim].wait(timeout=LOST_PROCESS_DEADLINE_S)
    except subprocess.TimeoutExpired:
      pytest.fail(
        f"process {1 - victim} still runs {LOST_PROCESS_DEADLINE_S} s after process {victim} was "
        f"killed\n{self.describe()}"
      )
    return status, time.monotonic() - killed

  def close(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.kill()
      p.wait()


def test_a_lost_process_stops_the_other_within_40_s_and_the_same_command_resumes(
  runs, digits_dir, compile_cache, tmp_path
):
  workdir, port, env = str(tmp_path / "run"), _free_port(), _env(2, compile_cache)
  launches = []

  def launch(name: str) -> _Launch:
    launches.append(_Launch(name, workdir, digits_dir, port, env, str(tmp_path)))
    return launches[-1]

  try:
    # 1. Process 1 is lost once a checkpoint is written: process 0 (it hosts the coordination service) names it.
    first = launch("first")
    first.wait_until(lambda: _committed_checkpoints(workdir), "checkpoint")
    status, seconds = first.kill_and_time_the_other(victim=1)
    print(f"process 1 killed: process 0 exited {status} after {seconds:.1f} s")
    assert status not in (0, None), first.describe()
    assert "process 1 of 2 stopped responding" in first.output(0), first.describe()
    assert "Restart all processes with the same command" in first.output(0), first.describe()

    # 2. The same command resumes; this time process 0, and with it the coordination service, is lost once a
    #    newer checkpoint is written. jax aborts process 1 at once, with its own message.
    second = launch("second")
    second.wait_until(lambda: _committed_checkpoints(workdir)[-1:] > second.checkpoints_before[-1:], "newer checkpoint")
    status, seconds = second.kill_and_time_the_other(victim=0)
    print(f"process 0 killed: process 1 exited {status} after {seconds:.1f} s")
    assert status not in (0, None), second.describe()
    assert "coordination service" in second.output(1), second.describe()

    # 3. The same command again finishes the run.
    third = launch("third")
    third.wait_until(lambda: all(p.poll() is not None for p in third.procs), "end of the run", while_running=False)
    assert [p.returncode for p in third.procs] == [0, 0], third.describe()
  finally:
    for each in launches:
      each.close()

  lines = _metrics_lines(workdir)
  bounds = [each.metrics_before for each in launches] + [len(lines)]
  steps = [
    [line["step"] for line in lines[start:end] if line["split"] == "train"] for start, end in zip(bounds, bounds[1:])
  ]
  print(
    "train steps logged by each launch:", steps, "checkpoints at each start:", [a.checkpoints_before for a in launches]
  )
  for launch_, logged in zip(launches[1:], steps[1:]):
    # A restart resumes from the newest checkpoint there was: its first step is the one after it, not step 1.
    assert launch_.checkpoints_before and logged[:1] in ([], [launch_.checkpoints_before[-1] + 1]), steps
  assert steps[-1] == list(range(steps[-1][0], 7)) and steps[-1][0] > 1, steps  # resumed, then ran to the end
  assert (lines[-1]["step"], lines[-1]["split"]) == (6, "eval"), lines[-1]
  assert _committed_checkpoints(workdir)[-1] == 6
  # Resumed exactly: the same executables (from the cache) on the restored state and data position give the
  # uninterrupted 2-process run's numbers, bit for bit.
  uninterrupted = _metrics(runs["two"])
  for split in ("train", "eval"):
    expected = _by_step(uninterrupted, split)
    for step, line in _by_step(lines[bounds[-2] :], split).items():
      assert {k: line[k] for k in ("loss", "top1")} == {k: expected[step][k] for k in ("loss", "top1")}, (split, step)
