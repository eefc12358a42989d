"""EfficientNet tensor names and layouts in Hugging Face transformers checkpoints (EfficientNetForImageClassification,
EfficientNetModel: the port of the Keras weights; the names on disk, which transformers 5 keeps in memory too) and
in timm's (efficientnet_b*, trained in PyTorch, and tf_efficientnet_b*, ported from TF)."""

import re

from lvm_jax.models.efficientnet import HEAD_CHANNELS, STAGES, EfficientNet, conv_padding
from lvm_jax.weights.mapping import Tensor, conv_bn, square_size

HF_MODEL_TYPE = "efficientnet"
HF_PREFIX = "efficientnet."
HF_IGNORE = ("num_batches_tracked",)  # a training counter torch keeps; Flax's BatchNorm needs none

# B0's stages as EfficientNetConfig lists them; transformers lets a config change them, lvm_jax only scales them.
_HF_STAGES = dict(
  kernel_sizes=[d.kernel_size for d in STAGES],
  in_channels=[d.in_channels for d in STAGES],
  out_channels=[d.out_channels for d in STAGES],
  strides=[d.strides for d in STAGES],
  num_block_repeats=[d.repeats for d in STAGES],
  expand_ratios=[d.expand_ratio for d in STAGES],
)
# EfficientNetConfig's defaults (the google/efficientnet-b7 architecture), for config.json files that omit a field.
_HF_DEFAULTS = dict(
  num_channels=3,
  image_size=600,
  width_coefficient=2.0,
  depth_coefficient=3.1,
  depth_divisor=8,
  depthwise_padding=[],
  squeeze_expansion_ratio=0.25,
  hidden_act="swish",
  hidden_dim=2560,
  pooling_type="mean",
  batch_norm_eps=1e-3,
  dropout_rate=0.5,
  drop_connect_rate=0.2,
  **_HF_STAGES,
)


def hf_model_args(config: dict) -> dict:
  get = lambda field: config[field] if config.get(field) is not None else _HF_DEFAULTS[field]
  if get("num_channels") != 3:
    raise ValueError(f"EfficientNet config num_channels={get('num_channels')}: only RGB (3) is supported.")
  if get("hidden_act") not in ("swish", "silu"):
    raise ValueError(f"EfficientNet config hidden_act={get('hidden_act')!r} is not supported; lvm_jax uses SiLU.")
  if get("pooling_type") != "mean":
    raise ValueError(f"EfficientNet config pooling_type={get('pooling_type')!r} is not supported; expected 'mean'.")
  if get("squeeze_expansion_ratio") != 0.25:
    raise ValueError(
      f"EfficientNet config squeeze_expansion_ratio={get('squeeze_expansion_ratio')} is not supported; expected 0.25."
    )
  for field, base in _HF_STAGES.items():
    if list(get(field)) != base:
      raise ValueError(
        f"EfficientNet config {field}={list(get(field))} is not supported; lvm_jax scales B0's stages, {field}={base}."
      )
  # batch_norm_momentum is not read: transformers hands the Keras value (0.99) to torch, where it means the opposite,
  # and it acts in training only; bn_momentum keeps EfficientNet's default (TF's 0.99).
  args = dict(
    image_size=square_size(get("image_size"), "image_size"),
    width_multiplier=float(get("width_coefficient")),
    depth_multiplier=float(get("depth_coefficient")),
    depth_divisor=int(get("depth_divisor")),
    dropout=float(get("dropout_rate")),
    drop_path=float(get("drop_connect_rate")),
    padding="transformers",
    symmetric_blocks=tuple(int(n) for n in get("depthwise_padding")),
    bn_eps=float(get("batch_norm_eps")),
  )
  model = EfficientNet(**args)
  if get("hidden_dim") != model.channels(HEAD_CHANNELS):
    raise ValueError(
      f"EfficientNet config hidden_dim={get('hidden_dim')} differs from its head convolution's width "
      f"{model.channels(HEAD_CHANNELS)} (round_filters(1280)); transformers would fail on it."
    )
  for spec in model.block_specs():
    if spec.index == 0 and spec.has_residual:
      # transformers never adds the input back in a stage's first block; the paper (and timm, and lvm_jax) do when
      # the block keeps the resolution and the width, which this width_coefficient makes happen.
      raise ValueError(
        f"EfficientNet config width_coefficient={args['width_multiplier']}: block {spec.number} (the first of stage "
        f"{spec.stage}) keeps {spec.in_channels} channels at stride 1, where transformers leaves out the residual "
        "connection that lvm_jax (as the paper and timm) adds."
      )
  return args


