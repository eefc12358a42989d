"""Swin tensor names and layouts in Hugging Face transformers (SwinForImageClassification, SwinModel) and timm
checkpoints.

Names are the ones on disk (every released checkpoint, and what transformers 5 still writes), not the
renamed in-memory names of transformers 5 (attention.q_proj, mlp.fc1, ...).
"""

import re

from lvm_jax.models.swin import SwinTransformer
from lvm_jax.weights.mapping import Tensor, dense, norm, square_size

HF_MODEL_TYPE = "swin"
HF_PREFIX = "swin."
# Recomputed from window_size (lvm_jax.models.swin.relative_position_index); older checkpoints store it.
HF_IGNORE = ("relative_position_index",)


def hf_model_args(config: dict) -> dict:
  act = config.get("hidden_act", "gelu")
  if act != "gelu":
    raise ValueError(f"Swin config hidden_act={act!r} is not supported; lvm_jax Swin uses exact 'gelu'.")
  if config.get("use_absolute_embeddings", False):
    raise ValueError(
      "Swin config use_absolute_embeddings=true is not supported; lvm_jax Swin has relative "
      "position biases only (as every released Swin checkpoint)."
    )
  if config.get("num_channels", 3) != 3:
    raise ValueError(f"Swin config num_channels={config['num_channels']}: only RGB (3) is supported.")
  eps = config.get("layer_norm_eps", 1e-5)
  if eps != 1e-5:
    # transformers applies layer_norm_eps to the block and final norms only; the patch-embedding and
    # patch-merging norms keep torch's 1e-5. One eps for all norms matches it only at 1e-5.
    raise ValueError(
      f"Swin config layer_norm_eps={eps} is not supported; only 1e-05 (transformers keeps 1e-05 "
      "for its embedding and patch-merging norms whatever layer_norm_eps says)."
    )
  depths, heads = tuple(config.get("depths", (2, 2, 6, 2))), tuple(config.get("num_heads", (3, 6, 12, 24)))
  if len(depths) != len(heads):
    raise ValueError(f"Swin config depths={list(depths)} and num_heads={list(heads)} differ in length.")
  return dict(
    image_size=square_size(config.get("image_size", 224), "image_size"),
    patch_size=square_size(config.get("patch_size", 4), "patch_size"),
    embed_dim=int(config.get("embed_dim", 96)),
    depths=depths,
    num_heads=heads,
    window_size=int(config.get("window_size", 7)),
    mlp_ratio=float(config.get("mlp_ratio", 4.0)),
    qkv_bias=bool(config.get("qkv_bias", True)),
    layer_norm_eps=eps,
    dropout=config.get("hidden_dropout_prob", 0.0),
    attention_dropout=config.get("attention_probs_dropout_prob", 0.0),
    drop_path=config.get("drop_path_rate", 0.1),
  )


# Where each part of the network lives in the other library; {stage}, {i} and {next} (stage + 1) are filled in.
_HF_NAMES = dict(
  patch_embed="swin.embeddings.patch_embeddings.projection",
  patch_norm="swin.embeddings.norm",
  norm="swin.layernorm",
  head="classifier",
  block="swin.encoder.layers.{stage}.blocks.{i}.",
  norm1="layernorm_before",
  query="attention.self.query",
  key="attention.self.key",
  value="attention.self.value",
  bias_table="attention.self.relative_position_bias_table",
  out="attention.output.dense",
  norm2="layernorm_after",
  fc1="intermediate.dense",
  fc2="output.dense",
  merge="swin.encoder.layers.{stage}.downsample.",
)
# timm merges patches at the start of the next stage (layers.{next}.downsample), we at the end of this one.
# Its fused qkv is split into attn.q / attn.k / attn.v by the timm loader beforehand.
_TIMM_NAMES = dict(
  patch_embed="patch_embed.proj",
  patch_norm="patch_embed.norm",
  norm="norm",
  head="head.fc",
  block="layers.{stage}.blocks.{i}.",
  norm1="norm1",
  query="attn.q",
  key="attn.k",
  value="attn.v",
  bias_table="attn.relative_position_bias_table",
  out="attn.proj",
  norm2="norm2",
  fc1="mlp.fc1",
  fc2="mlp.fc2",
  merge="layers.{next}.downsample.",
)


