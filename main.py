r"""The lvm_jax command line. Kept short on purpose: it parses flags and calls into lvm_jax.

  python main.py --mode=predict --pretrained=google/vit-base-patch16-224 --image=cat.jpg [--top_k=5] [--json]
"""

from absl import app
from absl import flags

from lvm_jax.tasks import classify

flags.DEFINE_enum("mode", "predict", ["predict"], "What to run.")
flags.DEFINE_string("pretrained", None, "predict: a checkpoint lvm_jax.load_checkpoint reads (Hugging Face or timm "
                    "folder or hub id, big_vision .npz file).")
flags.DEFINE_string("image", None, "predict: the image file to classify.")
flags.DEFINE_integer("top_k", 5, "predict: how many classes to print.", lower_bound=1)
flags.DEFINE_bool("json", False, "predict: print a JSON list of {label, index, probability}.")
FLAGS = flags.FLAGS


def predict() -> None:
  for name in ("pretrained", "image"):
    if not getattr(FLAGS, name):
      raise app.UsageError(f"--{name} is required with --mode=predict.")
  try:
    predictions = classify.classify(FLAGS.pretrained, FLAGS.image, top_k=FLAGS.top_k)[0]
  except (OSError, ValueError) as e:  # a bad file or checkpoint: the message says which and why
    raise SystemExit(f"error: {e}") from None
  print(classify.format_predictions(predictions, as_json=FLAGS.json))


MODES = {"predict": predict}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  MODES[FLAGS.mode]()


if __name__ == "__main__":
  app.run(main)
