"""ConvNeXt tensor names and layouts in Hugging Face transformers checkpoints (ConvNextForImageClassification,
ConvNextModel; the names on disk, which transformers 5 keeps in memory too) and in timm's (convnext_*)."""

import re

from lvm_jax.models.convnext import ConvNeXt
from lvm_jax.weights.mapping import Tensor, dense, norm, square_size

HF_MODEL_TYPE = "convnext"
HF_PREFIX = "convnext."
HF_IGNORE = ()
# transformers builds the stem, block and downsampling norms with eps 1e-6 whatever the config says; its
# layer_norm_eps is the final norm's only.
HF_INNER_NORM_EPS = 1e-6

# ConvNextConfig's defaults (the facebook/convnext-tiny-224 architecture), for config.json files that omit a field.
_HF_DEFAULTS = dict(
  num_channels=3,
  patch_size=4,
  hidden_sizes=(96, 192, 384, 768),
  depths=(3, 3, 9, 3),
  hidden_act="gelu",
  layer_norm_eps=1e-12,
  layer_scale_init_value=1e-6,
  drop_path_rate=0.0,
  image_size=224,
)


def hf_model_args(config: dict) -> dict:
  get = lambda field: config[field] if config.get(field) is not None else _HF_DEFAULTS[field]
  if get("hidden_act") != "gelu":
    raise ValueError(f"ConvNeXt config hidden_act={get('hidden_act')!r} is not supported; lvm_jax uses exact 'gelu'.")
  if get("num_channels") != 3:
    raise ValueError(f"ConvNeXt config num_channels={get('num_channels')}: only RGB (3) is supported.")
  depths, dims = tuple(get("depths")), tuple(get("hidden_sizes"))
  stages = config.get("num_stages", len(depths))
  if not len(depths) == len(dims) == stages:
    raise ValueError(
      f"ConvNeXt config depths={list(depths)}, hidden_sizes={list(dims)} and num_stages={stages} "
      "must agree on the number of stages."
    )
  return dict(
    image_size=square_size(get("image_size"), "image_size"),
    patch_size=square_size(get("patch_size"), "patch_size"),
    depths=depths,
    dims=dims,
    layer_scale_init=float(get("layer_scale_init_value")),
    drop_path=float(get("drop_path_rate")),
    layer_norm_eps=HF_INNER_NORM_EPS,
    head_norm_eps=float(get("layer_norm_eps")),
  )


# Where each of our parameters lives in a state dict: transformers' names, timm's.
_HF_NAMES = dict(
  stem="convnext.embeddings.patch_embeddings",
  stem_norm="convnext.embeddings.layernorm",
  stage="convnext.encoder.stages.{}.",
  downsample_norm="downsampling_layer.0",
  downsample_conv="downsampling_layer.1",
  block="layers.{}.",
  dwconv="dwconv",
  norm="layernorm",
  pwconv1="pwconv1",
  pwconv2="pwconv2",
  layer_scale="layer_scale_parameter",
  final_norm="convnext.layernorm",
  head="classifier",
)
_TIMM_NAMES = dict(
  stem="stem.0",
  stem_norm="stem.1",
  stage="stages.{}.",
  downsample_norm="downsample.0",
  downsample_conv="downsample.1",
  block="blocks.{}.",
  dwconv="conv_dw",
  norm="norm",
  pwconv1="mlp.fc1",
  pwconv2="mlp.fc2",
  layer_scale="gamma",
  final_norm="head.norm",
  head="head.fc",
)


def _table(model: ConvNeXt, names: dict) -> list[Tensor]:
  p = ("params",)
  table = [*dense(p + ("stem",), names["stem"], "conv"), *norm(p + ("stem_norm",), names["stem_norm"])]
  for stage, depth in enumerate(model.depths):
    prefix = names["stage"].format(stage)
    if stage > 0:  # stage 0 keeps the stem's resolution and width: no downsampling layer
      ours = p + (f"downsample_{stage}",)
      table += [
        *norm(ours + ("norm",), prefix + names["downsample_norm"]),
        *dense(ours + ("conv",), prefix + names["downsample_conv"], "conv"),
      ]
    for i in range(depth):
      ours, block = p + (f"stage_{stage}_block_{i}",), prefix + names["block"].format(i)
      table += [
        *dense(ours + ("dwconv",), block + names["dwconv"], "conv"),
        *norm(ours + ("norm",), block + names["norm"]),
        *dense(ours + ("pwconv1",), block + names["pwconv1"]),
        *dense(ours + ("pwconv2",), block + names["pwconv2"]),
      ]
      if model.layer_scale_init > 0:
        table.append(Tensor(ours + ("layer_scale",), block + names["layer_scale"]))
  table += norm(p + ("norm",), names["final_norm"])
  if model.num_classes:
    table += dense(p + ("head",), names["head"])
  return table


def hf_table(model: ConvNeXt) -> list[Tensor]:
  return _table(model, _HF_NAMES)


def timm_table(model: ConvNeXt) -> list[Tensor]:
  return _table(model, _TIMM_NAMES)


TIMM_IGNORE = ()
_TIMM_SIZES = {
  "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
  "small": ((3, 3, 27, 3), (96, 192, 384, 768)),
  "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
  "large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
}
# timm ConvNeXt options this model does not have, with the value it must keep.
_TIMM_FIXED = dict(
  in_chans=3, patch_size=4, kernel_sizes=7, conv_mlp=False, head_norm_first=False, use_grn=False, conv_bias=True
)


def timm_model_args(architecture: str, model_args: dict, global_pool: str | None = None) -> dict:
  match = re.fullmatch(r"convnext_(tiny|small|base|large)", architecture)
  if not match:
    raise ValueError(
      f"timm architecture {architecture!r} is not a ConvNeXt this loader knows (convnext_{{tiny,small,base,large}})."
    )
  depths, dims = _TIMM_SIZES[match.group(1)]
  pool = model_args.get("global_pool", global_pool) or "avg"
  unsupported = {k: v for k, v in model_args.items() if k in _TIMM_FIXED and v != _TIMM_FIXED[k]}
  if pool != "avg" or unsupported:
    raise ValueError(
      f"timm ConvNeXt model_args not supported (average pooling and {_TIMM_FIXED} only): "
      f"{unsupported or {'global_pool': pool}}."
    )
  return dict(
    depths=tuple(model_args.get("depths", depths)),
    dims=tuple(model_args.get("dims", dims)),
    layer_scale_init=float(model_args.get("ls_init_value", 1e-6)),
    drop_path=float(model_args.get("drop_path_rate", 0.0)),
    layer_norm_eps=1e-6,
    head_norm_eps=1e-6,
  )


def hf_config(model: ConvNeXt) -> dict:
  if model.layer_norm_eps != HF_INNER_NORM_EPS:
    raise ValueError(
      f"This model has layer_norm_eps={model.layer_norm_eps}; transformers' ConvNeXt fixes its stem, block and "
      f"downsampling norms at {HF_INNER_NORM_EPS}, so only that can be saved (head_norm_eps is free)."
    )
  return dict(
    model_type=HF_MODEL_TYPE,
    architectures=["ConvNextForImageClassification" if model.num_classes else "ConvNextModel"],
    num_channels=3,
    image_size=model.image_size,
    patch_size=model.patch_size,
    num_stages=len(model.depths),
    hidden_sizes=list(model.dims),
    depths=list(model.depths),
    hidden_act="gelu",
    layer_norm_eps=model.head_norm_eps,
    layer_scale_init_value=model.layer_scale_init,
    drop_path_rate=model.drop_path,
  )
