r"""Fault injection: a digits run SIGKILLed at random moments (some while a checkpoint is being written) and
restarted with the same command after each kill ends with a final checkpoint bit-identical to an uninterrupted
run's.

  python benchmarks/fault_injection.py [--kills 8] [--seed 0] [--steps 40] [--checkpoint-every 3]
                                       [--workdir DIR] [--config configs/digits.py:runlocal] [--data-dir DIR]

First an uninterrupted reference run (main.py, WORKDIR/reference), then the same command in WORKDIR/killed,
SIGKILLed --kills times and restarted after each kill; the last restart runs to the end. Every step is logged
(log_every_steps=1), so the console tells the last step a process reached. Each kill is one of
  save:     once the run reached a random step, at the first moment a "<step>.orbax-checkpoint-tmp*" directory
            exists (an Orbax save in flight; the file system is polled every 2 ms), after 0-100 ms more;
  step:     once the run reached a random step, after a random part of one step's time;
  startup:  a random moment before the first step (imports, restore, compile).
What was really in progress is read after the process is dead: a save (a temporary checkpoint directory is left),
the startup (no step printed) or training. The targets are spread so that every kill lands before the end.

Reported: each kill, the latest finalized checkpoint at the kill, and the step the restart resumed from (as it
printed it: "resumed from step N", or its first step minus one); steps lost (at each kill, the last step reached
minus the checkpoint the restart resumed from: steps computed twice); every array of the final checkpoint (params,
batch stats, EMA, optimizer state, step, rng, data position) and its meta against the reference's, bit for bit;
and every train line the killed run logged (recomputed steps included) against the reference's. Exit status 1
when anything differs, a restart resumed from another checkpoint than the latest finalized one, a process failed,
or the run ended before all kills.

Unless JAX_COMPILATION_CACHE_DIR is set (or --no-compile-cache), every process shares a persistent compilation
cache in WORKDIR, filled by the reference run: a restart then loads the executables instead of compiling them
again, which is what keeps many restarts cheap on a CPU (the compiled code is the same, so results are too).
"""

import argparse
import dataclasses
import os
import pathlib
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Optional

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "configs/digits.py:runlocal"
STEP_LINE = re.compile(r"^\[train\]\s+step (\d+)/\d+")
RESUMED_LINE = re.compile(r"resumed from step (\d+)")
NOTHING_TO_TRAIN = "already holds the final checkpoint"
TMP_MARK = ".orbax-checkpoint-tmp"
POLL_S = 0.002
SAVE_DELAY_S = 0.1
TRAIN_KEYS = ("loss", "lr", "top1", "grad_norm")  # the logged values that depend on the state, not on timing


