"""lvm_jax's own TensorFlow kernel for the input pipeline, built on first use with the machine's C++ compiler.

crop_resize.cc (beside this file) crops a column range of a uint8 image and resizes it bilinearly in one pass,
the training crop's hot path: with it the train pipeline of benchmarks/input_pipeline.py spends 867 instead of
926 us of CPU per image (2,200 vs 2,066 img/s on 2 cores, measured side by side). It is built
against the installed TensorFlow (tf.sysconfig's flags, ~15 s, once) into $LVM_JAX_CACHE (default
~/.cache/lvm_jax) under a name keyed by the source, TensorFlow's version and the flags. Where it cannot be built
(no compiler), or with LVM_JAX_NATIVE_OPS=0, crop_resize() is None and lvm_jax.data.ops uses TensorFlow's
kernels: the same crops, each value within one level.
"""

import functools
import hashlib
import os
import pathlib
import subprocess
import tempfile
import warnings
from typing import Callable, Optional

from lvm_jax.tf_host import tf

SOURCE = pathlib.Path(__file__).with_name("crop_resize.cc")


def _cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("LVM_JAX_CACHE") or pathlib.Path.home() / ".cache" / "lvm_jax")


def _build(command: list[str], library: pathlib.Path) -> None:
  """Compiles to a temporary file beside `library` and renames it, so concurrent processes never load half."""
  library.parent.mkdir(parents=True, exist_ok=True)
  handle, partial = tempfile.mkstemp(suffix=".so", dir=library.parent)
  os.close(handle)
  try:
    subprocess.run(command + ["-o", partial], check=True, capture_output=True, text=True, timeout=900)
    os.replace(partial, library)
  finally:
    if os.path.exists(partial):
      os.remove(partial)


@functools.cache
def crop_resize() -> Optional[Callable]:
  """The op crop_resize(image, left, crop_width, size), or None where the kernel cannot be built."""
  if os.environ.get("LVM_JAX_NATIVE_OPS", "1") == "0":
    return None
  compiler = os.environ.get("CXX", "c++")
  flags = ["-std=c++17", "-shared", "-fPIC", "-O3", "-ffp-contract=off", *tf.sysconfig.get_compile_flags()]
  link = tf.sysconfig.get_link_flags()
  key = hashlib.sha256("\0".join([SOURCE.read_text(), tf.__version__, compiler, *flags, *link]).encode())
  library = _cache_dir() / f"crop_resize-{key.hexdigest()[:16]}.so"
  try:
    if not library.exists():
      _build([compiler, str(SOURCE), *flags, *link], library)
    return tf.load_op_library(str(library)).lvm_crop_resize_bilinear
  except (OSError, subprocess.SubprocessError, tf.errors.OpError) as error:
    detail = getattr(error, "stderr", None) or str(error)
    warnings.warn(f"lvm_jax: could not build or load {SOURCE} with {compiler!r}; the input pipeline uses "
                  f"TensorFlow's resize instead (about 7% more CPU per image). {detail[-2000:]}")
    return None
