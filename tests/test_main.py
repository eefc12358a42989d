"""The command line's predict mode: `python main.py --mode=predict --pretrained=... --image=... [--top_k] [--json]`
(training through main.py is tested in tests/train/)."""

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import skimage.data
from absl import app
from absl import flags

from tests.tasks.test_classify import LABELS, pipeline_top_k, save_tiny_vit

REPO = pathlib.Path(__file__).parents[1]
TEXT_LINE = re.compile(r"^ *(\d+\.\d\d)%  (.+)  \[(\d+)\]$")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  return save_tiny_vit(tmp_path_factory.mktemp("tiny_vit"))


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
  path = tmp_path_factory.mktemp("photos") / "chelsea.jpg"
  PIL.Image.fromarray(skimage.data.chelsea()).save(path)
  return path


def test_json_output_equals_the_pipeline(run_main, checkpoint, photo):
  printed = json.loads(run_main("--mode=predict", f"--pretrained={checkpoint}", f"--image={photo}", "--json"))
  indices, probabilities = pipeline_top_k(checkpoint, photo)
  assert [p["index"] for p in printed] == indices
  assert [p["label"] for p in printed] == [LABELS[i] for i in indices]
  np.testing.assert_allclose([p["probability"] for p in printed], probabilities, atol=1e-5, rtol=0)


def test_text_output_is_one_line_per_class(run_main, checkpoint, photo):
  lines = run_main("--mode=predict", f"--pretrained={checkpoint}", f"--image={photo}", "--top_k=3").splitlines()
  indices, probabilities = pipeline_top_k(checkpoint, photo, top_k=3)
  assert len(lines) == 3
  parsed = [TEXT_LINE.match(line).groups() for line in lines]
  assert [int(index) for _, _, index in parsed] == indices
  assert [label for _, label, _ in parsed] == [LABELS[i] for i in indices]
  np.testing.assert_allclose([float(p) / 100 for p, _, _ in parsed], probabilities, atol=5e-5, rtol=0)


def test_train_is_the_default_mode(run_main, checkpoint, photo):
  with pytest.raises(app.UsageError, match="--config is required with --mode=train"):
    run_main(f"--pretrained={checkpoint}", f"--image={photo}")
  assert len(run_main("--mode=predict", f"--pretrained={checkpoint}", f"--image={photo}").splitlines()) == 5


@pytest.mark.parametrize(
  "content,message",
  [
    (None, r"missing\.jpg does not exist; expected an image file"),
    (b"not an image", r"notes\.jpg is not an image file"),
    ("truncated", r"cut\.jpg is a truncated or corrupt JPEG file"),
  ],
)
def test_bad_images_exit_with_the_reason(run_main, checkpoint, photo, tmp_path, content, message):
  name = {None: "missing.jpg", b"not an image": "notes.jpg", "truncated": "cut.jpg"}[content]
  path = tmp_path / name
  if content == "truncated":
    path.write_bytes(photo.read_bytes()[:2000])
  elif content is not None:
    path.write_bytes(content)
  with pytest.raises(SystemExit) as exit_info:
    run_main("--mode=predict", f"--pretrained={checkpoint}", f"--image={path}")
  assert re.match(rf"error: .*{message}", exit_info.value.code)


def test_missing_flags_are_usage_errors(run_main, checkpoint):
  with pytest.raises(app.UsageError, match="exactly one of --pretrained"):
    run_main("--mode=predict", "--image=cat.jpg")
  with pytest.raises(app.UsageError, match="--image is required"):
    run_main("--mode=predict", f"--pretrained={checkpoint}")
  with pytest.raises(flags.IllegalFlagValueError):
    run_main("--mode=dance")


def test_command_line_end_to_end(checkpoint, photo, tmp_path):
  command = [sys.executable, "main.py", "--mode=predict", f"--pretrained={checkpoint}", "--top_k=2"]
  done = subprocess.run(command + [f"--image={photo}", "--json"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  indices, probabilities = pipeline_top_k(checkpoint, photo, top_k=2)
  printed = json.loads(done.stdout)
  assert [p["index"] for p in printed] == indices
  np.testing.assert_allclose([p["probability"] for p in printed], probabilities, atol=1e-5, rtol=0)

  failed = subprocess.run(
    command + [f"--image={tmp_path / 'missing.jpg'}"], cwd=REPO, capture_output=True, text=True, timeout=120
  )
  assert failed.returncode == 1 and failed.stdout == ""
  assert "missing.jpg does not exist" in failed.stderr and "Traceback" not in failed.stderr


@pytest.mark.parametrize(
  "args, message",
  [
    (
      ["--config=configs/digits.py:runlocal", "--config.data.batchsize=3"],
      "error: --config.data.batchsize: no such config key; did you mean batch_size?",
    ),
    (
      ["--config=configs/digits.py:model=foo"],
      "error: flag --config=configs/digits.py:model=foo: Error whilst parsing config file: ValueError: "
      "configs/digits.py: model='foo' is not one of ['resnet', 'swin', 'vit'].",
    ),
    (
      ["--config=configs/nothere.py"],
      "error: --config=configs/nothere.py: no such file (recipes live under configs/, e.g. configs/digits.py).",
    ),
    (
      ["--config=configs/digits.py:runlocal", "--config.model=resnet_99"],
      "error: Unknown model 'resnet_99'. Did you mean resnet50, resnet34, resnet18, resnet152, resnet101? Known",
    ),
  ],
)
def test_user_errors_are_one_line_with_the_traceback_on_request(args, message, tmp_path):
  command = [sys.executable, "main.py", f"--workdir={tmp_path / 'run'}", *args]
  done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert done.returncode == 1 and done.stdout == ""
  assert done.stderr.startswith(message) and done.stderr.count("\n") == 1, done.stderr
  if "resnet_99" in message:  # raised while running: the traceback is there when asked for
    again = subprocess.run(
      command, cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "LVM_JAX_TRACEBACK": "1"}
    )
    assert again.returncode == 1 and "Traceback (most recent call last)" in again.stderr
    assert again.stderr.rstrip().splitlines()[-1].startswith("ValueError: Unknown model 'resnet_99'")


def test_importing_tensorflow_prints_none_of_its_start_up_notices():
  done = subprocess.run(
    [sys.executable, "-c", "import lvm_jax.tf_host"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
    env={k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"},
  )
  assert done.returncode == 0 and done.stderr == "", done.stderr


def test_a_run_console_holds_only_the_run_s_own_lines(tmp_path):
  """The README's first command, at runlocal size on a fresh data dir: no TensorFlow or TFDS notices, no Orbax
  warnings at checkpoints, nothing on stderr."""
  data_dir = tmp_path / "tfds"
  command = [
    sys.executable,
    "main.py",
    "--config=configs/digits.py:runlocal",
    f"--workdir={tmp_path / 'run'}",
    f"--config.data.train.data_dir={data_dir}",
    f"--config.data.eval.data_dir={data_dir}",
  ]
  done = subprocess.run(
    command,
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
    env={k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"},
  )
  assert done.returncode == 0 and done.stderr == "", done.stderr
  lines = done.stdout.splitlines()
  assert lines[0] == f"Prepared the built-in digits dataset in {data_dir}/digits/1.0.0 (once: later runs read it)."
  assert [line.split()[0] for line in lines[1:]] == ["[train]"] * 3 + ["[eval]"], done.stdout
