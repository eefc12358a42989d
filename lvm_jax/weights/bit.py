"""BiT ResNetV2 tensor names and layouts: Hugging Face transformers (BitForImageClassification, BitModel), timm
(resnetv2_*_bit; and the ResNet inside timm's ViT hybrids) and google-research/big_transfer's .npz files."""

import dataclasses
import re
from typing import Callable

import numpy as np

from lvm_jax.models import layers, registry
from lvm_jax.models.resnetv2 import ResNetV2
from lvm_jax.weights import mapping
from lvm_jax.weights.mapping import Path, Tensor, square_size

HF_MODEL_TYPE = "bit"
HF_PREFIX = "bit."
HF_IGNORE = ()
TIMM_IGNORE = ()
# What transformers and timm fix in code: GroupNorm's epsilon and the weight standardisation's.
GN_EPS, WS_EPS = 1e-5, 1e-8
_BASE_WIDTHS = (256, 512, 1024, 2048)
_BASE_STEM = 64


def _factored(stem: int, widths: tuple) -> dict:
  """stem/stage channels as the registered variants spell them (bit_r50x3: width_factor=3 of 64 / 256 ...) where
  they are a whole multiple of the base widths, else as they are."""
  factor = stem // _BASE_STEM
  if factor and stem == _BASE_STEM * factor and widths == tuple(w * factor for w in _BASE_WIDTHS[: len(widths)]):
    return dict(stem_width=_BASE_STEM, widths=tuple(_BASE_WIDTHS[: len(widths)]), width_factor=factor)
  return dict(stem_width=stem, widths=widths, width_factor=1)


# ------------------------------------------------------------------------------------------- one table, per source


@dataclasses.dataclass(frozen=True)
class Naming:
  """Where a ResNetV2's parts live in another library's flat names: templates with {s}, {i} (stage and unit from 0;
  {s1}, {i1} from 1) and {r} (the unit's layer 1..3; {abc}: a, b, c), and the rows of a convolution, a norm and
  the head in that library's layouts."""

  stem_conv: str
  stem_norm: str
  unit: str
  conv: str
  norm: str
  proj_conv: str
  proj_norm: str
  final_norm: str
  head: str
  conv_rows: Callable[[Path, str], list[Tensor]]
  norm_rows: Callable[[Path, str], list[Tensor]]
  head_rows: Callable[[Path, str], list[Tensor]]


def _torch_conv(ours: Path, name: str) -> list[Tensor]:
  return [Tensor(ours + ("kernel",), name + ".weight", "conv")]


def _npz_conv(ours: Path, name: str) -> list[Tensor]:
  return [Tensor(ours + ("kernel",), name + "/kernel")]  # already [kh, kw, in, out]


def _npz_norm(scale: str, bias: str) -> Callable[[Path, str], list[Tensor]]:
  # "vector": JAX GroupNorms store [C] or [1, 1, 1, C]; both load.
  return lambda ours, name: [
    Tensor(ours + ("scale",), f"{name}/{scale}", "vector"),
    Tensor(ours + ("bias",), f"{name}/{bias}", "vector"),
  ]


def _npz_dense(ours: Path, name: str) -> list[Tensor]:
  # big_transfer's head is a 1x1 convolution, [1, 1, C, classes]: the same numbers as our [C, classes] kernel.
  return [Tensor(ours + ("kernel",), name + "/kernel", "vector"), Tensor(ours + ("bias",), name + "/bias", "vector")]


