"""Google's .npz checkpoints: ViT from big_vision and google-research/vision_transformer (incl. AugReg and the
ResNet hybrids, R50+ViT-B/16 ...), and BiT ResNetV2 from google-research/big_transfer (weights/bit.py).

The architecture is read off the tensor shapes, so any released size loads without a config. Both ViT naming
generations are understood: vision_transformer's (MultiHeadDotProductAttention_1, MlpBlock_3, LayerNorm_0/2,
class token inside the position embedding) and big_vision's (..._0, MlpBlock_0, LayerNorm_0/1, position
embedding for patches only). A hybrid's ResNet is at the top level: conv_root, gn_root, block1/unit1/conv1 ...
"""

import pathlib
import re


from lvm_jax.models import registry
from lvm_jax.models.vit import VisionTransformer, hybrid_resnet
from lvm_jax.weights import bit, files, mapping
from lvm_jax.weights.mapping import Tensor
from lvm_jax.weights.preprocessing import Preprocessing


def preprocessing(model: VisionTransformer) -> Preprocessing:
  """Both releases train on images resized to the model's size and scaled to [-1, 1]."""
  return Preprocessing(
    size=(model.image_size, model.image_size), interpolation="bilinear", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)
  )


_PREFIXES = ("", "params/", "opt/target/")


def _names(tensors: dict) -> tuple[str, str, str, str, str]:
  """(prefix, attention, mlp, first norm, second norm) module names used by this file."""
  for prefix in _PREFIXES:
    if prefix + "embedding/kernel" in tensors:
      break
  else:
    raise ValueError(
      "neither a ViT checkpoint (no 'embedding/kernel' nor 'params/embedding/kernel') nor a BiT one (no "
      f"{bit.BIT_NPZ_NAMES.stem_conv + '/kernel'!r})."
    )
  block = prefix + "Transformer/encoderblock_0/"
  if block + "MultiHeadDotProductAttention_1/query/kernel" in tensors:
    return prefix, "MultiHeadDotProductAttention_1", "MlpBlock_3", "LayerNorm_0", "LayerNorm_2"
  if block + "MultiHeadDotProductAttention_0/query/kernel" in tensors:
    return prefix, "MultiHeadDotProductAttention_0", "MlpBlock_0", "LayerNorm_0", "LayerNorm_1"
  raise ValueError(f"no attention weights under {block}: expected MultiHeadDotProductAttention_0 or _1.")


def model_args(tensors: dict) -> dict:
  prefix, attn, mlp, _, _ = _names(tensors)
  kernel = tensors[prefix + "embedding/kernel"]
  patch, width = kernel.shape[0], kernel.shape[-1]
  depth = len(
    {m.group(1) for n in tensors if (m := re.match(re.escape(prefix) + r"Transformer/encoderblock_(\d+)/", n))}
  )
  heads = tensors[f"{prefix}Transformer/encoderblock_0/{attn}/query/kernel"].shape[1]
  mlp_dim = tensors[f"{prefix}Transformer/encoderblock_0/{mlp}/Dense_0/kernel"].shape[1]
  pos_name = prefix + "Transformer/posembed_input/pos_embedding"
  if prefix + "MAPHead_0/probe" in tensors:
    raise ValueError("ViT with a MAP (attention-pooling) head is not supported yet; 'token' and 'gap' are.")
  has_cls = prefix + "cls" in tensors
  tokens = tensors[pos_name].shape[1]
  grid = int(round((tokens - has_cls) ** 0.5))
  no_embed_class = has_cls and grid * grid == tokens
  if no_embed_class:
    grid = int(round(tokens**0.5))
  if grid * grid not in (tokens, tokens - 1):
    raise ValueError(f"{pos_name} has {tokens} tokens: not a square patch grid.")
  head = tensors.get(prefix + "head/kernel")
  pre_logits = tensors.get(prefix + "pre_logits/kernel")
  hybrid = _hybrid_args(tensors, prefix)
  stride = VisionTransformer(patch_size=patch, **hybrid).patch_stride
  return dict(
    **hybrid,
    image_size=grid * stride,
    patch_size=patch,
    width=width,
    depth=depth,
    mlp_dim=mlp_dim,
    num_heads=heads,
    pooling="token" if has_cls else "gap",
    class_token=has_cls,
    no_embed_class=no_embed_class,
    representation_size=None if pre_logits is None else pre_logits.shape[1],
    num_classes=0 if head is None else head.shape[1],
    layer_norm_eps=1e-6,
  )


