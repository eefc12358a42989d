"""TensorFlow for host-side work only (tf.data, tf.io.gfile, summaries).

Modules take `tf` from here rather than importing tensorflow themselves: TensorFlow would otherwise claim
every GPU (and reserve its memory) on its first op, leaving nothing for JAX. Importing lvm_jax's models and
train steps never imports TensorFlow at all, so they run where it is not installed.

lvm_jax declares no TensorFlow dependency (as tensorflow-datasets declares none), so that installing it on Colab
keeps the runtime's `tensorflow` instead of adding tensorflow-cpu beside it; the `tensorflow` extra adds one.
"""

import importlib.util
import os
import sys
import tempfile

# Start-up notices TensorFlow's C++ side prints on import before its logging is set up, so that
# TF_CPP_MIN_LOG_LEVEL cannot silence them; they say nothing about the run.
_IMPORT_NOTICES = ("All log messages before absl::InitializeLog() is called", "oneDNN custom operations are on")


def _import_tensorflow():
  """`import tensorflow` with its start-up notices dropped; anything else it prints reaches stderr."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      import tensorflow
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      for line in captured.read().decode("utf-8", "replace").splitlines(keepends=True):
        if not any(notice in line for notice in _IMPORT_NOTICES):
          sys.stderr.write(line)
      sys.stderr.flush()
  return tensorflow


MISSING_TENSORFLOW = (
  "lvm_jax's input pipeline (tf.data) needs TensorFlow, which is not installed: pip install tensorflow-cpu "
  '(or pip install "lvm_jax[tensorflow]"); Colab\'s GPU and CPU runtimes already have it.'
)

# Either distribution (tensorflow or tensorflow-cpu) provides the module. Checked before importing, so that a broken
# TensorFlow installation still reports its own error.
if importlib.util.find_spec("tensorflow") is None:
  raise ModuleNotFoundError(MISSING_TENSORFLOW, name="tensorflow")

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # tf.data feeds input only: its C++ INFO lines are noise
tf = _import_tensorflow()
tf.config.set_visible_devices([], "GPU")