HF_NAMES = Naming(
  stem_conv="bit.embedder.convolution",
  stem_norm="bit.embedder.norm",
  unit="bit.encoder.stages.{s}.layers.{i}.",
  conv="conv{r}",
  norm="norm{r}",
  proj_conv="downsample.conv",
  proj_norm="downsample.norm",
  final_norm="bit.norm",
  head="classifier.1",
  conv_rows=_torch_conv,
  norm_rows=mapping.norm,
  head_rows=mapping.dense,
)
TIMM_NAMES = Naming(
  stem_conv="stem.conv",
  stem_norm="stem.norm",
  unit="stages.{s}.blocks.{i}.",
  conv="conv{r}",
  norm="norm{r}",
  proj_conv="downsample.conv",
  proj_norm="downsample.norm",
  final_norm="norm",
  head="head.fc",
  conv_rows=_torch_conv,
  norm_rows=mapping.norm,
  # timm's BiT head is a 1x1 convolution, [classes, C, 1, 1]: torch Linear's layout with two unit axes.
  head_rows=mapping.dense,
)
# big_transfer: a pre-activation unit's a/b/c sub-blocks each hold the norm before and the convolution of a layer.
BIT_NPZ_NAMES = Naming(
  stem_conv="resnet/root_block/standardized_conv2d",
  stem_norm="",
  unit="resnet/block{s1}/unit{i1:02d}/",
  conv="{abc}/standardized_conv2d",
  norm="{abc}/group_norm",
  proj_conv="a/proj/standardized_conv2d",
  proj_norm="",
  final_norm="resnet/group_norm",
  head="resnet/head/conv2d",
  conv_rows=_npz_conv,
  norm_rows=_npz_norm("gamma", "beta"),
  head_rows=_npz_dense,
)
# google-research/vision_transformer's hybrids (R50+ViT-B/16 ...): the ResNet's names at the top level of the file.
HYBRID_NPZ_NAMES = Naming(
  stem_conv="conv_root",
  stem_norm="gn_root",
  unit="block{s1}/unit{i1}/",
  conv="conv{r}",
  norm="gn{r}",
  proj_conv="conv_proj",
  proj_norm="gn_proj",
  final_norm="",
  head="",
  conv_rows=_npz_conv,
  norm_rows=_npz_norm("scale", "bias"),
  head_rows=_npz_dense,
)


def table(model: ResNetV2, names: Naming, ours: Path = ("params",), prefix: str = "") -> list[Tensor]:
  """Our paths (under `ours`) against the names of `names` (after `prefix`)."""
  rows = names.conv_rows(ours + ("stem_conv",), prefix + names.stem_conv)
  if not model.preact:
    rows += names.norm_rows(ours + ("stem_norm",), prefix + names.stem_norm)
  for unit in model.units():
    block = ours + (unit.name,)
    at = prefix + names.unit.format(s=unit.stage, i=unit.index, s1=unit.stage + 1, i1=unit.index + 1)
    for r, abc in zip((1, 2, 3), "abc"):
      rows += names.conv_rows(block + (f"conv{r}",), at + names.conv.format(r=r, abc=abc))
      rows += names.norm_rows(block + (f"norm{r}",), at + names.norm.format(r=r, abc=abc))
    if unit.projection:
      rows += names.conv_rows(block + ("proj_conv",), at + names.proj_conv)
      if not model.preact:
        rows += names.norm_rows(block + ("proj_norm",), at + names.proj_norm)
  if model.preact:
    rows += names.norm_rows(ours + ("norm",), prefix + names.final_norm)
  if model.num_classes:
    rows += names.head_rows(ours + ("head",), prefix + names.head)
  return rows


def _fixed_eps(model: ResNetV2, library: str) -> None:
  if (model.gn_eps, model.ws_eps) != (GN_EPS, WS_EPS):
    raise ValueError(
      f"This ResNetV2 has gn_eps={model.gn_eps}, ws_eps={model.ws_eps}; {library} fixes them at {GN_EPS} and "
      f"{WS_EPS}, so only those can be written."
    )


# ------------------------------------------------------------------------------------------------ transformers


# BitConfig's defaults (google/bit-50's architecture), for config.json files that omit a field.
_HF_DEFAULTS = dict(
  num_channels=3,
  embedding_size=64,
  hidden_sizes=_BASE_WIDTHS,
  depths=(3, 4, 6, 3),
  layer_type="preactivation",
  hidden_act="relu",
  global_padding=None,
  num_groups=32,
  drop_path_rate=0.0,
  embedding_dynamic_padding=False,
  output_stride=32,
  width_factor=1,
)
# (layer_type, global_padding, embedding_dynamic_padding) -> (preact, padding): the two networks transformers builds
# that timm and the JAX releases have (BiT; the ViT hybrids' ResNet).
_HF_STYLES = {("preactivation", None, False): (True, "symmetric"), ("bottleneck", "SAME", True): (False, "SAME")}


