"""Swin tensor names and layouts in Hugging Face transformers checkpoints (SwinForImageClassification, SwinModel).

Names are the ones on disk (every released checkpoint, and what transformers 5 still writes), not the
renamed in-memory names of transformers 5 (attention.q_proj, mlp.fc1, ...).
"""

from lvm_jax.models.swin import SwinTransformer
from lvm_jax.weights.mapping import Tensor

HF_MODEL_TYPE = "swin"
HF_PREFIX = "swin."
# Recomputed from window_size (lvm_jax.models.swin.relative_position_index); older checkpoints store it.
HF_IGNORE = ("relative_position_index",)


def _square(value, field: str) -> int:
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      raise ValueError(f"Swin config {field}={value}: only square images and patches are supported.")
    value = value[0]
  return int(value)


def hf_model_args(config: dict) -> dict:
  act = config.get("hidden_act", "gelu")
  if act != "gelu":
    raise ValueError(f"Swin config hidden_act={act!r} is not supported; lvm_jax Swin uses exact 'gelu'.")
  if config.get("use_absolute_embeddings", False):
    raise ValueError("Swin config use_absolute_embeddings=true is not supported; lvm_jax Swin has relative "
                     "position biases only (as every released Swin checkpoint).")
  if config.get("num_channels", 3) != 3:
    raise ValueError(f"Swin config num_channels={config['num_channels']}: only RGB (3) is supported.")
  eps = config.get("layer_norm_eps", 1e-5)
  if eps != 1e-5:
    # transformers applies layer_norm_eps to the block and final norms only; the patch-embedding and
    # patch-merging norms keep torch's 1e-5. One eps for all norms matches it only at 1e-5.
    raise ValueError(f"Swin config layer_norm_eps={eps} is not supported; only 1e-05 (transformers keeps 1e-05 "
                     "for its embedding and patch-merging norms whatever layer_norm_eps says).")
  depths, heads = tuple(config.get("depths", (2, 2, 6, 2))), tuple(config.get("num_heads", (3, 6, 12, 24)))
  if len(depths) != len(heads):
    raise ValueError(f"Swin config depths={list(depths)} and num_heads={list(heads)} differ in length.")
  return dict(
      image_size=_square(config.get("image_size", 224), "image_size"),
      patch_size=_square(config.get("patch_size", 4), "patch_size"),
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


def _dense(ours: tuple, theirs: str, layout: str = "linear", bias: bool = True) -> list[Tensor]:
  table = [Tensor(ours + ("kernel",), theirs + ".weight", layout)]
  if bias:
    table.append(Tensor(ours + ("bias",), theirs + ".bias", "vector"))
  return table


def _norm(ours: tuple, theirs: str) -> list[Tensor]:
  return [Tensor(ours + ("scale",), theirs + ".weight"), Tensor(ours + ("bias",), theirs + ".bias")]


def hf_table(model: SwinTransformer) -> list[Tensor]:
  p = ("params",)
  table = [
      Tensor(p + ("patch_embed", "kernel"), "swin.embeddings.patch_embeddings.projection.weight", "conv"),
      Tensor(p + ("patch_embed", "bias"), "swin.embeddings.patch_embeddings.projection.bias"),
      *_norm(p + ("patch_norm",), "swin.embeddings.norm"),
      *_norm(p + ("norm",), "swin.layernorm"),
  ]
  for stage, depth in enumerate(model.depths):
    for i in range(depth):
      ours, theirs = p + (f"stage_{stage}_block_{i}",), f"swin.encoder.layers.{stage}.blocks.{i}."
      attn = ours + ("attn",)
      table += [
          *_norm(ours + ("norm1",), theirs + "layernorm_before"),
          *_dense(attn + ("query",), theirs + "attention.self.query", bias=model.qkv_bias),
          *_dense(attn + ("key",), theirs + "attention.self.key", bias=model.qkv_bias),
          *_dense(attn + ("value",), theirs + "attention.self.value", bias=model.qkv_bias),
          Tensor(attn + ("relative_position_bias_table",), theirs + "attention.self.relative_position_bias_table"),
          *_dense(attn + ("out",), theirs + "attention.output.dense", "linear2"),
          *_norm(ours + ("norm2",), theirs + "layernorm_after"),
          *_dense(ours + ("mlp", "fc1"), theirs + "intermediate.dense"),
          *_dense(ours + ("mlp", "fc2"), theirs + "output.dense"),
      ]
    if stage < len(model.depths) - 1:
      theirs = f"swin.encoder.layers.{stage}.downsample."
      table += [*_norm(p + (f"merge_{stage}", "norm"), theirs + "norm"),
                *_dense(p + (f"merge_{stage}", "reduction"), theirs + "reduction", bias=False)]
  if model.num_classes:
    table += _dense(p + ("head",), "classifier")
  return table


def hf_config(model: SwinTransformer) -> dict:
  if model.layer_norm_eps != 1e-5:
    raise ValueError(f"This model has layer_norm_eps={model.layer_norm_eps}; transformers' Swin would keep 1e-05 "
                     "in its embedding and patch-merging norms, so only 1e-05 can be saved.")
  return dict(
      model_type=HF_MODEL_TYPE,
      architectures=["SwinForImageClassification" if model.num_classes else "SwinModel"],
      image_size=model.image_size, patch_size=model.patch_size, num_channels=3, embed_dim=model.embed_dim,
      depths=list(model.depths), num_heads=list(model.num_heads), window_size=model.window_size,
      mlp_ratio=model.mlp_ratio, qkv_bias=model.qkv_bias, hidden_act="gelu", use_absolute_embeddings=False,
      layer_norm_eps=model.layer_norm_eps, hidden_dropout_prob=model.dropout,
      attention_probs_dropout_prob=model.attention_dropout, drop_path_rate=model.drop_path,
      encoder_stride=model.patch_size * 2 ** (len(model.depths) - 1),
  )
