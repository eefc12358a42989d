"""The optimizer built from a config block: AdamW / SGD (Nesterov) / LAMB with warmup + decay, weight-decay
masks, global-norm clipping, layer-wise lr decay, frozen groups and gradient accumulation; plus the EMA update.

Parameters are addressed by their "/"-joined path in the (unboxed) params tree, e.g. "block_3/attn/query/kernel".
The model says which paths take no weight decay and which layer each is in (lvm_jax.models.param_groups); the
optimizer knows no model family.

Order of one update (per micro-batch call):
  cast grads to each param's dtype  (bf16 grads never make bf16 optimizer state; float32 params -> float32 state)
  -> frozen params: zero update, no state (optax.multi_transform + set_to_zero)
  -> trainable params: accumulate k micro-batches (optax.MultiSteps, mean) -> clip by global norm
     -> adamw | sgd | lamb (masked weight decay, scheduled lr) -> per-layer lr multiplier
"""

import difflib
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import optax

from lvm_jax.models import param_groups
from lvm_jax.train import schedules

NAMES = ("adamw", "sgd", "lamb")

# None means "not set": the optimizer's own default applies (see _DEFAULT_EPS) or the feature is off.
DEFAULTS = dict(
  name="adamw",
  lr=None,
  b1=0.9,
  b2=0.999,
  eps=None,
  momentum=0.9,
  nesterov=False,
  weight_decay=0.0,
  clip_norm=None,
  schedule=None,
  layer_decay=None,
  frozen=None,
  no_decay=None,
  accumulate_steps=1,
  ema_decay=None,
)
SCHEDULE_DEFAULTS = dict(
  warmup_steps=0, total_steps=None, decay="cosine", end_lr_fraction=0.0, boundaries=None, factor=0.1
)
_DEFAULT_EPS = dict(adamw=1e-8, lamb=1e-6)


def _checked_keys(block, defaults: dict, where: str) -> dict:
  """A plain dict of `block` over `defaults`; an unknown key is an error naming it and the accepted ones."""
  block = dict(block.items()) if block is not None else {}
  for key in block:
    if key not in defaults:
      close = difflib.get_close_matches(key, list(defaults), n=1)
      hint = f" Did you mean {close[0]!r}?" if close else ""
      raise ValueError(f"Unknown key {where}.{key}.{hint} Accepted keys: {', '.join(sorted(defaults))}.")
  return {**defaults, **{k: v for k, v in block.items()}}


def read_config(config) -> dict:
  """Validated optimizer settings from `config.optimizer` (or from the block itself) with defaults filled in.

  The train step reads `ema_decay` and `accumulate_steps` from here.
  """
  block = config["optimizer"] if "optimizer" in config else config
  cfg = _checked_keys(block, DEFAULTS, "optimizer")
  cfg["schedule"] = _checked_keys(cfg["schedule"], SCHEDULE_DEFAULTS, "optimizer.schedule")
  if cfg["name"] not in NAMES:
    raise ValueError(f"optimizer.name={cfg['name']!r} is not one of {NAMES}.")
  if cfg["lr"] is None or not cfg["lr"] > 0:
    raise ValueError(f"optimizer.lr must be set to the peak learning rate (> 0), got {cfg['lr']!r}.")
  if cfg["eps"] is None:
    cfg["eps"] = _DEFAULT_EPS.get(cfg["name"], 0.0)
  steps = cfg["accumulate_steps"]
  if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
    raise ValueError(f"optimizer.accumulate_steps must be an int >= 1, got {steps!r}.")
  if cfg["ema_decay"] is not None and not 0.0 <= cfg["ema_decay"] < 1.0:
    raise ValueError(f"optimizer.ema_decay must be None or in [0, 1), got {cfg['ema_decay']!r}.")
  if cfg["layer_decay"] is not None and not 0.0 < cfg["layer_decay"] <= 1.0:
    raise ValueError(f"optimizer.layer_decay must be None or in (0, 1], got {cfg['layer_decay']!r}.")
  cfg["weight_decay"] = cfg["weight_decay"] or 0.0
  if cfg["weight_decay"] < 0:
    raise ValueError(f"optimizer.weight_decay must be >= 0, got {cfg['weight_decay']!r}.")
  if cfg["clip_norm"] is not None and cfg["clip_norm"] < 0:
    raise ValueError(f"optimizer.clip_norm must be None, 0 (off) or > 0, got {cfg['clip_norm']!r}.")
  for key in ("frozen", "no_decay"):
    if isinstance(cfg[key], str):  # a lone string would be iterated character by character
      raise ValueError(f"optimizer.{key} must be a list of regexes, got the string {cfg[key]!r}.")
  return cfg