def hf_model_args(config: dict) -> dict:
  get = lambda field: config[field] if config.get(field) is not None else _HF_DEFAULTS[field]
  padding = get("global_padding")
  style = (get("layer_type"), padding.upper() if isinstance(padding, str) else None, get("embedding_dynamic_padding"))
  if style not in _HF_STYLES:
    raise ValueError(
      f"BiT config layer_type={style[0]!r}, global_padding={padding!r}, embedding_dynamic_padding={style[2]} is not "
      "supported; supported: ('preactivation', null, false) (BiT) and ('bottleneck', 'SAME', true) (the ViT "
      "hybrids' ResNet)."
    )
  for field, supported in (("hidden_act", "relu"), ("num_channels", 3), ("output_stride", 32), ("width_factor", 1)):
    if get(field) != supported:
      why = {
        "width_factor": " (transformers widens the stages but not the final norm and classifier; write the widened "
        "channels in hidden_sizes and embedding_size)",
        "output_stride": " (dilated stages are not supported)",
      }.get(field, "")
      raise ValueError(f"BiT config {field}={get(field)!r} is not supported; only {supported!r}{why}.")
  depths, widths = tuple(get("depths")), tuple(get("hidden_sizes"))
  if len(depths) != len(widths):
    raise ValueError(f"BiT config depths={list(depths)} and hidden_sizes={list(widths)} must have one entry per stage.")
  preact, conv_padding = _HF_STYLES[style]
  return dict(
    image_size=square_size(config.get("image_size", 224), "image_size"),
    depths=depths,
    **_factored(int(get("embedding_size")), widths),
    preact=preact,
    padding=conv_padding,
    groups=int(get("num_groups")),
    gn_eps=GN_EPS,
    ws_eps=WS_EPS,
    drop_path=float(get("drop_path_rate")),
  )


def hf_table(model: ResNetV2) -> list[Tensor]:
  return table(model, HF_NAMES)


def hf_config(model: ResNetV2) -> dict:
  _fixed_eps(model, "transformers' Bit")
  model.units()  # rejects inconsistent depths / widths before anything is written
  style = {value: key for key, value in _HF_STYLES.items()}.get((model.preact, model.padding))
  if style is None:
    raise ValueError(
      f"transformers' Bit builds preact=True with padding='symmetric' and preact=False with padding='SAME'; this "
      f"model has preact={model.preact}, padding={model.padding!r}."
    )
  layer_type, padding, dynamic = style
  return dict(
    model_type=HF_MODEL_TYPE,
    architectures=["BitForImageClassification" if model.num_classes else "BitModel"],
    num_channels=3,
    image_size=model.image_size,
    embedding_size=model.stem_channels(),
    # The widened channels with width_factor 1: transformers widens the stages only, not the norm and classifier.
    hidden_sizes=[layers.make_divisible(w * model.width_factor) for w in model.widths],
    depths=list(model.depths),
    layer_type=layer_type,
    global_padding=padding,
    embedding_dynamic_padding=dynamic,
    hidden_act="relu",
    num_groups=model.groups,
    drop_path_rate=model.drop_path,
    output_stride=32,
    width_factor=1,
  )


# ------------------------------------------------------------------------------------------------------- timm


_TIMM_DEPTHS = {"50": (3, 4, 6, 3), "101": (3, 4, 23, 3), "152": (3, 8, 36, 3)}
# timm ResNetV2 arguments a resnetv2_*_bit config.json may carry, with the value each must keep (None: any).
_TIMM_ARGS = dict(
  channels=None, stem_chs=None, drop_path_rate=None, num_classes=None, global_pool="avg", in_chans=3, drop_rate=0.0
)


