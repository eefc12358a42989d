"""Every setting a training run reads, with its default: recipes under configs/ start from `defaults()` and set
what differs. `validate` checks a config against this schema before anything is built or compiled, so a typo
or a wrong type is an error naming the key, not a silently ignored setting.

Blocks whose keys belong to someone else are checked there: `model` (any argument of the model class, checked
by create_model), `data.train` / `data.eval` (make_source's arguments for the chosen kind), `optimizer`
(lvm_jax.train.optimizer.read_config), `mesh` (lvm_jax.parallel.mesh_shape) and `sharding` (get_strategy).
"""

import difflib
from typing import Any

import ml_collections
from ml_collections.config_dict import placeholder

from lvm_jax.train import optimizer as optimizer_lib

# Blocks passed on whole to the code that owns them (that code rejects unknown keys itself).
FREE_FORM = ("model_args", "data.train", "data.eval", "optimizer", "mesh", "sharding")
DTYPES = ("float32", "bfloat16", "float16")
# Settings whose None means something ("no evaluation", "the checkpoint's own normalization", "keep no best").
NULLABLE = ("data.eval", "data.normalize", "best_metric")
# Blocks a recipe edits in place (c.optimizer.lr = ...): --config.optimizer.KEY can only set a key the recipe's
# config still holds, so a recipe that assigns a new block (c.optimizer = dict(...)) loses every key it leaves out.
IN_PLACE = ("optimizer", "optimizer.schedule")


def defaults() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "classification"  # what the model learns: a name in lvm_jax.tasks.TASKS
  c.seed = 0

  # The model: a registered name plus argument overrides, or a checkpoint to fine-tune (then `model` is ignored
  # and the checkpoint's own architecture is used; `model_args` still override e.g. drop_path).
  c.model = "vit_ti16"
  c.model_args = ml_collections.ConfigDict()  # e.g. {"drop_path": 0.1, "image_size": 32}
  c.pretrained = placeholder(str)  # anything lvm_jax.from_pretrained accepts
  c.num_classes = placeholder(int)  # None: the training source's class count
  c.image_size = placeholder(int)  # None: the model's own; set for fine-tuning at a new resolution
  c.dtype = "float32"  # compute dtype; parameters and optimizer state stay float32

  c.data = ml_collections.ConfigDict()
  c.data.train = ml_collections.ConfigDict(dict(kind="digits", split="train"))  # make_source(**train)
  c.data.eval = ml_collections.ConfigDict(dict(kind="digits", split="test"))  # None: no evaluation
  c.data.pp_train = "decode|inception_crop(224)|flip_lr"
  c.data.pp_eval = "decode|resize_small(256)|central_crop(224)"
  # Normalization on the device (uint8 crosses to the device, a quarter of the bytes): a preset ("imagenet",
  # "inception") or None for the pretrained checkpoint's own mean/std. Ignored when the pp normalizes itself.
  c.data.normalize = "imagenet"
  c.data.batch_size = 128  # global, over all processes
  c.data.eval_batch_size = 0  # 0: same as batch_size
  # The train split is read as this many shards (0: one per process). A multiple of every process count the run
  # may use makes the global batches independent of the number of hosts (see data/pipeline.py).
  c.data.num_shards = 0
  c.data.shuffle_buffer = 10_000
  c.data.prefetch = 2

  c.num_steps = 0  # training length in steps; 0: from num_epochs
  c.num_epochs = 0.0
  c.label_smoothing = 0.0  # for integer labels (a pp with onehot(...) smooths itself)

  c.optimizer = optimizer_block()
  c.optimizer.lr = 1e-3
  c.optimizer.weight_decay = 0.05
  # config.task="detection" (lvm_jax/tasks/detection): the head on the backbone that model / pretrained give.
  c.detection = ml_collections.ConfigDict()
  c.detection.head = "retinanet"  # or "fcos"
  c.detection.version = "v1"  # RetinaNet: "v1" (L1 box loss, P6 from P5) or "v2" (GroupNorm heads, GIoU, P6 from C5)
  c.detection.fpn_channels = 256
  c.detection.anchor_size = 32  # the smallest anchor's side (P3), doubling each level (torchvision's 32)
  c.detection.frozen_batchnorm = True  # a pretrained ResNet's BatchNorm frozen, as torchvision's detectors
  c.detection.weights = placeholder(str)  # a torchvision detector checkpoint to start from (the whole network)
  c.detection.torchvision_arch = None  # its builder (..._fpn, ..._fpn_v2, fcos_resnet50_fpn); None: read off it
  c.detection.score_threshold = placeholder(float)  # None: torchvision's (RetinaNet 0.05, FCOS 0.2)
  c.detection.nms_threshold = placeholder(float)  # None: 0.5 / 0.6
  c.detection.topk_candidates = placeholder(int)  # None: 1000 a level
  c.detection.detections_per_img = placeholder(int)  # None: 300 / 100
  c.mesh = ml_collections.ConfigDict(dict(data=-1))
  # preset: "dp", "fsdp", "tp" or "fsdp_tp"; or rules=[(logical name, mesh axes), ...], fsdp_axis, fsdp_min_size
  c.sharding = ml_collections.ConfigDict(dict(preset="dp"))

  c.log_every_steps = 50
  c.eval_every_steps = 0  # 0: evaluate at the end only
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 3
  c.best_metric = "top1"  # eval metric whose best checkpoint is kept (None: off)
  c.async_checkpoints = True
  c.progress_bar = True  # shown only when a terminal is attached
  return c