def _table(model: SwinTransformer, names: dict) -> list[Tensor]:
  p = ("params",)
  table = [
    *dense(p + ("patch_embed",), names["patch_embed"], "conv"),
    *norm(p + ("patch_norm",), names["patch_norm"]),
    *norm(p + ("norm",), names["norm"]),
  ]
  for stage, depth in enumerate(model.depths):
    for i in range(depth):
      ours, theirs = p + (f"stage_{stage}_block_{i}",), names["block"].format(stage=stage, i=i)
      attn = ours + ("attn",)
      table += [
        *norm(ours + ("norm1",), theirs + names["norm1"]),
        *dense(attn + ("query",), theirs + names["query"], bias=model.qkv_bias),
        *dense(attn + ("key",), theirs + names["key"], bias=model.qkv_bias),
        *dense(attn + ("value",), theirs + names["value"], bias=model.qkv_bias),
        Tensor(attn + ("relative_position_bias_table",), theirs + names["bias_table"]),
        *dense(attn + ("out",), theirs + names["out"], "linear2"),
        *norm(ours + ("norm2",), theirs + names["norm2"]),
        *dense(ours + ("mlp", "fc1"), theirs + names["fc1"]),
        *dense(ours + ("mlp", "fc2"), theirs + names["fc2"]),
      ]
    if stage < len(model.depths) - 1:
      theirs = names["merge"].format(stage=stage, next=stage + 1)
      table += [
        *norm(p + (f"merge_{stage}", "norm"), theirs + "norm"),
        *dense(p + (f"merge_{stage}", "reduction"), theirs + "reduction", bias=False),
      ]
  if model.num_classes:
    table += dense(p + ("head",), names["head"])
  return table


def hf_table(model: SwinTransformer) -> list[Tensor]:
  return _table(model, _HF_NAMES)


def hf_config(model: SwinTransformer) -> dict:
  if model.layer_norm_eps != 1e-5:
    raise ValueError(
      f"This model has layer_norm_eps={model.layer_norm_eps}; transformers' Swin would keep 1e-05 "
      "in its embedding and patch-merging norms, so only 1e-05 can be saved."
    )
  return dict(
    model_type=HF_MODEL_TYPE,
    architectures=["SwinForImageClassification" if model.num_classes else "SwinModel"],
    image_size=model.image_size,
    patch_size=model.patch_size,
    num_channels=3,
    embed_dim=model.embed_dim,
    depths=list(model.depths),
    num_heads=list(model.num_heads),
    window_size=model.window_size,
    mlp_ratio=model.mlp_ratio,
    qkv_bias=model.qkv_bias,
    hidden_act="gelu",
    use_absolute_embeddings=False,
    layer_norm_eps=model.layer_norm_eps,
    hidden_dropout_prob=model.dropout,
    attention_probs_dropout_prob=model.attention_dropout,
    drop_path_rate=model.drop_path,
    encoder_stride=model.patch_size * 2 ** (len(model.depths) - 1),
  )


# timm: swin_{size}_patch4_window{W}_{image}[.tag]
_TIMM_SIZES = {
  "tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
  "small": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
  "base": (128, (2, 2, 18, 2), (4, 8, 16, 32)),
  "large": (192, (2, 2, 18, 2), (6, 12, 24, 48)),
}
TIMM_IGNORE = ("relative_position_index", "attn_mask")  # buffers timm recomputes, as we do


def timm_model_args(architecture: str, model_args: dict, global_pool: str | None = None) -> dict:
  match = re.fullmatch(r"swin_(tiny|small|base|large)_patch(\d+)_window(\d+)_(\d+)", architecture)
  if not match:
    raise ValueError(
      f"timm architecture {architecture!r} is not a Swin this loader knows "
      "(swin_{tiny,small,base,large}_patch{P}_window{W}_{SIZE})."
    )
  size, patch, window, image = match.groups()
  embed_dim, depths, heads = _TIMM_SIZES[size]
  pool = model_args.get("global_pool", global_pool) or "avg"
  if (
    pool != "avg" or model_args.get("in_chans", 3) != 3 or model_args.get("ape") or model_args.get("absolute_pos_embed")
  ):
    raise ValueError(
      f"timm Swin model_args not supported (average pooling, RGB, relative positions only): {model_args}."
    )
  img = model_args.get("img_size", int(image))
  return dict(
    image_size=img if isinstance(img, int) else int(img[0]),
    patch_size=int(model_args.get("patch_size", patch)),
    window_size=int(model_args.get("window_size", window)),
    embed_dim=int(model_args.get("embed_dim", embed_dim)),
    depths=tuple(model_args.get("depths", depths)),
    num_heads=tuple(model_args.get("num_heads", heads)),
    mlp_ratio=float(model_args.get("mlp_ratio", 4.0)),
    qkv_bias=bool(model_args.get("qkv_bias", True)),
    layer_norm_eps=1e-5,
  )


def timm_table(model: SwinTransformer) -> list[Tensor]:
  return _table(model, _TIMM_NAMES)