class Launch:
  """One main.py process (in its own session, so a kill takes all of it); stdout read on a thread."""

  def __init__(self, argv: list[str], env: dict, log_path: str):
    self.started, self.started_wall = time.monotonic(), time.time()
    self.proc = subprocess.Popen(
      argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    # Written by the reader thread; step_times is read only once the process is gone (see wait()).
    self.step_times: dict[int, float] = {}  # step -> seconds after the start when its line came
    self.first_step: Optional[int] = None
    self.last_step: Optional[int] = None
    self.resume_line: Optional[int] = None
    self.nothing_to_train = False
    self.killed_at: Optional[float] = None  # seconds after the start
    self._reader = threading.Thread(target=self._read, args=(log_path,), daemon=True)
    self._reader.start()

  def _read(self, log_path: str) -> None:
    with open(log_path, "w") as log:
      for line in self.proc.stdout:
        log.write(line)
        match = STEP_LINE.match(line)
        if match:
          step = int(match.group(1))
          self.step_times.setdefault(step, time.monotonic() - self.started)
          self.first_step = step if self.first_step is None else self.first_step
          self.last_step = step
        elif RESUMED_LINE.search(line):
          self.resume_line = int(RESUMED_LINE.search(line).group(1))
        elif NOTHING_TO_TRAIN in line:
          self.nothing_to_train = True

  def resumed_from(self, steps: int) -> Optional[int]:
    """The step this process went on from, as it printed it (None: killed before it said)."""
    if self.nothing_to_train:
      return steps
    if self.first_step is not None:
      return self.first_step - 1
    return self.resume_line

  def running(self) -> bool:
    return self.proc.poll() is None

  def kill(self) -> None:
    if self.running():
      self.killed_at = time.monotonic() - self.started
      try:
        os.killpg(self.proc.pid, signal.SIGKILL)
      except ProcessLookupError:  # it ended in between
        pass

  def wait(self) -> int:
    """The exit status, once the process is gone and every line it printed has been read."""
    code = self.proc.wait()
    self._reader.join()
    return code


@dataclasses.dataclass
class Kill:
  planned: str  # save / step / startup
  at_s: float  # seconds after the launch
  in_progress: str  # what the process was doing: save, train step, final eval/exit, startup
  last_step: Optional[int]  # the last step the process printed (None: none)
  checkpoint: Optional[int]  # the latest finalized checkpoint once the process was dead
  resumed_from: Optional[int] = None  # the step the next launch resumed from (None: not seen)

  @property
  def steps_lost(self) -> int:
    """Steps computed that the restart had to compute again."""
    if self.last_step is None:
      return 0
    resumed = self.resumed_from if self.resumed_from is not None else (self.checkpoint or 0)
    return max(0, self.last_step - resumed)


@dataclasses.dataclass
class Report:
  planned_kills: int
  kills: list[Kill] = dataclasses.field(default_factory=list)
  failures: list[str] = dataclasses.field(default_factory=list)  # failed processes, wrong resumes, early ends
  launches: int = 0
  resumes_checked: int = 0  # launches that printed where they resumed
  resumes_ok: int = 0
  leaves: int = 0  # arrays compared in the final checkpoint
  differing: list[str] = dataclasses.field(default_factory=list)  # their paths where the bits differ
  max_abs_diff: float = 0.0
  meta_equal: bool = False
  train_lines: int = 0  # train lines of the killed run compared with the reference's
  train_lines_differing: list[int] = dataclasses.field(default_factory=list)  # steps whose values differ
  seconds: dict = dataclasses.field(default_factory=dict)

  @property
  def bit_identical(self) -> bool:
    return self.leaves > 0 and not self.differing and self.meta_equal

  @property
  def ok(self) -> bool:
    return (
      self.bit_identical
      and not self.failures
      and not self.train_lines_differing
      and len(self.kills) == self.planned_kills
      and self.resumes_ok == self.resumes_checked
    )

  @property
  def kills_during_save(self) -> int:
    return sum(k.in_progress == "save" for k in self.kills)

  @property
  def steps_lost(self) -> int:
    return sum(k.steps_lost for k in self.kills)


def finalized_steps(checkpoint_dir: str) -> list[int]:
  if not os.path.isdir(checkpoint_dir):
    return []
  return sorted(int(name) for name in os.listdir(checkpoint_dir) if name.isdigit())


def saves_in_flight(checkpoint_dir: str, since: float = 0.0) -> list[str]:
  """Temporary step directories created at or after `since` (time.time()): older ones are leftovers of a killed
  process (until the next run's checkpoint manager deletes them), not a save of the process started then."""
  found = []
  try:
    with os.scandir(checkpoint_dir) as entries:
      for entry in entries:
        try:
          if TMP_MARK in entry.name and entry.stat().st_ctime >= since:
            found.append(entry.name)
        except FileNotFoundError:  # finalized (renamed) or deleted in between
          pass
  except FileNotFoundError:
    pass
  return found


def command(config: str, workdir: str, data_dir: str, steps: int, checkpoint_every: int) -> list[str]:
  """The one command line every launch of a run uses (the reference's differs by its workdir only)."""
  return [
    sys.executable,
    "main.py",
    f"--config={config}",
    f"--workdir={workdir}",
    f"--config.data.train.data_dir={data_dir}",
    f"--config.data.eval.data_dir={data_dir}",
    f"--config.num_steps={steps}",
    "--config.log_every_steps=1",
    f"--config.checkpoint_every_steps={checkpoint_every}",
    "--config.progress_bar=False",
    "--config.optimizer.ema_decay=0.9",
  ]  # EMA: one more part of the state that must survive


def environment(workdir: str, compile_cache: bool) -> dict:
  env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2")
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
  if compile_cache:
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(workdir, "jax_cache"))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
  return env


