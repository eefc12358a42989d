"""main.py run in the test process, as the CLI tests drive it."""

import contextlib
import io
import sys

from absl import flags

import main


def run_main_in_process(*args) -> str:
  """main.main in this process with the given flags; returns what it printed. ml_collections reads the
  --config.KEY=VALUE overrides from sys.argv, not from the list given to FLAGS, so sys.argv is set too, and it
  defines one flag per override while parsing, which a second parse in the same process would define again."""
  argv = ["main.py", *args]
  saved_argv, sys.argv = sys.argv, argv
  printed = io.StringIO()
  try:
    with contextlib.redirect_stdout(printed):
      main.main(flags.FLAGS(argv))
  finally:
    sys.argv = saved_argv
    flags.FLAGS.unparse_flags()
    for name in [n for n in flags.FLAGS if n.startswith("config.")]:
      delattr(flags.FLAGS, name)
  return printed.getvalue()
