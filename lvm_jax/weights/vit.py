"""ViT tensor names and layouts in Hugging Face transformers and timm checkpoints."""

from lvm_jax.models.vit import VisionTransformer
from lvm_jax.weights.mapping import Tensor

HF_MODEL_TYPE = "vit"
HF_PREFIX = "vit."
HF_IGNORE = ()


def _square(value, field: str) -> int:
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      raise ValueError(f"ViT config {field}={value}: only square images and patches are supported.")
    value = value[0]
  return int(value)


def hf_model_args(config: dict) -> dict:
  act = config.get("hidden_act", "gelu")
  if act != "gelu":
    raise ValueError(f"ViT config hidden_act={act!r} is not supported; lvm_jax ViT uses exact 'gelu'.")
  if not config.get("qkv_bias", True):
    raise ValueError("ViT config qkv_bias=false is not supported; lvm_jax ViT has query/key/value biases.")
  if config.get("num_channels", 3) != 3:
    raise ValueError(f"ViT config num_channels={config['num_channels']}: only RGB (3) is supported.")
  return dict(
      image_size=_square(config.get("image_size", 224), "image_size"),
      patch_size=_square(config.get("patch_size", 16), "patch_size"),
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


def hf_table(model: VisionTransformer) -> list[Tensor]:
  if model.pooling != "token" or model.fc_norm or model.no_embed_class:
    raise ValueError("Hugging Face ViT has a class token with its own position embedding and no fc_norm; "
                     f"this model has pooling={model.pooling!r}, fc_norm={model.fc_norm}, "
                     f"no_embed_class={model.no_embed_class}.")
  p = ("params",)
  table = [
      Tensor(p + ("cls_token",), "vit.embeddings.cls_token"),
      Tensor(p + ("pos_embed",), "vit.embeddings.position_embeddings"),
      Tensor(p + ("patch_embed", "kernel"), "vit.embeddings.patch_embeddings.projection.weight", "conv"),
      Tensor(p + ("patch_embed", "bias"), "vit.embeddings.patch_embeddings.projection.bias"),
      Tensor(p + ("norm", "scale"), "vit.layernorm.weight"),
      Tensor(p + ("norm", "bias"), "vit.layernorm.bias"),
  ]
  for i in range(model.depth):
    ours, theirs = p + (f"block_{i}",), f"vit.encoder.layer.{i}."
    pairs = [
        (("norm1",), "layernorm_before", None),
        (("norm2",), "layernorm_after", None),
        (("attn", "query"), "attention.attention.query", "linear"),
        (("attn", "key"), "attention.attention.key", "linear"),
        (("attn", "value"), "attention.attention.value", "linear"),
        (("attn", "out"), "attention.output.dense", "linear2"),
        (("mlp", "fc1"), "intermediate.dense", "linear"),
        (("mlp", "fc2"), "output.dense", "linear"),
    ]
    for sub, name, layout in pairs:
      if layout is None:
        table += [Tensor(ours + sub + ("scale",), theirs + name + ".weight"),
                  Tensor(ours + sub + ("bias",), theirs + name + ".bias")]
      else:
        table += [Tensor(ours + sub + ("kernel",), theirs + name + ".weight", layout),
                  Tensor(ours + sub + ("bias",), theirs + name + ".bias", "vector")]
  if model.representation_size is not None:
    table += [Tensor(p + ("pre_logits", "kernel"), "vit.pooler.dense.weight", "linear"),
              Tensor(p + ("pre_logits", "bias"), "vit.pooler.dense.bias")]
  if model.num_classes:
    table += [Tensor(p + ("head", "kernel"), "classifier.weight", "linear"),
              Tensor(p + ("head", "bias"), "classifier.bias")]
  return table


def hf_config(model: VisionTransformer) -> dict:
  hf_table(model)  # rejects models transformers' ViT cannot express
  if model.representation_size is not None and model.num_classes:
    raise ValueError("transformers' ViTForImageClassification has no pre-logits layer; this model has "
                     f"representation_size={model.representation_size}.")
  return dict(
      model_type=HF_MODEL_TYPE,
      architectures=["ViTForImageClassification" if model.num_classes else "ViTModel"],
      hidden_size=model.width, num_hidden_layers=model.depth, num_attention_heads=model.num_heads,
      intermediate_size=model.mlp_dim, hidden_act="gelu", layer_norm_eps=model.layer_norm_eps,
      hidden_dropout_prob=model.dropout, attention_probs_dropout_prob=model.attention_dropout,
      image_size=model.image_size, patch_size=model.patch_size, num_channels=3, qkv_bias=True,
      encoder_stride=model.patch_size,
      pooler_output_size=model.representation_size or model.width, pooler_act="tanh",
  )


# timm: vit_{size}_patch{p}_{image}[.tag]; sizes as timm names them.
_TIMM_SIZES = {"tiny": "Ti", "small": "S", "base": "B", "large": "L", "huge": "H", "giant": "g"}
TIMM_IGNORE = ()


def timm_model_args(architecture: str, model_args: dict, global_pool: str | None = None) -> dict:
  """timm ViT name + model_args -> our kwargs (without num_classes)."""
  import re
  from lvm_jax.models.vit import vit_args
  match = re.fullmatch(r"vit_(tiny|small|base|large|huge|giant)_patch(\d+)_(?:clip_)?(\d+)", architecture)
  if not match:
    raise ValueError(f"timm architecture {architecture!r} is not a plain ViT this loader knows "
                     "(vit_{tiny,small,base,large,huge,giant}_patch{P}_{SIZE}).")
  size, patch, image = match.groups()
  args = vit_args(f"{_TIMM_SIZES[size]}/{patch}")
  args.update(image_size=int(image), layer_norm_eps=1e-6)
  unsupported = {k: v for k, v in model_args.items()
                 if k in ("init_values", "reg_tokens", "qk_norm", "pre_norm", "no_embed_class", "dynamic_img_size",
                          "act_layer", "norm_layer", "block_fn", "mlp_layer", "embed_layer", "class_token",
                          "global_pool", "fc_norm", "qkv_bias", "in_chans", "proj_bias")
                 and v not in (None, False, 0, 3, True, "token", "avg", "")}
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
  p = ("params",)
  table = [Tensor(p + ("pos_embed",), "pos_embed"),
           Tensor(p + ("patch_embed", "kernel"), "patch_embed.proj.weight", "conv"),
           Tensor(p + ("patch_embed", "bias"), "patch_embed.proj.bias")]
  if model.class_token:
    table.append(Tensor(p + ("cls_token",), "cls_token"))
  norm = "fc_norm" if model.fc_norm else "norm"
  table += [Tensor(p + (norm, "scale"), f"{norm}.weight"), Tensor(p + (norm, "bias"), f"{norm}.bias")]
  for i in range(model.depth):
    ours, theirs = p + (f"block_{i}",), f"blocks.{i}."
    for sub in ("norm1", "norm2"):
      table += [Tensor(ours + (sub, "scale"), theirs + sub + ".weight"),
                Tensor(ours + (sub, "bias"), theirs + sub + ".bias")]
    for sub, name, layout in ((("attn", "query"), "attn.q", "linear"), (("attn", "key"), "attn.k", "linear"),
                              (("attn", "value"), "attn.v", "linear"), (("attn", "out"), "attn.proj", "linear2"),
                              (("mlp", "fc1"), "mlp.fc1", "linear"), (("mlp", "fc2"), "mlp.fc2", "linear")):
      table += [Tensor(ours + sub + ("kernel",), theirs + name + ".weight", layout),
                Tensor(ours + sub + ("bias",), theirs + name + ".bias", "vector")]
  if model.representation_size is not None:
    table += [Tensor(p + ("pre_logits", "kernel"), "pre_logits.fc.weight", "linear"),
              Tensor(p + ("pre_logits", "bias"), "pre_logits.fc.bias")]
  if model.num_classes:
    table += [Tensor(p + ("head", "kernel"), "head.weight", "linear"), Tensor(p + ("head", "bias"), "head.bias")]
  return table
