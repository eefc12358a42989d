"""Test-wide setup: 8 fake CPU devices (set before jax is imported) so sharding is tested on one machine."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
  """A TFDS data_dir with the built-in digits dataset prepared (offline, from scikit-learn's copy)."""
  from lvm_jax.data import sources

  data_dir = tmp_path_factory.mktemp("tfds")
  sources.make_source("digits", split="train", data_dir=str(data_dir))
  return str(data_dir)


@pytest.fixture
def run_main():
  """main.main in this process with the given flags; returns what it printed (see tests/main_runner.py)."""
  from tests.main_runner import run_main_in_process

  return run_main_in_process
