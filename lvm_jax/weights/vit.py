"""ViT tensor names and layouts in Hugging Face transformers and timm checkpoints (timm's hybrids too)."""

import re

from lvm_jax.models.vit import VisionTransformer, hybrid_resnet, vit_args
from lvm_jax.weights import bit
from lvm_jax.weights.mapping import Tensor, dense, norm, square_size

HF_MODEL_TYPE = "vit"
HF_PREFIX = "vit."
HF_IGNORE = ()


def hf_model_args(config: dict) -> dict:
  act = config.get("hidden_act", "gelu")
  if act != "gelu":
    raise ValueError(f"ViT config hidden_act={act!r} is not supported; lvm_jax ViT uses exact 'gelu'.")
  if not config.get("qkv_bias", True):
    raise ValueError("ViT config qkv_bias=false is not supported; lvm_jax ViT has query/key/value biases.")
  if config.get("num_channels", 3) != 3:
    raise ValueError(f"ViT config num_channels={config['num_channels']}: only RGB (3) is supported.")
  return dict(
    image_size=square_size(config.get("image_size", 224), "image_size"),
    patch_size=square_size(config.get("patch_size", 16), "patch_size"),
    width=config.get("hidden_size", 768),
    depth=config.get("num_hidden_layers", 12),
    mlp_dim=config.get("intermediate_size", 3072),
    num_heads=config.get("num_attention_heads", 12),
    layer_norm_eps=config.get("layer_norm_eps", 1e-12),
    dropout=config.get("hidden_dropout_prob", 0.0),
    attention_dropout=config.get("attention_probs_dropout_prob", 0.0),
    pooling="token",
  )


def hf_pooler_args(config: dict) -> dict:
  """ViTModel checkpoints carry a Dense + tanh pooler: our pre-logits layer."""
  if config.get("pooler_act", "tanh") != "tanh":
    raise ValueError(f"ViT config pooler_act={config['pooler_act']!r}: only 'tanh' is supported.")
  return dict(representation_size=config.get("pooler_output_size") or config.get("hidden_size", 768))


# Where each part of the network lives in the other library ({i}: the block index).
_HF_NAMES = dict(
  cls_token="vit.embeddings.cls_token",
  pos_embed="vit.embeddings.position_embeddings",
  patch_embed="vit.embeddings.patch_embeddings.projection",
  norm="vit.layernorm",
  fc_norm=None,
  block="vit.encoder.layer.{i}.",
  norm1="layernorm_before",
  norm2="layernorm_after",
  query="attention.attention.query",
  key="attention.attention.key",
  value="attention.attention.value",
  out="attention.output.dense",
  fc1="intermediate.dense",
  fc2="output.dense",
  pre_logits="vit.pooler.dense",
  head="classifier",
)
# timm's fused qkv is split into attn.q / attn.k / attn.v by the timm loader beforehand.
_TIMM_NAMES = dict(
  cls_token="cls_token",
  pos_embed="pos_embed",
  patch_embed="patch_embed.proj",
  norm="norm",
  fc_norm="fc_norm",
  block="blocks.{i}.",
  norm1="norm1",
  norm2="norm2",
  query="attn.q",
  key="attn.k",
  value="attn.v",
  out="attn.proj",
  fc1="mlp.fc1",
  fc2="mlp.fc2",
  pre_logits="pre_logits.fc",
  head="head",
  backbone="patch_embed.backbone.",
)


def _table(model: VisionTransformer, names: dict) -> list[Tensor]:
  p = ("params",)
  table = [Tensor(p + ("pos_embed",), names["pos_embed"]), *dense(p + ("patch_embed",), names["patch_embed"], "conv")]
  if model.class_token:
    table.append(Tensor(p + ("cls_token",), names["cls_token"]))
  final_norm = "fc_norm" if model.fc_norm else "norm"
  table += norm(p + (final_norm,), names[final_norm])
  for i in range(model.depth):
    ours, theirs = p + (f"block_{i}",), names["block"].format(i=i)
    table += [
      *norm(ours + ("norm1",), theirs + names["norm1"]),
      *norm(ours + ("norm2",), theirs + names["norm2"]),
      *dense(ours + ("attn", "query"), theirs + names["query"]),
      *dense(ours + ("attn", "key"), theirs + names["key"]),
      *dense(ours + ("attn", "value"), theirs + names["value"]),
      *dense(ours + ("attn", "out"), theirs + names["out"], "linear2"),
      *dense(ours + ("mlp", "fc1"), theirs + names["fc1"]),
      *dense(ours + ("mlp", "fc2"), theirs + names["fc2"]),
    ]
  if model.representation_size is not None:
    table += dense(p + ("pre_logits",), names["pre_logits"])
  if model.num_classes:
    table += dense(p + ("head",), names["head"])
  if model.resnet_depths is not None:
    table += bit.timm_backbone_table(hybrid_resnet(model), p + ("resnet",), names["backbone"])
  return table


def hf_table(model: VisionTransformer) -> list[Tensor]:
  if model.resnet_depths is not None:
    raise ValueError(
      "transformers 5 has no ViT hybrid (ViTHybrid was removed): save this model's weights another way, e.g. "
      "as an Orbax checkpoint."
    )
  if not model.class_token or model.pooling != "token" or model.fc_norm or model.no_embed_class:
    raise ValueError(
      "Hugging Face ViT has a class token with its own position embedding and no fc_norm; "
      f"this model has pooling={model.pooling!r}, class_token={model.class_token}, "
      f"fc_norm={model.fc_norm}, no_embed_class={model.no_embed_class}."
    )
  return _table(model, _HF_NAMES)


