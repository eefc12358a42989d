"""The optimizer built from a config block: AdamW / SGD (Nesterov) / LAMB with warmup + decay, weight-decay
masks, global-norm clipping, layer-wise lr decay, frozen groups and gradient accumulation; plus the EMA update.

Parameters are addressed by their "/"-joined path in the (unboxed) params tree, e.g. "block_3/attn/query/kernel".

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

from lvm_jax.train import schedules

NAMES = ("adamw", "sgd", "lamb")

# None means "not set": the optimizer's own default applies (see _DEFAULT_EPS) or the feature is off.
DEFAULTS = dict(name="adamw", lr=None, b1=0.9, b2=0.999, eps=None, momentum=0.9, nesterov=False,
                weight_decay=0.0, clip_norm=None, schedule=None, layer_decay=None, frozen=None, no_decay=None,
                accumulate_steps=1, ema_decay=None)
SCHEDULE_DEFAULTS = dict(warmup_steps=0, total_steps=None, decay="cosine", end_lr_fraction=0.0)
_DEFAULT_EPS = dict(adamw=1e-8, lamb=1e-6)

# No weight decay on biases, norm (LayerNorm/BatchNorm) scales, position embeddings, class token and Swin's
# relative position bias: decaying them hurts accuracy (ViT/Swin/ResNet recipes all exclude them).
DEFAULT_NO_DECAY = (r"(^|/)bias$", r"(^|/)scale$", r"(^|/)pos_embed$", r"(^|/)cls_token$",
                    r"(^|/)relative_position_bias_table$")


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
      raise ValueError(f"optimizer.{key}: regex {pattern!r} matches no parameter. Some paths: "
                       f"{', '.join(paths[:6])}, ... ({len(paths)} in all).")
    compiled.append(rx)
  return compiled


def _matcher(regexes) -> Callable[[str], bool]:
  return lambda path: any(rx.search(path) for rx in regexes)


def weight_decay_mask(params, no_decay=None):
  """Tree of bools over `params`: True where weight decay applies (every path matching no `no_decay` regex).

  `no_decay=None` uses DEFAULT_NO_DECAY; a user-given list replaces it and each regex must match something.
  """
  paths = param_paths(params)
  if no_decay is None:
    regexes = [re.compile(p) for p in DEFAULT_NO_DECAY]
  else:
    regexes = _compile_user_regexes(no_decay, paths, "no_decay")
  excluded = _matcher(regexes)
  return _map_paths(lambda p: not excluded(p), nn.meta.unbox(params))


# ---------------------------------------------------------------------------------------- layer-wise lr decay

_VIT_BLOCK = re.compile(r"^block_(\d+)(/|$)")
_STAGE_BLOCK = re.compile(r"^stage_(\d+)_block_(\d+)(/|$)")
_SWIN_MERGE = re.compile(r"^merge_(\d+)(/|$)")


def _family(top_names: set[str]) -> str:
  if "stem_conv" in top_names:
    return "resnet"
  if any(_STAGE_BLOCK.match(n) for n in top_names) and "patch_embed" in top_names:
    return "swin"
  if any(_VIT_BLOCK.match(n) for n in top_names):
    return "vit"
  if "blocks" in top_names and "patch_embed" in top_names:
    raise ValueError("optimizer.layer_decay needs one parameter subtree per block; a ViT built with "
                     "scan_layers=True stacks them (params['blocks']): train it with scan_layers=False, or "
                     "set optimizer.layer_decay to None.")
  raise ValueError(f"optimizer.layer_decay: cannot tell the model family (ViT, Swin, ResNet) from the top-level "
                   f"parameter names {sorted(top_names)}.")


def layer_ids(params) -> tuple[dict[str, int], int]:
  """(path -> layer id, number of ids). Embeddings get 0, the head (with the final norm) the last id.

  ViT: patch_embed/pos_embed/cls_token 0, block_i i+1, norm/fc_norm/pre_logits/head depth+1.
  Swin: patch_embed/patch_norm 0, stage_s_block_i numbered 1.. in order over stages, merge_s (which runs after
  stage s) the id of stage s's last block, norm/head the last id.
  ResNet: stem 0, stage_s s+1 (a stage shares one id, as in the usual ResNet fine-tuning recipes), head last.
  """
  paths = param_paths(params)
  tops = {p.split("/")[0] for p in paths}
  family = _family(tops)
  # Each top-level module's id; every parameter takes the id of the module it lives in.
  if family == "vit":
    body = {t: int(m.group(1)) + 1 for t in tops if (m := _VIT_BLOCK.match(t))}
    embed, head = {"patch_embed", "pos_embed", "cls_token"}, {"norm", "fc_norm", "pre_logits", "head"}
  else:
    blocks = sorted((int(m.group(1)), int(m.group(2)), t) for t in tops if (m := _STAGE_BLOCK.match(t)))
    if family == "swin":
      body = {t: i + 1 for i, (_, _, t) in enumerate(blocks)}  # one id per block, counted across stages
      stage_last = {s: body[t] for s, _, t in blocks}  # sorted: the last write is the stage's last block
      body.update({t: stage_last[int(m.group(1))] for t in tops if (m := _SWIN_MERGE.match(t))})
      embed, head = {"patch_embed", "patch_norm"}, {"norm", "head"}
    else:
      body = {t: s + 1 for s, _, t in blocks}  # one id per stage
      embed, head = {"stem_conv", "stem_bn"}, {"head"}
  last = max(body.values())
  top_ids = {**body, **{t: 0 for t in embed}, **{t: last + 1 for t in head}}
  of = lambda path: top_ids.get(path.split("/")[0])

  ids = {p: of(p) for p in paths}
  unknown = [p for p, i in ids.items() if i is None]
  if unknown:  # a new parameter must get an explicit id rather than a silent guess
    raise ValueError(f"optimizer.layer_decay: no layer id for {family} parameters {unknown[:5]}.")
  return ids, last + 2


def _multipliers(params, layer_decay: float) -> dict[str, float]:
  ids, n = layer_ids(params)
  return {p: float(layer_decay) ** (n - 1 - i) for p, i in ids.items()}


def layer_decay_multipliers(params, layer_decay: float):
  """Tree of floats over `params`: layer_decay ** (num_ids - 1 - id), so the head gets 1 and embeddings the least."""
  multipliers = _multipliers(params, layer_decay)
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

def make_optimizer(config, params):
  """(optax transformation, schedule_fn) from `config.optimizer` (or an optimizer block given directly).

  `params`: the (boxed or unboxed) params tree, or its abstract shapes; used for masks, layer ids and to check
  that every user regex matches. `schedule_fn(step)` is the lr at optimizer step `step` (before layer decay).
  `optimizer.lr` is the peak lr as given (no batch-size scaling is applied here).
  Call `tx.update(grads, state, params)` with unboxed params; with accumulate_steps=k, call it on every
  micro-batch: it returns zero updates for k-1 calls and the update of the mean gradient on the k-th.
  """
  cfg = read_config(config)
  params = nn.meta.unbox(params)
  paths = param_paths(params)
  s = cfg["schedule"]
  schedule_fn = schedules.warmup_then_decay(cfg["lr"], warmup_steps=s["warmup_steps"], total_steps=s["total_steps"],
                                            decay=s["decay"], end_lr_fraction=s["end_lr_fraction"])
  # Masks are functions of the (possibly multi_transform-masked) tree so they fit whatever tree optax hands them.
  decay_tree = weight_decay_mask(params, cfg["no_decay"])
  decayed = {p for p, d in zip(paths, jax.tree.leaves(decay_tree)) if d}
  mask_fn = lambda tree: _map_paths(lambda p: p in decayed, tree)

  name, wd = cfg["name"], cfg["weight_decay"]
  if name == "adamw":
    base = optax.adamw(schedule_fn, b1=cfg["b1"], b2=cfg["b2"], eps=cfg["eps"], weight_decay=wd, mask=mask_fn)
  elif name == "lamb":
    base = optax.lamb(schedule_fn, b1=cfg["b1"], b2=cfg["b2"], eps=cfg["eps"], weight_decay=wd, mask=mask_fn)
  else:  # coupled L2 (added to the gradient before momentum), as torch.optim.SGD's weight_decay
    base = optax.chain(optax.add_decayed_weights(wd, mask=mask_fn),
                       optax.sgd(schedule_fn, momentum=cfg["momentum"] or None, nesterov=bool(cfg["nesterov"])))

  parts = []
  if cfg["clip_norm"]:
    parts.append(optax.clip_by_global_norm(cfg["clip_norm"]))
  parts.append(base)
  if cfg["layer_decay"] is not None:
    parts.append(_scale_by_path(_multipliers(params, cfg["layer_decay"])))
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
  return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p.astype(e.dtype)).astype(e.dtype),
                      ema_params, params)
