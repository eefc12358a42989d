r"""The lvm_jax command line. Kept short on purpose: it parses flags and calls into lvm_jax.

  python main.py --config=configs/digits.py --workdir=/tmp/digits [--config.num_epochs=5 ...]   # train (+ resume)
  python main.py --mode=eval --config=configs/digits.py --workdir=/tmp/digits [--step=N]        # newest intact one
  python main.py --mode=predict --workdir=/tmp/digits --image=digit.png                         # a trained run
  python main.py --mode=predict --pretrained=google/vit-base-patch16-224 --image=cat.jpg [--top_k=5] [--json]
  python main.py --mode=predict --pretrained=retinanet_resnet50_fpn_coco.pth --image=street.jpg --output=boxes.png

Several processes (a TPU pod slice, several GPU hosts): pass --distributed on every host. Cloud TPU VMs and
SLURM are detected; elsewhere give --coordinator_address, --num_processes and --process_id (or the
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID environment variables).

A user error (config, data, checkpoint, weights, workdir) is one line on stderr and exit status 1; the full
traceback comes with --verbosity=1 or LVM_JAX_TRACEBACK=1.
"""

import os
import re

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

flags.DEFINE_enum("mode", "train", ["train", "eval", "predict"], "What to run.")
config_flags.DEFINE_config_file(
  "config", None, "train/eval: a recipe under configs/, e.g. configs/digits.py:model=vit.", lock_config=True
)
flags.DEFINE_string(
  "workdir",
  None,
  "train/eval: where checkpoints, logs and the config go (resumed when it holds "
  "a checkpoint). predict: a trained run's workdir.",
)
flags.DEFINE_string(
  "pretrained",
  None,
  "predict: a classifier checkpoint lvm_jax.load_checkpoint reads (Hugging Face or timm folder or hub id, "
  "big_vision .npz file), or a torchvision RetinaNet / FCOS state dict (.pth or .safetensors file or URL).",
)
flags.DEFINE_integer("step", None, "eval/predict: the checkpoint step to use (default: the newest intact one).")
flags.DEFINE_string("image", None, "predict: the image file to classify.")
flags.DEFINE_integer("top_k", 5, "predict: how many classes to print.", lower_bound=1)
flags.DEFINE_bool("json", False, "predict: print JSON (classes: label, index, probability; detections: also box).")
flags.DEFINE_string("output", None, "predict (detection): an image file to draw the detections into.")
flags.DEFINE_float("min_score", None, "predict (detection): show only detections at least this confident.")
flags.DEFINE_bool("distributed", False, "Initialise jax.distributed (one process per host).")
flags.DEFINE_string(
  "coordinator_address",
  os.environ.get("JAX_COORDINATOR_ADDRESS"),
  "--distributed: host:port of process 0, where the hosts cannot be detected.",
)
flags.DEFINE_integer(
  "num_processes", int(os.environ.get("JAX_NUM_PROCESSES", 0)) or None, "--distributed: how many processes in all."
)
flags.DEFINE_integer(
  "process_id",
  int(os.environ["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in os.environ else None,
  "--distributed: this process's index.",
)
FLAGS = flags.FLAGS


def _require(*names: str) -> None:
  for name in names:
    if not getattr(FLAGS, name):
      raise app.UsageError(f"--{name} is required with --mode={FLAGS.mode}.")


def _initialize_distributed() -> None:
  # jax.distributed (gloo collectives on CPU hosts), plus a watch that stops this process within ~20 s, naming the
  # lost process, when another stops responding (LVM_JAX_HEARTBEAT_TIMEOUT_S; see lvm_jax/parallel/distributed.py).
  from lvm_jax.parallel import distributed

  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)


def train() -> None:
  _require("config", "workdir")
  from lvm_jax.train import trainer

  trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)


def evaluate() -> None:
  _require("config", "workdir")
  from lvm_jax.train import trainer

  trainer.evaluate(FLAGS.config, FLAGS.workdir, step=FLAGS.step)