def _se(ours: tuple, reduce: str, expand: str) -> list[Tensor]:
  p = ("params",) + ours + ("se",)
  return [
    Tensor(p + ("reduce", "kernel"), reduce + ".weight", "conv"),
    Tensor(p + ("reduce", "bias"), reduce + ".bias"),
    Tensor(p + ("expand", "kernel"), expand + ".weight", "conv"),
    Tensor(p + ("expand", "bias"), expand + ".bias"),
  ]


def _head(model: EfficientNet, name: str) -> list[Tensor]:
  if not model.num_classes:
    return []
  return [
    Tensor(("params", "head", "kernel"), name + ".weight", "linear"),
    Tensor(("params", "head", "bias"), name + ".bias"),
  ]


def hf_table(model: EfficientNet) -> list[Tensor]:
  e = HF_PREFIX
  table = conv_bn((), "stem_conv", "stem_bn", e + "embeddings.convolution", e + "embeddings.batchnorm")
  for spec in model.block_specs():
    ours, theirs = (spec.name,), f"{e}encoder.blocks.{spec.number}."
    if spec.expand_ratio != 1:
      table += conv_bn(
        ours, "expand_conv", "expand_bn", theirs + "expansion.expand_conv", theirs + "expansion.expand_bn"
      )
    dw = theirs + "depthwise_conv."
    table += conv_bn(ours, "dw_conv", "dw_bn", dw + "depthwise_conv", dw + "depthwise_norm")
    table += _se(ours, theirs + "squeeze_excite.reduce", theirs + "squeeze_excite.expand")
    pr = theirs + "projection."
    table += conv_bn(ours, "project_conv", "project_bn", pr + "project_conv", pr + "project_bn")
  table += conv_bn((), "head_conv", "head_bn", e + "encoder.top_conv", e + "encoder.top_bn")
  return table + _head(model, "classifier")