def timm_model_args(architecture: str, model_args: dict, global_pool: str | None = None) -> dict:
  match = re.fullmatch(r"resnetv2_(50|101|152)x(\d+)_bit", architecture)
  if not match:
    raise ValueError(
      f"timm architecture {architecture!r} is not a BiT ResNetV2 this loader knows (resnetv2_{{50,101,152}}x{{W}}_bit)."
    )
  model_args = {"global_pool": global_pool or "avg", **model_args}
  unsupported = {k: v for k, v in model_args.items() if k not in _TIMM_ARGS or _TIMM_ARGS[k] not in (None, v)}
  if unsupported:
    raise ValueError(
      f"timm ResNetV2 model_args not supported: {unsupported}; supported: channels, stem_chs, drop_path_rate, "
      "global_pool='avg', in_chans=3, drop_rate=0."
    )
  depths = _TIMM_DEPTHS[match.group(1)]
  widths = tuple(model_args.get("channels", _BASE_WIDTHS))
  if len(widths) != len(depths):
    raise ValueError(f"timm {architecture} model_args channels={list(widths)}: need {len(depths)} stage widths.")
  return dict(
    depths=depths,
    widths=widths,
    stem_width=int(model_args.get("stem_chs", _BASE_STEM)),
    width_factor=int(match.group(2)),
    preact=True,
    padding="symmetric",
    gn_eps=GN_EPS,
    ws_eps=WS_EPS,
    drop_path=float(model_args.get("drop_path_rate", 0.0)),
  )


def timm_table(model: ResNetV2) -> list[Tensor]:
  return table(model, TIMM_NAMES)


def timm_backbone_table(model: ResNetV2, ours: Path, prefix: str) -> list[Tensor]:
  """The ResNet of a timm ViT hybrid (patch_embed.backbone.*): a ResNetV2 without head, or only its stem (a model
  without stages, whose stem timm holds as the backbone itself: "conv", "norm")."""
  if model.depths:
    return table(model, TIMM_NAMES, ours, prefix)
  stem_only = dataclasses.replace(TIMM_NAMES, stem_conv="conv", stem_norm="norm")
  return table(model, stem_only, ours, prefix)


# ---------------------------------------------------------------------------------------- big_transfer .npz


NPZ_PREFIX = "resnet/"
_NPZ_ROOT = BIT_NPZ_NAMES.stem_conv + "/kernel"
_NPZ_UNIT = re.compile(r"^resnet/block(\d+)/unit(\d+)/")


def is_npz(tensors: dict) -> bool:
  """A big_transfer checkpoint (BiT-S / BiT-M-R50x1.npz ...): its root convolution is there."""
  return _NPZ_ROOT in tensors


def npz_model_args(tensors: dict) -> dict:
  """The architecture, read off the tensor shapes: stem and stage widths, units per stage, the head's classes."""
  units = sorted({(int(m.group(1)), int(m.group(2))) for name in tensors if (m := _NPZ_UNIT.match(name))})
  stages = sorted({stage for stage, _ in units})
  if not stages or stages != list(range(1, len(stages) + 1)):
    raise ValueError(f"no consecutive resnet/block1, block2, ... units (found blocks {stages}).")
  depths, widths = [], []
  for stage in stages:
    indices = [i for s, i in units if s == stage]
    if indices != list(range(1, len(indices) + 1)):
      raise ValueError(f"resnet/block{stage} has units {indices}; expected unit01 ... unit{len(indices):02d}.")
    depths.append(len(indices))
    widths.append(int(tensors[f"resnet/block{stage}/unit01/c/standardized_conv2d/kernel"].shape[-1]))
  head = tensors.get(BIT_NPZ_NAMES.head + "/kernel")
  groups = 32  # not in the file; every BiT release uses 32
  return dict(
    depths=tuple(depths),
    **_factored(int(tensors[_NPZ_ROOT].shape[-1]), tuple(widths)),
    preact=True,
    padding="symmetric",
    groups=groups,
    num_classes=0 if head is None else int(np.shape(head)[-1]),
  )


def npz_table(model: ResNetV2) -> list[Tensor]:
  return table(model, BIT_NPZ_NAMES)


def load_npz(tensors: dict, source: str, **overrides):
  """(model, variables) from the tensors of a big_transfer .npz file (its "resnet/..." entries)."""
  model = registry.build(ResNetV2, mapping.read_model_args(npz_model_args, tensors, source), overrides)
  tensors = {k: v for k, v in tensors.items() if k.startswith(NPZ_PREFIX)}
  variables = mapping.load_variables(npz_table(model), tensors, registry.abstract_variables(model), source=source)
  return model, variables