def predict() -> None:
  _require("image")
  if bool(FLAGS.pretrained) == bool(FLAGS.workdir):
    raise app.UsageError("--mode=predict needs exactly one of --pretrained (a checkpoint) and --workdir (a run).")
  if FLAGS.step is not None and not FLAGS.workdir:
    raise app.UsageError("--step picks a checkpoint of a run: it needs --workdir.")
  if FLAGS.workdir:  # what predict shows is the run's task's to say
    from lvm_jax import tasks

    task = tasks.task_of_workdir(FLAGS.workdir)
    options = dict(step=FLAGS.step, top_k=FLAGS.top_k, as_json=FLAGS.json, output=FLAGS.output)
    print(task.predict(FLAGS.workdir, FLAGS.image, min_score=FLAGS.min_score, **options))
    return
  from lvm_jax.weights import torchvision_detection

  if torchvision_detection.is_detector_file(FLAGS.pretrained):
    from lvm_jax.tasks.detection import predict as detection_predict

    detector = detection_predict.Detector.from_torchvision(FLAGS.pretrained)
    options = dict(as_json=FLAGS.json, output=FLAGS.output, min_score=FLAGS.min_score or 0.0)
    print(detection_predict.run(detector, FLAGS.image, **options))
    return
  if FLAGS.output is not None or FLAGS.min_score is not None:
    raise app.UsageError("--output and --min_score are for detectors; a classifier prints its top classes.")
  from lvm_jax.tasks import classify

  predictions = classify.classify(FLAGS.pretrained, FLAGS.image, top_k=FLAGS.top_k)[0]
  print(classify.format_predictions(predictions, as_json=FLAGS.json))


MODES = {"train": train, "eval": evaluate, "predict": predict}


def _show_traceback() -> bool:
  return (FLAGS["verbosity"].present and FLAGS.verbosity >= 1) or os.environ.get("LVM_JAX_TRACEBACK") == "1"


def _config_error(argv: list[str], e: Exception) -> str:
  """An unknown --config.KEY=VALUE as ml_collections reports it (a KeyError's repr inside an AttributeError,
  with a "Did you mean" hint), named by the argument that caused it."""
  text = str(e)
  key = re.search(r"(\w+)", text)
  hint = re.search(r'Did you mean "([\w.]+)"', text)
  culprits = [
    a.split("=")[0]
    for a in argv
    if a.startswith("--config.") and key and key.group(1) in a.split("=")[0].split(".")[1:]
  ]
  if not culprits:
    return f"config override: {' '.join(text.split())}"
  return f"{culprits[0]}: no such config key" + (f"; did you mean {hint.group(1)}?" if hint else ".")


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing with config errors (a recipe that does not exist or fails to load, an unknown
  --config.KEY override) as one line instead of a traceback."""
  for arg in argv[1:]:
    if arg.startswith("--config="):
      path = arg.split("=", 1)[1].split(":", 1)[0]
      if not os.path.isfile(path):
        raise SystemExit(f"error: --config={path}: no such file (recipes live under configs/, e.g. configs/digits.py).")
  try:
    return FLAGS(argv)
  except flags.Error as e:  # a bad flag value; a recipe that raised while loading appends its traceback
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    message = lines[0] + (f" {lines[-1]}" if len(lines) > 1 and "Traceback" in str(e) else "")
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    if os.environ.get("LVM_JAX_TRACEBACK") == "1":
      raise
    message = _config_error(argv, e)
  raise SystemExit(f"error: {message}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if not FLAGS["verbosity"].present:  # Orbax logs every file operation at INFO; the console has our lines
    logging.set_verbosity(logging.WARNING)
  from lvm_jax import errors

  try:
    if FLAGS.distributed:
      _initialize_distributed()
    MODES[FLAGS.mode]()
  except Exception as e:
    if _show_traceback() or not errors.is_user_error(e):
      raise
    if FLAGS.distributed:  # the other processes may wait for this one in a collective: tell them it stops
      from lvm_jax.parallel import distributed

      distributed.fail(type(e).__name__)
    raise SystemExit(f"error: {errors.one_line(e)}") from None  # one line on stderr, exit status 1


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
