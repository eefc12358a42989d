"""The dense prediction heads of RetinaNet (Lin et al. 2017; torchvision's v1 and v2) and FCOS (Tian et al. 2019),
shared by every FPN level, with torchvision's layers, initialisation and output layout.

Each head returns per-level lists (P3..P7 in the order given), each level flattened as torchvision flattens it:
locations row-major, then the anchors of a location, so level l is [B, H_l * W_l * A, K]. Outputs are float32
whatever the compute dtype: box decoding and the losses need the precision.
"""

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lvm_jax.models import layers

# torchvision initialises every head convolution with normal(std=0.01) weights and zero biases, except the
# classification bias (prior_bias).
_HEAD_INIT = nn.initializers.normal(0.01)
GROUP_NORM_GROUPS = 32  # torchvision's partial(nn.GroupNorm, 32)
GROUP_NORM_EPS = 1e-5  # torch's GroupNorm default


def prior_bias(prior_probability: float):
  """The classification bias init -log((1 - p) / p): every class starts at probability p (focal loss paper, 3.3)."""
  if not 0.0 < prior_probability < 1.0:
    raise ValueError(f"prior_probability must be in (0, 1), got {prior_probability}.")
  return nn.initializers.constant(-math.log((1 - prior_probability) / prior_probability))


def flatten_level(y: jax.Array, per_anchor: int) -> jax.Array:
  """[B, H, W, A * per_anchor] -> [B, H * W * A, per_anchor] in float32. Channel a * per_anchor + k is anchor a's
  k-th output, as torchvision's view(N, A, K, H, W).permute(0, 3, 4, 1, 2) reads it."""
  return y.reshape(y.shape[0], -1, per_anchor).astype(jnp.float32)


class Tower(nn.Module):
  """num_convs x (3x3 conv [+ GroupNorm(32)] + ReLU) at constant width: the trunk of a head branch.

  group_norm: torchvision's RetinaNet v2 and FCOS; conv_bias: torchvision gives the convolutions a bias unless a
  norm follows (RetinaNet v1: bias, v2: none) except in FCOS, whose convolutions keep theirs before GroupNorm.
  Parameters conv_<i> (and norm_<i>), i = 0 .. num_convs - 1.
  """

  num_convs: int = 4
  group_norm: bool = False
  conv_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    if self.group_norm and width % GROUP_NORM_GROUPS:
      raise ValueError(f"GroupNorm({GROUP_NORM_GROUPS}) needs channels divisible by {GROUP_NORM_GROUPS}; got {width}.")
    for i in range(self.num_convs):
      x = layers.Conv2d(
        width,
        3,
        use_bias=self.conv_bias,
        kernel_init=_HEAD_INIT,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=f"conv_{i}",
      )(x)
      if self.group_norm:
        x = nn.GroupNorm(
          num_groups=GROUP_NORM_GROUPS,
          epsilon=GROUP_NORM_EPS,
          use_fast_variance=False,  # mean((x - mean)^2), as torch; E[x^2] - mean^2 loses digits
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          scale_init=layers.partitioned(layers.ones, ("conv_out",)),
          bias_init=layers.partitioned(layers.zeros, ("conv_out",)),
          name=f"norm_{i}",
        )(x)
      x = nn.relu(x)
    return layers.constrain(x, ("batch", "height", "width", "conv_out"))


def predictor(features: int, name: str, bias_init=layers.zeros, **kw) -> layers.Conv2d:
  """The last 3x3 convolution of a branch (`features` = anchors x values per anchor), torchvision's init."""
  return layers.Conv2d(features, 3, kernel_init=_HEAD_INIT, bias_init=bias_init, name=name, **kw)


class RetinaNetHead(nn.Module):
  """RetinaNet's classification and box-regression branches.

  version: "v1" (torchvision's retinanet_resnet50_fpn: conv + ReLU towers) or "v2" (retinanet_resnet50_fpn_v2:
  conv without bias + GroupNorm(32) + ReLU).
  Returns {"cls_logits": per level [B, H*W*A, num_classes], "box_regression": per level [B, H*W*A, 4]} (deltas
  (dx, dy, dw, dh) relative to the anchors).
  Parameters: cls_tower, cls_logits, box_tower, box_regression.
  """

  num_classes: int
  num_anchors: int = 9
  version: str = "v1"
  num_convs: int = 4
  prior_probability: float = 0.01
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pyramid: Sequence[jax.Array]) -> dict[str, list[jax.Array]]:
    if self.version not in ("v1", "v2"):
      raise ValueError(f"RetinaNetHead version must be 'v1' or 'v2', got {self.version!r}.")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    v2 = self.version == "v2"
    cls_tower = Tower(self.num_convs, group_norm=v2, conv_bias=not v2, name="cls_tower", **kw)
    box_tower = Tower(self.num_convs, group_norm=v2, conv_bias=not v2, name="box_tower", **kw)
    cls_logits = predictor(self.num_anchors * self.num_classes, "cls_logits", prior_bias(self.prior_probability), **kw)
    box_regression = predictor(self.num_anchors * 4, "box_regression", **kw)
    return {
      "cls_logits": [flatten_level(cls_logits(cls_tower(p)), self.num_classes) for p in pyramid],
      "box_regression": [flatten_level(box_regression(box_tower(p)), 4) for p in pyramid],
    }


class FCOSHead(nn.Module):
  """FCOS's classification branch and its box branch with centerness, as torchvision's FCOSHead (one point a
  location; conv + GroupNorm(32) + ReLU towers, convolutions with biases).

  Returns {"cls_logits": per level [B, H*W, num_classes], "box_regression": per level [B, H*W, 4] (relu'd (l, t,
  r, b) distances in units of the level's anchor size), "centerness": per level [B, H*W, 1] logits}.
  Parameters: cls_tower, cls_logits, box_tower, box_regression, centerness.
  """

  num_classes: int
  num_convs: int = 4
  prior_probability: float = 0.01
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pyramid: Sequence[jax.Array]) -> dict[str, list[jax.Array]]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    cls_tower = Tower(self.num_convs, group_norm=True, conv_bias=True, name="cls_tower", **kw)
    box_tower = Tower(self.num_convs, group_norm=True, conv_bias=True, name="box_tower", **kw)
    cls_logits = predictor(self.num_classes, "cls_logits", prior_bias(self.prior_probability), **kw)
    box_regression = predictor(4, "box_regression", **kw)
    centerness = predictor(1, "centerness", **kw)
    outputs = {"cls_logits": [], "box_regression": [], "centerness": []}
    for p in pyramid:
      box_features = box_tower(p)
      outputs["cls_logits"].append(flatten_level(cls_logits(cls_tower(p)), self.num_classes))
      outputs["box_regression"].append(flatten_level(nn.relu(box_regression(box_features)), 4))
      outputs["centerness"].append(flatten_level(centerness(box_features), 1))
    return outputs
