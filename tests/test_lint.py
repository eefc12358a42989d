"""The linter and the formatter (ruff, configured in pyproject.toml) find nothing to change: a lint error or an
unformatted file fails the suite, and so CI."""

import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).parents[1]


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff_finds_nothing(command):
  result = subprocess.run(
    [sys.executable, "-m", "ruff", *command, "--no-cache", str(REPO)], cwd=REPO, capture_output=True, text=True
  )
  assert result.returncode == 0, result.stdout + result.stderr
