"""lvm_jax's own TensorFlow kernels for the input pipeline, built on first use with the machine's C++ compiler.

Beside this file: crop_resize.cc crops a column range of a uint8 image and resizes it bilinearly in one pass;
crop_box.cc computes the inception crop's box, ~100 graph ops as TensorFlow ops. They are the training crop's
hot path (the measurements are in docs/performance.md). The library is built against the installed
TensorFlow (tf.sysconfig's flags, once) into $LVM_JAX_CACHE (default ~/.cache/lvm_jax) under a name
keyed by the sources, TensorFlow's version and the flags. Where it cannot be built (no compiler), or with
LVM_JAX_NATIVE_OPS=0, library() is None and lvm_jax.data.ops uses TensorFlow's ops: the same crop windows,
each resized value within one level."""

import functools
import hashlib
import os
import pathlib
import subprocess
import tempfile
import warnings
from lvm_jax.tf_host import tf

SOURCES = tuple(pathlib.Path(__file__).with_name(name) for name in ("crop_resize.cc", "crop_box.cc"))


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
def library():
  """The loaded kernels (ops lvm_crop_resize_bilinear and lvm_inception_crop_box), or None where they cannot be
  built."""
  if os.environ.get("LVM_JAX_NATIVE_OPS", "1") == "0":
    return None
  compiler = os.environ.get("CXX", "c++")
  flags = ["-std=c++17", "-shared", "-fPIC", "-O3", "-ffp-contract=off", *tf.sysconfig.get_compile_flags()]
  link = tf.sysconfig.get_link_flags()
  key = hashlib.sha256("\0".join([*(s.read_text() for s in SOURCES), tf.__version__, compiler, *flags, *link]).encode())
  path = _cache_dir() / f"lvm_jax_ops-{key.hexdigest()[:16]}.so"
  try:
    if not path.exists():
      _build([compiler, *map(str, SOURCES), *flags, *link], path)
    return tf.load_op_library(str(path))
  except (OSError, subprocess.SubprocessError, tf.errors.OpError) as error:
    detail = getattr(error, "stderr", None) or str(error)
    warnings.warn(
      f"lvm_jax: could not build or load {', '.join(s.name for s in SOURCES)} with {compiler!r}; the "
      f"input pipeline uses TensorFlow's ops instead (the same crops, at a higher CPU cost per training image). "
      f"{detail[-2000:]}"
    )
    return None
