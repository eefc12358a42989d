"""ResNet tensor names and layouts in Hugging Face transformers (ResNetForImageClassification, ResNetModel)
and timm checkpoints; the transformers names are those on disk, which transformers 5 keeps in memory too."""

from lvm_jax.models.resnet import EXPANSION, ResNet
from lvm_jax.weights.mapping import Tensor, conv_bn

HF_MODEL_TYPE = "resnet"
HF_PREFIX = "resnet."
HF_IGNORE = ("num_batches_tracked",)  # a training counter torch keeps; Flax's BatchNorm needs none

# ResNetConfig's defaults (the microsoft/resnet-50 architecture), for config.json files that omit a field.
_HF_DEFAULTS = dict(
  num_channels=3,
  embedding_size=64,
  hidden_sizes=(256, 512, 1024, 2048),
  depths=(3, 4, 6, 3),
  layer_type="bottleneck",
  hidden_act="relu",
  downsample_in_first_stage=False,
  downsample_in_bottleneck=False,
)


def hf_model_args(config: dict) -> dict:
  get = lambda field: config.get(field, _HF_DEFAULTS[field])
  layer_type = get("layer_type")
  if layer_type not in EXPANSION:
    raise ValueError(f"ResNet config layer_type={layer_type!r} is not supported; expected 'basic' or 'bottleneck'.")
  if get("hidden_act") != "relu":
    raise ValueError(f"ResNet config hidden_act={get('hidden_act')!r} is not supported; lvm_jax ResNet uses 'relu'.")
  if get("num_channels") != 3:
    raise ValueError(f"ResNet config num_channels={get('num_channels')}: only RGB (3) is supported.")
  if get("downsample_in_first_stage"):
    raise ValueError(
      "ResNet config downsample_in_first_stage=true is not supported; lvm_jax ResNet's first stage "
      "keeps the stem's stride 4."
    )
  if get("downsample_in_bottleneck"):
    raise ValueError(
      "ResNet config downsample_in_bottleneck=true (ResNet v1, stride in the first 1x1) is not "
      "supported; lvm_jax ResNet is v1.5 (stride in the 3x3 convolution)."
    )
  depths, hidden_sizes = tuple(get("depths")), tuple(get("hidden_sizes"))
  if len(depths) != len(hidden_sizes):
    raise ValueError(f"ResNet config depths={list(depths)} and hidden_sizes={list(hidden_sizes)} differ in length.")
  expansion = EXPANSION[layer_type]
  if any(size % expansion for size in hidden_sizes):
    raise ValueError(
      f"ResNet config hidden_sizes={list(hidden_sizes)}: bottleneck stage outputs must be multiples of {expansion}."
    )
  width = int(get("embedding_size"))
  stage_widths = tuple(size // expansion for size in hidden_sizes)
  standard = tuple(width * 2**s for s in range(len(depths)))
  return dict(
    stage_sizes=depths, block=layer_type, width=width, stage_widths=None if stage_widths == standard else stage_widths
  )


def _hf_conv_bn(ours: tuple, conv: str, bn: str, theirs: str) -> list[Tensor]:
  return conv_bn(ours, conv, bn, theirs + "convolution", theirs + "normalization")


def hf_table(model: ResNet) -> list[Tensor]:
  table = _hf_conv_bn((), "stem_conv", "stem_bn", HF_PREFIX + "embedder.embedder.")
  num_convs = 3 if model.block == "bottleneck" else 2
  for spec in model.block_specs():
    theirs = f"{HF_PREFIX}encoder.stages.{spec.stage}.layers.{spec.index}."
    for k in range(num_convs):
      table += _hf_conv_bn((spec.name,), f"conv{k + 1}", f"bn{k + 1}", f"{theirs}layer.{k}.")
    if spec.has_shortcut:
      table += _hf_conv_bn((spec.name,), "shortcut_conv", "shortcut_bn", f"{theirs}shortcut.")
  if model.num_classes:
    # classifier.0 is a parameter-free Flatten.
    table += [
      Tensor(("params", "head", "kernel"), "classifier.1.weight", "linear"),
      Tensor(("params", "head", "bias"), "classifier.1.bias"),
    ]
  return table


def hf_config(model: ResNet) -> dict:
  # drop_path, bn_momentum and zero_init_last only act in training and at init; they need no config field.
  if model.bn_eps != 1e-5:
    raise ValueError(
      f"transformers' ResNet uses BatchNorm eps 1e-5 (torch's default); this model has bn_eps={model.bn_eps}."
    )
  hidden_sizes = [spec.out_channels for spec in model.block_specs() if spec.index == 0]
  return dict(
    model_type=HF_MODEL_TYPE,
    architectures=["ResNetForImageClassification" if model.num_classes else "ResNetModel"],
    num_channels=3,
    embedding_size=model.width,
    hidden_sizes=hidden_sizes,
    depths=list(model.stage_sizes),
    layer_type=model.block,
    hidden_act="relu",
    downsample_in_first_stage=False,
    downsample_in_bottleneck=False,
  )


# timm: resnet{18,34,50,101,152}[.tag] -> (blocks per stage, block). Deep-stem / avg-down variants
# (resnet50d, resnet26t, ...) are other architectures and are refused by name.
_TIMM_DEPTHS = {
  "resnet18": ((2, 2, 2, 2), "basic"),
  "resnet34": ((3, 4, 6, 3), "basic"),
  "resnet50": ((3, 4, 6, 3), "bottleneck"),
  "resnet101": ((3, 4, 23, 3), "bottleneck"),
  "resnet152": ((3, 8, 36, 3), "bottleneck"),
}
TIMM_IGNORE = ("num_batches_tracked",)


def timm_model_args(architecture: str, model_args: dict, global_pool: str | None = None) -> dict:
  if architecture not in _TIMM_DEPTHS:
    raise ValueError(
      f"timm architecture {architecture!r} is not a ResNet this loader knows ({', '.join(_TIMM_DEPTHS)})."
    )
  depths, block = _TIMM_DEPTHS[architecture]
  unsupported = {
    k: v
    for k, v in model_args.items()
    if k in ("stem_type", "avg_down", "cardinality", "base_width", "block_args", "aa_layer")
    and v not in (None, "", False, 1, 64)
  }
  pool = model_args.get("global_pool", global_pool) or "avg"
  if unsupported or pool != "avg" or model_args.get("in_chans", 3) != 3 or model_args.get("stem_width", 64) != 64:
    raise ValueError(
      f"timm ResNet model_args not supported (plain v1.5 ResNet, 64-wide stem, average "
      f"pooling): {unsupported or model_args}."
    )
  channels = tuple(model_args.get("channels", (64, 128, 256, 512)))
  stage_sizes = tuple(model_args.get("layers", depths))
  standard = tuple(64 * 2**s for s in range(len(stage_sizes)))
  return dict(stage_sizes=stage_sizes, block=block, width=64, stage_widths=None if channels == standard else channels)


def timm_table(model: ResNet) -> list[Tensor]:
  table = conv_bn((), "stem_conv", "stem_bn", "conv1", "bn1")
  num_convs = 3 if model.block == "bottleneck" else 2
  for spec in model.block_specs():
    theirs = f"layer{spec.stage + 1}.{spec.index}."
    for k in range(1, num_convs + 1):
      table += conv_bn((spec.name,), f"conv{k}", f"bn{k}", f"{theirs}conv{k}", f"{theirs}bn{k}")
    if spec.has_shortcut:
      table += conv_bn((spec.name,), "shortcut_conv", "shortcut_bn", f"{theirs}downsample.0", f"{theirs}downsample.1")
  if model.num_classes:
    table += [
      Tensor(("params", "head", "kernel"), "fc.weight", "linear"),
      Tensor(("params", "head", "bias"), "fc.bias"),
    ]
  return table