# Types of the optimizer settings whose default is None ("off" / "the optimizer's own"), so that they can still be
# set from the command line (ml_collections cannot override a plain None).
_OPTIONAL_TYPES = dict(
  lr=float,
  eps=float,
  clip_norm=float,
  layer_decay=float,
  ema_decay=float,
  frozen=tuple,
  no_decay=tuple,
  total_steps=int,
  boundaries=tuple,
)


def _typed(block: dict) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({k: placeholder(_OPTIONAL_TYPES[k]) if v is None else v for k, v in block.items()})


def optimizer_block() -> ml_collections.ConfigDict:
  """Every key lvm_jax.train.optimizer reads, at its default: recipes set fields on it (rather than assigning a
  dict) so that any of them stays settable as --config.optimizer.KEY=VALUE."""
  block = _typed({k: v for k, v in optimizer_lib.DEFAULTS.items() if k != "schedule"})
  block.schedule = _typed(optimizer_lib.SCHEDULE_DEFAULTS)
  return block


def _flatten(config, prefix: str = "", blocks=None) -> dict[str, Any]:
  """{"data.batch_size": 128, ...}; free-form blocks stay whole. With `blocks` (the schema's block paths) an
  unknown block is one key too, so a typo in a block's name is one error, not one per key inside it."""
  out = {}
  for key, value in config.items():
    path = f"{prefix}{key}"
    is_block = isinstance(value, (ml_collections.ConfigDict, dict)) and path not in FREE_FORM
    if is_block and (path in blocks if blocks is not None else bool(value)):
      out.update(_flatten(value, path + ".", blocks))
    else:
      out[path] = value
  return out


def _type_ok(value, default) -> bool:
  if default is None or value is None:
    return True  # optional settings: their users check the value
  if isinstance(default, bool) or isinstance(value, bool):
    return isinstance(value, bool) and isinstance(default, bool)
  if isinstance(default, float):
    return isinstance(value, (int, float))
  if isinstance(default, (ml_collections.ConfigDict, dict)):
    return isinstance(value, (ml_collections.ConfigDict, dict))
  if isinstance(default, str) and not isinstance(value, str):
    return False
  return isinstance(value, type(default))


def set_path(tree, key: str, value, sep: str = ".") -> None:
  """tree["a"]["b"] = value for key "a.b" (a dict or ConfigDict; the parent blocks must exist)."""
  *parents, name = key.split(sep)
  for parent in parents:
    tree = tree[parent]
  tree[name] = value