def _hf_symmetric_blocks(model: EfficientNet) -> list[int]:
  """transformers' depthwise_padding for `model`: its own list, or for padding "same" the stride-2 blocks whose
  input is odd at model.image_size (where SAME pads both sides alike)."""
  if model.padding == "transformers":
    return sorted(int(n) for n in model.symmetric_blocks)
  if model.padding == "symmetric":
    raise ValueError(
      "This EfficientNet has padding='symmetric' (timm's efficientnet_*); transformers pads its stride-2 "
      "convolutions as TF's SAME, so only padding='same' or 'transformers' can be saved in its format."
    )
  size = model.image_size
  if conv_padding("same", (size,), 3, 2) != ((0, 1),):
    raise ValueError(
      f"This EfficientNet has padding='same' and an odd image_size={size}: SAME pads its stem one pixel on both "
      "sides there, and transformers' stem always pads (0, 1), so it cannot be saved in transformers' format."
    )
  size, symmetric = -(-size // 2), []
  for spec in model.block_specs():
    if spec.strides == 2:
      if size % 2:
        symmetric.append(spec.number)
      size = -(-size // 2)
  return symmetric


def hf_config(model: EfficientNet) -> dict:
  """config.json fields of transformers' EfficientNet for `model`. A padding="same" model is saved with the
  depthwise_padding that SAME has at model.image_size: transformers then computes what lvm_jax does on inputs of
  that size (its padding does not follow the input's size, as SAME does)."""
  return dict(
    model_type=HF_MODEL_TYPE,
    architectures=["EfficientNetForImageClassification" if model.num_classes else "EfficientNetModel"],
    num_channels=3,
    image_size=model.image_size,
    width_coefficient=model.width_multiplier,
    depth_coefficient=model.depth_multiplier,
    depth_divisor=model.depth_divisor,
    **_HF_STAGES,
    depthwise_padding=_hf_symmetric_blocks(model),
    squeeze_expansion_ratio=0.25,
    hidden_act="swish",
    hidden_dim=model.channels(HEAD_CHANNELS),
    pooling_type="mean",
    batch_norm_eps=model.bn_eps,
    dropout_rate=model.dropout,
    drop_connect_rate=model.drop_path,
  )


# ---- timm ----

TIMM_IGNORE = ("num_batches_tracked",)
# timm's efficientnet_b<n> / tf_efficientnet_b<n>: (channel_multiplier, depth_multiplier), the paper's.
_TIMM_MULTIPLIERS = {
  "b0": (1.0, 1.0),
  "b1": (1.0, 1.1),
  "b2": (1.1, 1.2),
  "b3": (1.2, 1.4),
  "b4": (1.4, 1.8),
  "b5": (1.6, 2.2),
  "b6": (1.8, 2.6),
  "b7": (2.0, 3.1),
}
_TIMM_PADDINGS = {"": "symmetric", "same": "same"}  # timm's pad_type
# model_args this loader reads; anything else (act_layer, se_layer, stem_size, ...) builds another network.
_TIMM_ARGS = (
  "num_classes",
  "in_chans",
  "global_pool",
  "drop_rate",
  "drop_path_rate",
  "pad_type",
  "bn_eps",
  "channel_multiplier",
  "depth_multiplier",
)


def timm_model_args(architecture: str, model_args: dict, global_pool: str | None = None) -> dict:
  """EfficientNet arguments for timm's efficientnet_b0..b7 (PyTorch-trained: symmetric padding, BatchNorm eps 1e-5)
  and tf_efficientnet_b0..b7 (TF ports: SAME padding, eps 1e-3). timm's constructors fix the two multipliers; a
  config's model_args may still give channel_multiplier / depth_multiplier (what timm's _gen_efficientnet takes), to
  describe a scaled network such as lvm_jax's test fixtures."""
  match = re.fullmatch(r"(tf_)?efficientnet_(b[0-7])", architecture)
  if not match:
    raise ValueError(
      f"timm architecture {architecture!r} is not an EfficientNet this loader knows "
      "(efficientnet_b0..b7, tf_efficientnet_b0..b7)."
    )
  unknown = {k: v for k, v in model_args.items() if k not in _TIMM_ARGS}
  pool = model_args.get("global_pool", global_pool) or "avg"
  pad_type = model_args.get("pad_type", "same" if match.group(1) else "")
  in_chans = model_args.get("in_chans", 3)
  if unknown or pool != "avg" or in_chans != 3 or pad_type not in _TIMM_PADDINGS:
    raise ValueError(
      f"timm EfficientNet model_args not supported (3 input channels, average pooling, pad_type '' or 'same', and "
      f"no arguments but {', '.join(_TIMM_ARGS)}): "
      f"{unknown or dict(in_chans=in_chans, global_pool=pool, pad_type=pad_type)}."
    )
  width, depth = _TIMM_MULTIPLIERS[match.group(2)]
  return dict(
    width_multiplier=float(model_args.get("channel_multiplier", width)),
    depth_multiplier=float(model_args.get("depth_multiplier", depth)),
    dropout=float(model_args.get("drop_rate", 0.0)),
    drop_path=float(model_args.get("drop_path_rate", 0.0)),
    padding=_TIMM_PADDINGS[pad_type],
    bn_eps=float(model_args.get("bn_eps", 1e-3 if match.group(1) else 1e-5)),
  )


def timm_table(model: EfficientNet) -> list[Tensor]:
  table = conv_bn((), "stem_conv", "stem_bn", "conv_stem", "bn1")
  for spec in model.block_specs():
    ours, theirs = (spec.name,), f"blocks.{spec.stage}.{spec.index}."
    if spec.expand_ratio == 1:  # timm's DepthwiseSeparableConv: no expansion, conv_pw projects
      table += conv_bn(ours, "dw_conv", "dw_bn", theirs + "conv_dw", theirs + "bn1")
      table += _se(ours, theirs + "se.conv_reduce", theirs + "se.conv_expand")
      table += conv_bn(ours, "project_conv", "project_bn", theirs + "conv_pw", theirs + "bn2")
    else:  # InvertedResidual
      table += conv_bn(ours, "expand_conv", "expand_bn", theirs + "conv_pw", theirs + "bn1")
      table += conv_bn(ours, "dw_conv", "dw_bn", theirs + "conv_dw", theirs + "bn2")
      table += _se(ours, theirs + "se.conv_reduce", theirs + "se.conv_expand")
      table += conv_bn(ours, "project_conv", "project_bn", theirs + "conv_pwl", theirs + "bn3")
  table += conv_bn((), "head_conv", "head_bn", "conv_head", "bn2")
  return table + _head(model, "classifier")
