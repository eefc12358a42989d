"""Which exceptions are a user's to fix (a config, a file, a workdir) rather than a bug, for the CLI to print
as one line instead of a traceback."""


class UserError(Exception):
  """Base of lvm_jax's own errors that a user fixes by changing an input or a setting."""


# ValueError / OSError: what every loader and validator here raises for bad input, with the file or key named;
# FloatingPointError: a diverged run (lvm_jax.train.trainer.NonFiniteLossError).
_USER_ERROR_TYPES = (UserError, ValueError, OSError, FloatingPointError)


def is_user_error(e: BaseException) -> bool:
  if isinstance(e, _USER_ERROR_TYPES):
    return True
  # tf.io.gfile's errors (a missing bucket, a denied write) without importing TensorFlow here.
  return any(c.__name__ == "OpError" and c.__module__.startswith("tensorflow") for c in type(e).__mro__)


def one_line(e: BaseException) -> str:
  """The message's first line (TensorFlow's errors append pages of context)."""
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  return lines[0] if lines else type(e).__name__