def _replaced_blocks(config) -> list[str]:
  """Errors for IN_PLACE blocks of a ConfigDict config (a recipe: what the command line overrides) that lack
  keys of their default block, i.e. that a recipe replaced rather than edited. Plain dicts are Python callers'
  partial settings, replaced whole on purpose."""
  if not isinstance(config, ml_collections.ConfigDict):
    return []
  errors = []
  reference = defaults()
  for path in IN_PLACE:
    block, default = config, reference
    for name in path.split("."):
      block, default = (block.get(name) if isinstance(block, ml_collections.ConfigDict) else None), default[name]
    if not isinstance(block, ml_collections.ConfigDict):
      continue  # absent (the default applies) or the wrong type (reported as such)
    lost = [key for key in default if key not in block]
    if lost:
      errors.append(
        f"{path} was assigned a new block that lacks {', '.join(map(repr, lost))}, so "
        f"--config.{path}.KEY cannot set them: set fields of the default block instead "
        f"(c.{path}.KEY = VALUE, or c.{path}.update(KEY=VALUE, ...)), never c.{path} = {{...}}"
      )
  return errors


def validate(config) -> ml_collections.ConfigDict:
  """The config with defaults filled in; raises ValueError on unknown keys, wrong types or bad values."""
  schema = _flatten(defaults())
  blocks = {k.rsplit(".", 1)[0] for k in schema if "." in k}
  given = _flatten(config, blocks=blocks)
  errors = _replaced_blocks(config)
  for key, value in given.items():
    if key not in schema:
      close = difflib.get_close_matches(key, schema, n=1)
      errors.append(f"unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    elif value is None and schema[key] is not None and key not in NULLABLE:
      errors.append(f"{key}=None is not allowed: it should be of type {type(schema[key]).__name__}")
    elif not _type_ok(value, schema[key]):
      errors.append(f"{key}={value!r} should be of type {type(schema[key]).__name__}")
  if errors:
    raise ValueError("Config errors: " + "; ".join(errors) + ".")

  merged = defaults().to_dict()
  for key, value in given.items():  # free-form blocks replace the default block whole
    set_path(merged, key, value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value)
  full = ml_collections.ConfigDict(merged)

  if full.dtype not in DTYPES:
    raise ValueError(f"dtype={full.dtype!r} is not one of {DTYPES}.")
  if full.num_steps < 0 or full.num_epochs < 0:
    raise ValueError(f"num_steps and num_epochs must be >= 0, got {full.num_steps} and {full.num_epochs}.")
  if (full.num_steps > 0) == (full.num_epochs > 0):
    raise ValueError(
      f"Set exactly one of num_steps (> 0) and num_epochs (> 0); got num_steps={full.num_steps}, "
      f"num_epochs={full.num_epochs}."
    )
  for key in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
    if full[key] < 1:
      raise ValueError(f"{key} must be >= 1, got {full[key]}.")
  if full.eval_every_steps < 0:
    raise ValueError(f"eval_every_steps must be >= 0 (0: at the end only), got {full.eval_every_steps}.")
  if full.data.batch_size < 1 or full.data.eval_batch_size < 0:
    raise ValueError(
      f"data.batch_size must be >= 1 and data.eval_batch_size >= 0, got {full.data.batch_size} "
      f"and {full.data.eval_batch_size}."
    )
  if not 0.0 <= full.label_smoothing < 1.0:
    raise ValueError(f"label_smoothing must be in [0, 1), got {full.label_smoothing}.")
  if full.pretrained is None and full.data.normalize is None:
    raise ValueError("data.normalize=None means the pretrained checkpoint's mean/std, but no pretrained is set.")
  return full


def parse_arg(arg, **defaults_) -> ml_collections.ConfigDict:
  """A recipe's `:ARG` ("model=vit,runlocal") -> fields over `defaults_`; a bare name sets a bool flag.

  Values take the type of their default (bool from "true"/"false"/"1"/"0"); unknown names are errors.
  """
  values = dict(defaults_)
  for part in filter(None, (p.strip() for p in (arg or "").split(","))):
    name, has_value, text = part.partition("=")
    if name not in defaults_:
      raise ValueError(f"Unknown config argument {name!r} in {arg!r}; accepted: {', '.join(defaults_)}.")
    default = defaults_[name]
    if isinstance(default, bool):
      if has_value and text.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"Config argument {name}={text!r} should be true or false.")
      values[name] = not has_value or text.lower() in ("true", "1")
    elif not has_value:
      raise ValueError(f"Config argument {name!r} needs a value ({name}=...).")
    else:
      try:
        values[name] = type(default)(text) if default is not None else text
      except ValueError:
        raise ValueError(f"Config argument {name}={text!r} should be a {type(default).__name__}.") from None
  return ml_collections.ConfigDict(values)
