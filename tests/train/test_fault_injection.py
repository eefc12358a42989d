"""A digits run SIGKILLed 5 times at random moments (at least once while a checkpoint is being written) and
restarted with the same command each time ends with a final checkpoint bit-identical to an uninterrupted run's
(benchmarks/fault_injection.py; its pieces are tested in tests/benchmarks/test_fault_injection.py).

The reference run compiles; the 6 launches of the killed run then load the executables from the compilation cache
it filled, so each restart costs its imports and setup (~8 s on an idle 2-core machine) plus the steps it redoes.
"""

import importlib.util
import pathlib

_PATH = pathlib.Path(__file__).parents[2] / "benchmarks" / "fault_injection.py"
_spec = importlib.util.spec_from_file_location("fault_injection_benchmark", _PATH)
fault_injection = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fault_injection)

KILLS, STEPS = 5, 15


def test_a_run_killed_5_times_ends_bit_identical_to_an_uninterrupted_one(digits_dir, tmp_path, monkeypatch):
  # The runs are main.py as a user starts it: one CPU device (not the suite's 8), their own compilation cache.
  for name in (
    "XLA_FLAGS",
    "JAX_COMPILATION_CACHE_DIR",
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES",
  ):
    monkeypatch.delenv(name, raising=False)
  report = fault_injection.inject(kills=KILLS, seed=0, steps=STEPS, workdir=str(tmp_path), data_dir=digits_dir)
  text = fault_injection.format_report(report)
  print(text)
  assert not report.failures, text  # every restart exited cleanly or was killed, from the latest checkpoint
  assert len(report.kills) == KILLS and report.kills_during_save >= 1, text
  assert report.resumes_checked >= KILLS and report.resumes_ok == report.resumes_checked, text
  assert report.bit_identical and report.leaves > 100 and report.max_abs_diff == 0.0, text
  # Every step logged, recomputed ones included, logged the reference's loss, lr, top1 and grad norm.
  assert report.train_lines >= STEPS and not report.train_lines_differing, text
  assert report.ok
