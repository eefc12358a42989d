"""Preprocessing strings ("pp", as in big_vision) -> lists of ops.

    parse("decode|inception_crop(224)|flip_lr|randaugment(2, 9)|normalize('imagenet')|onehot(1000)")

An op is `name` or `name(args)` with Python literal arguments, positional and keyword; a spec is one
"|"-separated string or a list of them. Names resolve through the explicit OPS table below (no registry
filled by imports), and arguments are read with ast.literal_eval, so a pp string can never run code.
Batch-level ops (mixup, cutmix) come back marked: is_batch_op(op) tells the pipeline to apply them after
batching.
"""

import ast
import difflib
import inspect
from typing import Callable, Sequence, Union

from lvm_jax.data import detection_ops, mix, ops, randaugment

OPS: dict[str, Callable] = {
  "decode": ops.decode,
  "resize": ops.resize,
  "resize_small": ops.resize_small,
  "central_crop": ops.central_crop,
  "center_crop_fraction": ops.center_crop_fraction,
  "inception_crop": ops.inception_crop,
  "decode_inception_crop": ops.decode_inception_crop,
  "flip_lr": ops.flip_lr,
  "normalize": ops.normalize,
  "value_range": ops.value_range,
  "onehot": ops.onehot,
  "randaugment": randaugment.randaugment,
  "mixup": mix.mixup,
  "cutmix": mix.cutmix,
  "mixup_cutmix": mix.mixup_cutmix,
  # Detection: boxes move with the pixels (lvm_jax/data/detection_ops.py).
  "det_decode": detection_ops.det_decode,
  "det_resize_pad": detection_ops.det_resize_pad,
  "det_flip_lr": detection_ops.det_flip_lr,
  "det_scale_jitter": detection_ops.det_scale_jitter,
  "det_pad_boxes": detection_ops.det_pad_boxes,
}
BATCH_OPS = frozenset({"mixup", "cutmix", "mixup_cutmix"})


def is_batch_op(op: Callable) -> bool:
  """Whether `op` works on a batch (after batching) rather than on one example."""
  return bool(getattr(op, "batch_op", False))


def parse(spec: Union[str, Sequence[str]]) -> list[Callable[[dict], dict]]:
  """The ops of a pp string (or a list of them), in order."""
  if isinstance(spec, str):
    spec = [spec]
  elif not all(isinstance(s, str) for s in spec):
    raise TypeError(f"pp spec must be a string or a list of strings, got {spec!r}.")
  return [parse_op(part) for s in spec for part in _split(s)]


def _split(spec: str) -> list[str]:
  """Splits on "|" outside quotes and brackets, so normalize('a|b') stays one op; empty parts are skipped."""
  parts, depth, quote, start = [], 0, None, 0
  for i, ch in enumerate(spec):
    if quote:
      quote = None if ch == quote else quote
    elif ch in "'\"":
      quote = ch
    elif ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    elif ch == "|" and depth == 0:
      parts.append(spec[start:i])
      start = i + 1
  parts.append(spec[start:])
  return [p.strip() for p in parts if p.strip()]


def parse_op(text: str) -> Callable[[dict], dict]:
  """One op from `name` or `name(literal args)`."""
  try:
    node = ast.parse(text.strip(), mode="eval").body
  except SyntaxError:
    raise ValueError(f"pp op {text!r} is not `name` or `name(args)` with Python literal arguments.") from None
  call = node if isinstance(node, ast.Call) else None
  name_node = call.func if call else node
  if not isinstance(name_node, ast.Name):
    raise ValueError(f"pp op {text!r} is not `name` or `name(args)` with Python literal arguments.")
  name = name_node.id
  if name not in OPS:
    close = difflib.get_close_matches(name, OPS, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"known ops: {', '.join(sorted(OPS))}."
    raise ValueError(f"Unknown pp op {name!r} in {text!r}; {hint}")
  factory = OPS[name]
  args, kwargs = [], {}
  if call:
    try:
      args = [ast.literal_eval(a) for a in call.args]
      kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    except ValueError:
      raise ValueError(
        f"pp op {text!r}: arguments must be Python literals (numbers, strings, tuples, lists, "
        f"None, True/False); {name} accepts {name}{inspect.signature(factory)}."
      ) from None
    if any(k.arg is None for k in call.keywords):
      raise ValueError(f"pp op {text!r}: **kwargs are not allowed; {name} accepts {name}{inspect.signature(factory)}.")
  try:
    inspect.signature(factory).bind(*args, **kwargs)
  except TypeError as e:
    raise ValueError(f"pp op {text!r}: {e}; {name} accepts {name}{inspect.signature(factory)}.") from None
  try:
    op = factory(*args, **kwargs)
  except (TypeError, ValueError) as e:
    raise ValueError(f"pp op {text!r}: {e} ({name} accepts {name}{inspect.signature(factory)}).") from None
  op.pp_name = name
  return op