# --------------------------------------------------------------------------------------------- parameter paths


def _path_str(path) -> str:
  # Only dict keys name parameters; other entries (e.g. a Partitioned box's attribute) are not part of the name.
  return "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def param_paths(params) -> list[str]:
  """Every parameter's "/"-joined path, in tree order."""
  return [_path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(nn.meta.unbox(params))[0]]


def _map_paths(fn: Callable[[str], Any], tree):
  return jax.tree_util.tree_map_with_path(lambda p, _: fn(_path_str(p)), tree)


def _map_paths_values(fn: Callable[[str, Any], Any], tree):
  return jax.tree_util.tree_map_with_path(lambda p, x: fn(_path_str(p), x), tree)


def _compile_user_regexes(patterns, paths: list[str], key: str) -> list[re.Pattern]:
  """Compiled regexes; one that matches no parameter is an error (a typo must not silently do nothing)."""
  compiled = []
  for pattern in patterns:
    try:
      rx = re.compile(pattern)
    except re.error as e:
      raise ValueError(f"optimizer.{key}: {pattern!r} is not a valid regex: {e}.") from None
    if not any(rx.search(p) for p in paths):
      raise ValueError(
        f"optimizer.{key}: regex {pattern!r} matches no parameter. Some paths: "
        f"{', '.join(paths[:6])}, ... ({len(paths)} in all)."
      )
    compiled.append(rx)
  return compiled


def _matcher(regexes) -> Callable[[str], bool]:
  return lambda path: any(rx.search(path) for rx in regexes)


def default_no_decay(model=None) -> tuple[str, ...]:
  """The model's no_weight_decay() regexes; biases and norm scales for a model that gives none (or no model)."""
  describe = getattr(model, "no_weight_decay", None)
  return tuple(describe()) if describe is not None else param_groups.NO_WEIGHT_DECAY


def weight_decay_mask(params, no_decay=None, model=None):
  """Tree of bools over `params`: True where weight decay applies (every path matching no `no_decay` regex).

  `no_decay=None` uses the model's patterns (default_no_decay); a user-given list replaces them and each regex
  must match something.
  """
  paths = param_paths(params)
  if no_decay is None:
    regexes = [re.compile(p) for p in default_no_decay(model)]
  else:
    regexes = _compile_user_regexes(no_decay, paths, "no_decay")
  excluded = _matcher(regexes)
  return _map_paths(lambda p: not excluded(p), nn.meta.unbox(params))


# ---------------------------------------------------------------------------------------- layer-wise lr decay


def layer_ids(params, model) -> tuple[dict[str, int], int]:
  """(path -> layer id, number of ids), from the model's layer_id / num_layer_ids (models/param_groups.py):
  embeddings 0, then the blocks or stages in order, the head the last id."""
  if not isinstance(model, param_groups.ParamGroups):
    raise ValueError(
      f"optimizer.layer_decay needs the model's layer ids: pass make_optimizer a model with "
      f"layer_id, num_layer_ids and no_weight_decay (lvm_jax.models.param_groups), not "
      f"{type(model).__name__}."
    )
  try:
    ids = {p: model.layer_id(p) for p in param_paths(params)}
  except ValueError as e:
    raise ValueError(f"optimizer.layer_decay: {e}") from None
  unknown = [p for p, i in ids.items() if i is None]
  if unknown:  # a new parameter must get an explicit id rather than a silent guess
    raise ValueError(
      f"optimizer.layer_decay: {type(model).__name__}.layer_id gives no id for parameters {unknown[:5]}."
    )
  return ids, model.num_layer_ids()


def _multipliers(params, layer_decay: float, model) -> dict[str, float]:
  ids, n = layer_ids(params, model)
  return {p: float(layer_decay) ** (n - 1 - i) for p, i in ids.items()}


def layer_decay_multipliers(params, layer_decay: float, model):
  """Tree of floats over `params`: layer_decay ** (num_ids - 1 - id), so the head gets 1 and embeddings the least."""
  multipliers = _multipliers(params, layer_decay, model)
  return _map_paths(lambda p: multipliers[p], nn.meta.unbox(params))