def hf_config(model: VisionTransformer) -> dict:
  hf_table(model)  # rejects models transformers' ViT cannot express
  if model.representation_size is not None and model.num_classes:
    raise ValueError(
      "transformers' ViTForImageClassification has no pre-logits layer; this model has "
      f"representation_size={model.representation_size}."
    )
  return dict(
    model_type=HF_MODEL_TYPE,
    architectures=["ViTForImageClassification" if model.num_classes else "ViTModel"],
    hidden_size=model.width,
    num_hidden_layers=model.depth,
    num_attention_heads=model.num_heads,
    intermediate_size=model.mlp_dim,
    hidden_act="gelu",
    layer_norm_eps=model.layer_norm_eps,
    hidden_dropout_prob=model.dropout,
    attention_probs_dropout_prob=model.attention_dropout,
    image_size=model.image_size,
    patch_size=model.patch_size,
    num_channels=3,
    qkv_bias=True,
    encoder_stride=model.patch_size,
    pooler_output_size=model.representation_size or model.width,
    pooler_act="tanh",
  )


# timm: vit_{size}_patch{p}_{image}[.tag]; sizes as timm names them.
_TIMM_SIZES = {"tiny": "Ti", "small": "S", "base": "B", "large": "L", "huge": "H", "giant": "g"}
TIMM_IGNORE = ()
# timm's hybrids from the ViT paper and AugReg (vision_transformer_hybrid.py): vit_{size}_r{depth}_s{stride}
# [_p{patch}]_{image}; (ResNet depth, stride) -> units per stage of its ResNetV2 ("": the stem alone).
_TIMM_HYBRIDS = {("", "16"): (), ("26", "32"): (2, 2, 2, 2), ("50", "16"): (3, 4, 9), ("50", "32"): (3, 4, 6, 3)}


def _timm_hybrid(architecture: str) -> dict | None:
  """(size, patch, image, resnet_depths) of a timm hybrid name, None for another name."""
  match = re.fullmatch(r"vit_(tiny|small|base|large)_r(\d*)_s(\d+)(?:_p(\d+))?_(\d+)", architecture)
  if not match or (match.group(2), match.group(3)) not in _TIMM_HYBRIDS:
    return None
  size, resnet, stride, patch, image = match.groups()
  return dict(size=size, patch=patch or "1", image=image, resnet_depths=_TIMM_HYBRIDS[resnet, stride])


def timm_model_args(architecture: str, model_args: dict, global_pool: str | None = None) -> dict:
  """timm ViT name + model_args -> our kwargs (without num_classes)."""
  match = re.fullmatch(r"vit_(tiny|small|base|large|huge|giant)_patch(\d+)_(?:clip_)?(\d+)", architecture)
  hybrid = _timm_hybrid(architecture)
  if match:
    size, patch, image = match.groups()
  elif hybrid:
    size, patch, image = hybrid["size"], hybrid["patch"], hybrid["image"]
    if model_args.get("padding_same", True) is not True:
      raise ValueError(f"timm {architecture} with padding_same=False is not supported (only TF 'SAME' padding).")
    model_args = {k: v for k, v in model_args.items() if k != "padding_same"}
  else:
    raise ValueError(
      f"timm architecture {architecture!r} is not a ViT this loader knows "
      "(vit_{tiny,small,base,large,huge,giant}_patch{P}_{SIZE}, or the hybrids vit_{size}_r{26,50,}_s{16,32}"
      "[_p{P}]_{SIZE})."
    )
  args = vit_args(f"{_TIMM_SIZES[size]}/{patch}")
  args.update(image_size=int(image), layer_norm_eps=1e-6)
  if not match:  # a hybrid: R50 / R26's stem is 64 channels wide in every release
    args.update(resnet_depths=hybrid["resnet_depths"], resnet_width=64)
  unsupported = {
    k: v
    for k, v in model_args.items()
    if k
    in (
      "init_values",
      "reg_tokens",
      "qk_norm",
      "pre_norm",
      "no_embed_class",
      "dynamic_img_size",
      "act_layer",
      "norm_layer",
      "block_fn",
      "mlp_layer",
      "embed_layer",
      "class_token",
      "global_pool",
      "fc_norm",
      "qkv_bias",
      "in_chans",
      "proj_bias",
    )
    and v not in (None, False, 0, 3, True, "token", "avg", "")
  }
  if unsupported or model_args.get("qkv_bias", True) is False or model_args.get("in_chans", 3) != 3:
    raise ValueError(f"timm ViT model_args not supported: {unsupported or model_args}.")
  img = model_args.get("img_size", args["image_size"])
  args["image_size"] = img if isinstance(img, int) else int(img[0])
  args["patch_size"] = model_args.get("patch_size", args["patch_size"])
  args["width"] = model_args.get("embed_dim", args["width"])
  args["depth"] = model_args.get("depth", args["depth"])
  args["num_heads"] = model_args.get("num_heads", args["num_heads"])
  if "mlp_ratio" in model_args or "embed_dim" in model_args:
    args["mlp_dim"] = int(args["width"] * model_args.get("mlp_ratio", 4.0))
  pool = model_args.get("global_pool", global_pool) or "token"
  class_token = model_args.get("class_token", True)
  if pool not in ("token", "avg"):
    raise ValueError(f"timm ViT global_pool={pool!r} is not supported (only 'token' and 'avg').")
  if pool == "token" and not class_token:
    raise ValueError("timm ViT with global_pool='token' needs a class token.")
  args["pooling"] = "token" if pool == "token" else "gap"
  # timm puts the final norm after pooling for average pooling unless told otherwise.
  args["fc_norm"] = bool(model_args.get("fc_norm")) if model_args.get("fc_norm") is not None else pool == "avg"
  args["class_token"] = class_token
  return args


def timm_table(model: VisionTransformer) -> list[Tensor]:
  return _table(model, _TIMM_NAMES)