_HYBRID_UNIT = r"block(\d+)/unit(\d+)/"


def _hybrid_args(tensors: dict, prefix: str) -> dict:
  """resnet_depths / resnet_width of a hybrid's ResNet (conv_root, block<s>/unit<i>); {} for a plain ViT."""
  root = tensors.get(prefix + bit.HYBRID_NPZ_NAMES.stem_conv + "/kernel")
  if root is None:
    return {}
  units = {(int(m.group(1)), int(m.group(2))) for n in tensors if (m := re.match(re.escape(prefix) + _HYBRID_UNIT, n))}
  depths = []
  while found := sorted(i for s, i in units if s == len(depths) + 1):
    if found != list(range(1, len(found) + 1)):
      raise ValueError(f"block{len(depths) + 1} has units {found}; expected unit1 ... unit{len(found)}.")
    depths.append(len(found))
  if sum(depths) != len(units):
    raise ValueError(f"hybrid ResNet blocks are not consecutive from block1: {sorted({s for s, _ in units})}.")
  return dict(resnet_depths=tuple(depths), resnet_width=int(root.shape[-1]))


def table(model: VisionTransformer, tensors: dict) -> list[Tensor]:
  """Our paths against the .npz names; the arrays are already in Flax layout."""
  prefix, attn, mlp, ln1, ln2 = _names(tensors)
  p = ("params",)
  rows = [
    (("patch_embed", "kernel"), "embedding/kernel"),
    (("patch_embed", "bias"), "embedding/bias"),
    (("pos_embed",), "Transformer/posembed_input/pos_embedding"),
    (("norm", "scale"), "Transformer/encoder_norm/scale"),
    (("norm", "bias"), "Transformer/encoder_norm/bias"),
  ]
  if model.class_token:
    rows.append((("cls_token",), "cls"))
  per_block = [
    (("norm1", "scale"), f"{ln1}/scale"),
    (("norm1", "bias"), f"{ln1}/bias"),
    (("norm2", "scale"), f"{ln2}/scale"),
    (("norm2", "bias"), f"{ln2}/bias"),
  ]
  for ours, theirs in (
    (("attn", "query"), f"{attn}/query"),
    (("attn", "key"), f"{attn}/key"),
    (("attn", "value"), f"{attn}/value"),
    (("attn", "out"), f"{attn}/out"),
    (("mlp", "fc1"), f"{mlp}/Dense_0"),
    (("mlp", "fc2"), f"{mlp}/Dense_1"),
  ):
    per_block += [(ours + ("kernel",), f"{theirs}/kernel"), (ours + ("bias",), f"{theirs}/bias")]
  for i in range(model.depth):
    rows += [((f"block_{i}",) + ours, f"Transformer/encoderblock_{i}/{theirs}") for ours, theirs in per_block]
  if model.representation_size is not None:
    rows += [(("pre_logits", "kernel"), "pre_logits/kernel"), (("pre_logits", "bias"), "pre_logits/bias")]
  if model.num_classes:
    rows += [(("head", "kernel"), "head/kernel"), (("head", "bias"), "head/bias")]
  resnet = []
  if model.resnet_depths is not None:
    resnet = bit.table(hybrid_resnet(model), bit.HYBRID_NPZ_NAMES, p + ("resnet",), prefix)
  return [Tensor(p + path, prefix + name) for path, name in rows] + resnet


def load(path: pathlib.Path, **overrides):
  """(model, variables) from a big_vision / vision_transformer .npz file (ViT or hybrid), or a big_transfer one
  (BiT ResNetV2), told apart by their names."""
  tensors = files.read_npz(path)
  if bit.is_npz(tensors):
    return bit.load_npz(tensors, str(path), **overrides)
  model = registry.build(VisionTransformer, mapping.read_model_args(model_args, tensors, str(path)), overrides)
  # Optimizer state and other training leftovers in the file are not part of the model.
  prefix = _names(tensors)[0]
  tensors = {k: v for k, v in tensors.items() if k.startswith(prefix) and not k.startswith(prefix + "opt/")}
  variables = mapping.load_variables(
    table(model, tensors), tensors, registry.abstract_variables(model), source=str(path)
  )
  return model, variables