def plan_kills(kills: int, rng: np.random.Generator) -> list[str]:
  """Kinds in a random order; never a startup kill first (its timing is taken from an earlier restart)."""
  saves, startups = max(2, round(0.4 * kills)), max(1, kills // 5)
  plan = ["save"] * saves + ["startup"] * startups + ["step"] * (kills - saves - startups)
  rng.shuffle(plan)
  first = next(i for i, kind in enumerate(plan) if kind != "startup")
  plan[0], plan[first] = plan[first], plan[0]
  return plan


def _kill(launch: Launch, kind: str, target: int, delay: float, checkpoint_dir: str) -> None:
  """Kills `launch` at the moment `kind` asks for (see the module docstring); returns early if it exits."""
  while launch.running():
    reached = launch.last_step is not None and launch.last_step >= target
    if kind == "startup" and time.monotonic() - launch.started >= delay:
      break
    if kind == "step" and reached:
      time.sleep(delay)
      break
    if kind == "save" and reached and saves_in_flight(checkpoint_dir, launch.started_wall):
      time.sleep(delay)
      break
    time.sleep(POLL_S)
  launch.kill()


def _in_progress(launch: Launch, checkpoint_dir: str, steps: int) -> str:
  """What the dead process was doing: a save it began (there are no saves before the first step), the startup,
  or training."""
  if launch.first_step is None:
    return "startup"
  if saves_in_flight(checkpoint_dir, launch.started_wall):
    return "save"
  return "final eval/exit" if launch.last_step >= steps else "train step"


def flat_arrays(tree) -> dict[str, np.ndarray]:
  import jax

  return {
    jax.tree_util.keystr(path, simple=True, separator="/"): np.asarray(leaf)
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def compare_checkpoints(reference_dir: str, other_dir: str, step: int):
  """(leaves, paths whose bits differ, max abs difference, meta equal) of two runs' checkpoints of `step`."""
  from lvm_jax.train.checkpoints import CheckpointManager

  saved = []
  for workdir in (reference_dir, other_dir):
    with CheckpointManager(os.path.join(workdir, "checkpoints"), async_save=False) as checkpoints:
      saved.append((flat_arrays(checkpoints.restore_arrays(step)), checkpoints.restore_meta(step)))
  (ref, ref_meta), (other, other_meta) = saved
  differing, max_diff = sorted(set(ref) ^ set(other)), 0.0
  for key in sorted(set(ref) & set(other)):
    a, b = ref[key], other[key]
    if a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
      differing.append(key)
      if a.shape == b.shape and a.size and np.issubdtype(a.dtype, np.number):
        max_diff = max(max_diff, float(np.nanmax(np.abs(a.astype(np.float64) - b.astype(np.float64)))))
  return len(ref), differing, max_diff, ref_meta == other_meta


def compare_train_lines(reference_dir: str, other_dir: str) -> tuple[int, list[int]]:
  """Every train line of `other` (recomputed steps appear more than once) against the reference's line."""
  from lvm_jax.train import reporting

  ref = {e["step"]: e for e in reporting.read_metrics(reference_dir) if e["split"] == "train"}
  lines = [e for e in reporting.read_metrics(other_dir) if e["split"] == "train" and "loss" in e]
  differing = sorted(
    {e["step"] for e in lines if e["step"] not in ref or any(e[k] != ref[e["step"]][k] for k in TRAIN_KEYS)}
  )
  return len(lines), differing


def _moment(
  kind: str, kills_left: int, expected: int, steps: int, step_s: float, startup_s: float, rng: np.random.Generator
) -> tuple[int, float]:
  """(target step, delay) of a kill: targets spread so that the kills left all land before the end."""
  target = expected + int(rng.integers(1, max(2, 2 * (steps - expected) // (kills_left + 1)) + 1))
  target = min(target, steps if kind == "save" else steps - 1)  # a save kill may hit the final save
  delay = {
    "save": rng.uniform(0, SAVE_DELAY_S),
    "step": rng.uniform(0, step_s),
    "startup": rng.uniform(0.2, 1.0) * startup_s,
  }[kind]
  return target, delay


def inject(
  *,
  kills: int = 8,
  seed: int = 0,
  steps: int = 40,
  checkpoint_every: int = 3,
  workdir: Optional[str] = None,
  config: str = DEFAULT_CONFIG,
  data_dir: Optional[str] = None,
  compile_cache: bool = True,
  log=print,
) -> Report:
  """Runs the reference, then the killed run, and compares them (see the module docstring)."""
  if kills < 5:
    raise ValueError(f"kills must be >= 5, got {kills}.")
  if steps < 2 * kills:
    raise ValueError(f"steps={steps} leaves too little room for {kills} kills: give at least {2 * kills}.")
  workdir = workdir or tempfile.mkdtemp(prefix="fault_injection_")
  data_dir = data_dir or os.path.join(workdir, "tfds")
  reference_dir, killed_dir = os.path.join(workdir, "reference"), os.path.join(workdir, "killed")
  if os.path.exists(reference_dir) or os.path.exists(killed_dir):  # they would resume instead of starting
    raise ValueError(f"{workdir} already holds runs (reference/, killed/): give a new --workdir.")
  checkpoint_dir = os.path.join(killed_dir, "checkpoints")
  env = environment(workdir, compile_cache)
  os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)
  log_path = lambda name: os.path.join(workdir, "logs", f"{name}.log")  # noqa: E731
  seconds, start = {}, time.monotonic()

  reference = Launch(command(config, reference_dir, data_dir, steps, checkpoint_every), env, log_path("reference"))
  try:
    code = reference.wait()
  finally:
    reference.kill()  # only if the wait was interrupted
  if code != 0:
    raise RuntimeError(f"The reference run failed with status {code}; see {log_path('reference')}.")
  seconds["reference"] = time.monotonic() - start
  times = reference.step_times
  step_s = (times[steps] - times[1]) / (steps - 1)
  log(f"reference: {seconds['reference']:.0f} s, first step after {times[1]:.1f} s, then {step_s:.2f} s a step")

  rng = np.random.default_rng(seed)
  report = Report(kills)
  warm_startup_s: list[float] = []  # restarts' first steps (they load the compiled steps from the cache)
  argv = command(config, killed_dir, data_dir, steps, checkpoint_every)
  for index, kind in enumerate(plan_kills(kills, rng) + ["none"]):
    expected = (finalized_steps(checkpoint_dir) or [0])[-1]  # what this launch must resume from
    name = f"killed_{index}"
    launch = Launch(argv, env, log_path(name))
    report.launches += 1
    try:
      if kind != "none":
        target, delay = _moment(
          kind, kills - index, expected, steps, step_s, statistics.median(warm_startup_s or [times[1]]), rng
        )
        _kill(launch, kind, target, delay, checkpoint_dir)
      code = launch.wait()
    finally:
      launch.kill()  # only if something above was interrupted
    if launch.first_step is not None:
      warm_startup_s.append(launch.step_times[launch.first_step])
    _check_resume(report, launch, name, expected, steps)
    if kind == "none" or code != -signal.SIGKILL:
      if code != 0:
        report.failures.append(f"{name} exited with status {code} (see {log_path(name)})")
      elif kind != "none":
        report.failures.append(f"{name} finished before its kill ({kind}, target step {target})")
      break
    report.kills.append(
      Kill(
        kind,
        launch.killed_at,
        _in_progress(launch, checkpoint_dir, steps),
        launch.last_step,
        (finalized_steps(checkpoint_dir) or [None])[-1],
      )
    )
    kill = report.kills[-1]
    log(
      f"kill {len(report.kills)} ({kind}): {kill.in_progress} after {kill.at_s:.1f} s, last step "
      f"{kill.last_step}, latest checkpoint {kill.checkpoint}"
    )
  seconds["killed"] = time.monotonic() - start - seconds["reference"]
  report.seconds = seconds

  if steps in finalized_steps(checkpoint_dir):
    (report.leaves, report.differing, report.max_abs_diff, report.meta_equal) = compare_checkpoints(
      reference_dir, killed_dir, steps
    )
  else:
    report.failures.append(f"the killed run has no final checkpoint (step {steps})")
  report.train_lines, report.train_lines_differing = compare_train_lines(reference_dir, killed_dir)
  return report


def _check_resume(report: Report, launch: Launch, name: str, expected: int, steps: int) -> None:
  """Counts the launch's resume (where it printed it) and gives it to the kills it restarts after."""
  resumed = launch.resumed_from(steps)
  if launch.first_step is not None and launch.resume_line not in (None, launch.first_step - 1):
    report.failures.append(
      f"{name} said it resumed from step {launch.resume_line}, then trained step {launch.first_step}"
    )
  if resumed is None:
    return
  report.resumes_checked += 1
  report.resumes_ok += resumed == expected
  if resumed != expected:
    report.failures.append(f"{name} resumed from step {resumed}, not from the latest checkpoint {expected}")
  for kill in reversed(report.kills):  # launches killed before saying it resumed from the same one
    if kill.resumed_from is not None:
      break
    kill.resumed_from = resumed


def format_report(report: Report) -> str:
  rows = [
    f"{'kill':>4}  {'planned':8} {'in progress':16} {'after s':>7} {'last step':>9} {'checkpoint':>10} "
    f"{'resumed':>7} {'lost':>4}"
  ]
  for i, k in enumerate(report.kills, 1):
    show = lambda v: "-" if v is None else str(v)  # noqa: E731
    rows.append(
      f"{i:>4}  {k.planned:8} {k.in_progress:16} {k.at_s:>7.1f} {show(k.last_step):>9} "
      f"{show(k.checkpoint):>10} {show(k.resumed_from):>7} {k.steps_lost:>4}"
    )
  diff = "0" if not report.differing else f"{report.max_abs_diff:.3g} ({len(report.differing)} arrays differ)"
  summary = [
    (
      "kills survived",
      f"{len(report.kills)} of {report.planned_kills}"
      if report.ok
      else f"none: the run FAILED ({len(report.kills)} of {report.planned_kills} kills made)",
    ),
    ("kills during a save", str(report.kills_during_save)),
    ("steps lost in all", str(report.steps_lost)),
    (
      "restarts resumed from the latest finalized checkpoint",
      f"{report.resumes_ok} of {report.resumes_checked} launches that printed where they resumed "
      f"({report.launches} launches in all)",
    ),
    (
      "final checkpoint bit-identical to the uninterrupted run",
      f"{'yes' if report.bit_identical else 'NO'} ({report.leaves} arrays, meta "
      f"{'equal' if report.meta_equal else 'DIFFERS'}), max abs diff {diff}",
    ),
    (
      "logged train lines equal to the reference's",
      f"{report.train_lines - len(report.train_lines_differing)} of {report.train_lines}"
      + (f" (steps {report.train_lines_differing} differ)" if report.train_lines_differing else ""),
    ),
    ("wall time", ", ".join(f"{name} {s:.0f} s" for name, s in report.seconds.items())),
  ]
  width = max(len(name) for name, _ in summary)
  text = "\n".join(rows) + "\n\n" + "\n".join(f"{name:<{width}}  {value}" for name, value in summary)
  if report.failures:
    text += "\n\nFAILED:\n" + "\n".join(f"  {f}" for f in report.failures)
  return text


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--kills", type=int, default=8, help="SIGKILLs, at least 5")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--steps", type=int, default=40, help="train steps of the run")
  parser.add_argument("--checkpoint-every", type=int, default=3, help="steps between checkpoints")
  parser.add_argument("--workdir", help="where both runs go (default: a new temporary directory)")
  parser.add_argument("--config", default=DEFAULT_CONFIG)
  parser.add_argument("--data-dir", help="TFDS data_dir holding the digits (default: WORKDIR/tfds, prepared there)")
  parser.add_argument(
    "--no-compile-cache",
    dest="compile_cache",
    action="store_false",
    help="let every restart compile afresh (much slower restarts)",
  )
  args = parser.parse_args(argv)
  report = inject(
    kills=args.kills,
    seed=args.seed,
    steps=args.steps,
    checkpoint_every=args.checkpoint_every,
    workdir=args.workdir,
    config=args.config,
    data_dir=args.data_dir,
    compile_cache=args.compile_cache,
  )
  print()
  print(format_report(report))
  return 0 if report.ok else 1


if __name__ == "__main__":
  sys.exit(main())