def _scale_by_path(multipliers: dict[str, float]) -> optax.GradientTransformation:
  """Multiplies each update by a fixed per-path factor (after the lr: scales lr and decoupled decay alike)."""

  def update(updates, state, params=None):
    del params
    return _map_paths_values(lambda p, u: u * multipliers[p], updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _cast_to_param_dtype() -> optax.GradientTransformation:
  """Grads take their parameter's dtype before anything sees them, so state never inherits bf16 from grads."""

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("The optimizer needs params: call tx.update(grads, opt_state, params).")
    return jax.tree.map(lambda u, p: u.astype(p.dtype), updates, params), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


# ------------------------------------------------------------------------------------------------ the builder


def make_optimizer(config, params, model=None):
  """(optax transformation, schedule_fn) from `config.optimizer` (or an optimizer block given directly).

  `params`: the (boxed or unboxed) params tree, or its abstract shapes; used for masks, layer ids and to check
  that every user regex matches. `model`: what the params belong to; it gives the no-weight-decay patterns and
  the layer ids of layer-wise lr decay (models/param_groups.py). Without it only biases and norm scales are
  kept from weight decay, and layer_decay is an error.
  `schedule_fn(step)` is the lr at optimizer step `step` (before layer decay).
  `optimizer.lr` is the peak lr as given (no batch-size scaling is applied here).
  Call `tx.update(grads, state, params)` with unboxed params; with accumulate_steps=k, call it on every
  micro-batch: it returns zero updates for k-1 calls and the update of the mean gradient on the k-th.
  """
  cfg = read_config(config)
  params = nn.meta.unbox(params)
  paths = param_paths(params)
  s = cfg["schedule"]
  schedule_fn = schedules.warmup_then_decay(
    cfg["lr"],
    warmup_steps=s["warmup_steps"],
    total_steps=s["total_steps"],
    decay=s["decay"],
    end_lr_fraction=s["end_lr_fraction"],
    boundaries=s["boundaries"] or (),
    factor=s["factor"],
  )
  # Masks are functions of the (possibly multi_transform-masked) tree so they fit whatever tree optax hands them.
  decay_tree = weight_decay_mask(params, cfg["no_decay"], model)
  decayed = {p for p, d in zip(paths, jax.tree.leaves(decay_tree)) if d}
  mask_fn = lambda tree: _map_paths(lambda p: p in decayed, tree)

  name, wd = cfg["name"], cfg["weight_decay"]
  if name == "adamw":
    base = optax.adamw(schedule_fn, b1=cfg["b1"], b2=cfg["b2"], eps=cfg["eps"], weight_decay=wd, mask=mask_fn)
  elif name == "lamb":
    base = optax.lamb(schedule_fn, b1=cfg["b1"], b2=cfg["b2"], eps=cfg["eps"], weight_decay=wd, mask=mask_fn)
  else:  # coupled L2 (added to the gradient before momentum), as torch.optim.SGD's weight_decay
    base = optax.chain(
      optax.add_decayed_weights(wd, mask=mask_fn),
      optax.sgd(schedule_fn, momentum=cfg["momentum"] or None, nesterov=bool(cfg["nesterov"])),
    )

  parts = []
  if cfg["clip_norm"]:
    parts.append(optax.clip_by_global_norm(cfg["clip_norm"]))
  parts.append(base)
  if cfg["layer_decay"] is not None:
    parts.append(_scale_by_path(_multipliers(params, cfg["layer_decay"], model)))
  trainable = optax.chain(*parts)
  if cfg["accumulate_steps"] > 1:
    # Clipping sits inside, so it sees the mean gradient of the whole effective batch.
    trainable = optax.MultiSteps(trainable, every_k_schedule=cfg["accumulate_steps"])

  if cfg["frozen"]:
    is_frozen = _matcher(_compile_user_regexes(cfg["frozen"], paths, "frozen"))
    if all(is_frozen(p) for p in paths):
      raise ValueError(f"optimizer.frozen={list(cfg['frozen'])} freezes every parameter.")
    labels = lambda tree: _map_paths(lambda p: "frozen" if is_frozen(p) else "trainable", tree)
    trainable = optax.multi_transform({"trainable": trainable, "frozen": optax.set_to_zero()}, labels)
  return optax.chain(_cast_to_param_dtype(), trainable), schedule_fn


def frozen_mask(params, frozen) -> Any:
  """Tree of bools over `params`: True where a `frozen` regex matches (each regex must match something)."""
  params = nn.meta.unbox(params)
  is_frozen = _matcher(_compile_user_regexes(frozen or (), param_paths(params), "frozen"))
  return _map_paths(is_frozen, params)


# ------------------------------------------------------------------------------------------------------- EMA


def ema_update(ema_params, params, decay):
  """decay * ema + (1 - decay) * params, leaf by leaf, keeping the EMA's dtype. Pure; `decay` may be traced."""
  return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p.astype(e.dtype)).astype(e.dtype), ema_params, params)
