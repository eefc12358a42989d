"""How a model describes its parameters to the optimizer, as timm's group_matcher and no_weight_decay do, so the
optimizer never guesses a family from parameter names.

A model (VisionTransformer, SwinTransformer, ResNet) answers three methods, ParamGroups:
  layer_id(path)       its layer for layer-wise lr decay: 0 for the embeddings, one id per block (or stage) in the
                       order they run, num_layer_ids() - 1 for the final norm and head; None for a path it does
                       not know (the optimizer names those)
  num_layer_ids()
  no_weight_decay()    regexes; a parameter whose path one of them matches (re.search) takes no weight decay
Paths are the "/"-joined keys of the model's own params tree, e.g. "block_3/attn/query/kernel".

A model that wraps others (a detector: backbone, neck, head) answers for a submodule's parameters by asking it
about the path below the submodule's name (relative_path). The patterns here are written `(^|/)name$`, so they
match at any depth and a wrapped model's no_weight_decay() serves its wrapper unchanged.
"""

import re
from typing import Optional, Protocol, runtime_checkable

# Every family: biases and norm (LayerNorm, BatchNorm) scales; decaying them hurts accuracy in every recipe.
NO_WEIGHT_DECAY = (r"(^|/)bias$", r"(^|/)scale$")
# Residual blocks of a staged model (ResNet, Swin), as top-level names: "stage_2_block_5".
STAGE_BLOCK = re.compile(r"^stage_(\d+)_block_(\d+)$")


@runtime_checkable
class ParamGroups(Protocol):
  def layer_id(self, path: str) -> Optional[int]: ...

  def num_layer_ids(self) -> int: ...

  def no_weight_decay(self) -> tuple[str, ...]: ...


def top_level(path: str) -> str:
  """The top-level module (or parameter) a path lives in."""
  return path.split("/", 1)[0]


def relative_path(path: str, submodule: str) -> Optional[str]:
  """`path` below the top-level `submodule`, or None when the parameter lives elsewhere."""
  head, _, rest = path.partition("/")
  return rest if head == submodule and rest else None
