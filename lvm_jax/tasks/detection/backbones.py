"""The detector's backbones behind one interface, and how a config names one.

A backbone is a flax module answering `backbone(x, train=train, return_features=True)` with NHWC maps keyed by
stride, at least {"stride_8", "stride_16", "stride_32"} (the FPN's C3..C5), that describes its parameters to the
optimizer (models/param_groups.py). ResNet and SwinTransformer already are (stride_4 ... stride_32). A plain ViT
has one stride-16 token grid; ViTBackbone makes the pyramid from it as ViTDet does (Li et al. 2022, "Exploring
Plain Vision Transformer Backbones for Object Detection"): the "simple feature pyramid".

What is kept from ViTDet: the pyramid from one block's grid (the last by default) by 2x2 transposed convolutions
(stride 8 from a patch-16 ViT; 4x is two of them with LayerNorm and GELU between), identity (16) and 2x2 max pooling
(32), each followed by a 1x1 and a 3x3 convolution without bias, each with LayerNorm over channels; the block's
output before the ViT's final norm (ViTDet's backbone has none); absolute position embeddings resized to the canvas.
What is not: ViTDet's window attention and relative position biases in the ViT (ours attends globally, as it was
pre-trained), and its own P6 (the detector's FPN makes P6 and P7).
"""

import functools
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lvm_jax import normalization  # IMAGENET_DEFAULT: where a checkpoint does not say
from lvm_jax.models import layers, param_groups, registry
from lvm_jax.models.resnet import ResNet
from lvm_jax.models.swin import SwinTransformer
from lvm_jax.models.vit import VisionTransformer
from lvm_jax.weights import pretrained as pretrained_lib

# detectron2's c2_msra_fill, which ViTDet's pyramid convolutions start from: He normal over fan_out
# (layers.he_normal_fan_out), zero biases.
# torch's default ConvTranspose2d init, U(+-1/sqrt(fan_in)).
_DECONV_INIT = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
SPEC_KEYS = ("model", "pretrained", "model_args", "pyramid")


class SimpleFeaturePyramid(nn.Module):
  """ViTDet's simple feature pyramid: maps at `strides` from one [B, h, w, C] grid of stride `grid_stride`.

  Each stride is grid_stride * 2**k: k < 0 upsamples by -k 2x2 stride-2 transposed convolutions (halving the
  channels each, LayerNorm + GELU between two), k = 0 is the grid itself, k > 0 max-pools 2**k x 2**k. Then a 1x1
  and a 3x3 convolution to `channels`, each without bias and followed by LayerNorm. Parameters stride_<s>_up_<i>,
  stride_<s>_up_norm_<i>, stride_<s>_lateral(_norm), stride_<s>_output(_norm); the transposed convolutions' kernels
  are flax's [kh, kw, in, out], which is torch's ConvTranspose2d weight [in, out, kh, kw] flipped in space.
  """

  grid_stride: int
  channels: int = 256
  strides: Sequence[int] = (8, 16, 32)
  layer_norm_eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def steps(self) -> dict[int, int]:
    """{stride: k} with stride = grid_stride * 2**k; raises ValueError for a stride not of that form."""
    steps = {}
    for stride in self.strides:
      ratio = max(stride, self.grid_stride) / min(stride, self.grid_stride)
      k = int(round(np.log2(ratio)))
      if stride <= 0 or 2**k != ratio or stride in steps:
        raise ValueError(
          f"Simple feature pyramid strides={tuple(self.strides)} must be distinct multiples of the grid stride "
          f"{self.grid_stride} by powers of 2 (e.g. 8, 16, 32 from a patch-16 ViT); {stride} is not."
        )
      steps[stride] = k if stride >= self.grid_stride else -k
    return steps

  @nn.compact
  def __call__(self, grid: jax.Array) -> dict[str, jax.Array]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = functools.partial(
      nn.LayerNorm,
      epsilon=self.layer_norm_eps,
      scale_init=layers.partitioned(layers.ones, ("conv_out",)),
      bias_init=layers.partitioned(layers.zeros, ("conv_out",)),
      **kw,
    )
    conv_kernel = layers.partitioned(layers.he_normal_fan_out, (None, None, "conv_in", "conv_out"))
    features = {}
    for stride, k in self.steps().items():
      name = f"stride_{stride}"
      x, width = grid, grid.shape[-1]
      for step in range(-k):
        if step:
          x = layers.gelu(norm(name=f"{name}_up_norm_{step - 1}")(x))
        width //= 2
        x = nn.ConvTranspose(
          width,
          (2, 2),
          strides=(2, 2),
          kernel_init=layers.partitioned(_DECONV_INIT, (None, None, "conv_in", "conv_out")),
          bias_init=layers.partitioned(layers.zeros, ("conv_out",)),
          name=f"{name}_up_{step}",
          **kw,
        )(x)
      if k > 0:
        x = nn.max_pool(x, (2**k, 2**k), strides=(2**k, 2**k))
      x = nn.Conv(self.channels, (1, 1), use_bias=False, kernel_init=conv_kernel, name=f"{name}_lateral", **kw)(x)
      x = norm(name=f"{name}_lateral_norm")(x)
      x = nn.Conv(
        self.channels, (3, 3), padding=1, use_bias=False, kernel_init=conv_kernel, name=f"{name}_output", **kw
      )(x)
      x = norm(name=f"{name}_output_norm")(x)
      features[name] = layers.constrain(x, ("batch", "height", "width", "conv_out"))
    return features


class ViTBackbone(nn.Module):
  """A plain ViT as a multi-scale backbone: one block's patch-token grid through a SimpleFeaturePyramid.

  vit: the VisionTransformer, built with dynamic_image_size=True for canvases other than its image_size
    (build_backbone does). Parameters: "vit" (the ViT's own tree, as from_pretrained gives it, less what the
    chosen block does not need: later blocks, the final norm, the head) and "pyramid".
  block: which block's output feeds the pyramid (negative counts from the last).
  channels, strides: of the pyramid's maps; strides are the ViT's patch size times powers of 2.
  The canvas height and width must be multiples of the largest stride (and of the patch size), so that every map
  is exactly canvas / stride.
  """

  vit: VisionTransformer
  channels: int = 256
  block: int = -1
  strides: Sequence[int] = (8, 16, 32)

  def feature_channels(self) -> dict[str, int]:
    return {f"stride_{s}": self.channels for s in self.strides}

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False, return_features: bool = True) -> dict[str, jax.Array]:
    if not return_features:
      raise ValueError("ViTBackbone gives feature maps only: call it with return_features=True.")
    multiple = max(max(self.strides), self.vit.patch_stride)
    if x.shape[1] % multiple or x.shape[2] % multiple:
      raise ValueError(
        f"ViTBackbone with strides {tuple(self.strides)} needs a canvas whose sides are multiples of {multiple}, "
        f"got {x.shape[1]}x{x.shape[2]}."
      )
    (grid,) = self.vit(x, train=train, return_blocks=(self.block,))
    return _pyramid(self, name="pyramid")(grid)

  def layer_id(self, path: str) -> Optional[int]:
    """The ViT's layer ids for its parameters; the pyramid shares the last id (the ViT's head's), so layer-wise
    lr decay leaves it at the full rate, as ViTDet does for everything outside the ViT."""
    if (rest := param_groups.relative_path(path, "vit")) is not None:
      return self.vit.layer_id(rest)
    return self.num_layer_ids() - 1 if param_groups.top_level(path) == "pyramid" else None

  def num_layer_ids(self) -> int:
    return self.vit.num_layer_ids()

  def no_weight_decay(self) -> tuple[str, ...]:
    return self.vit.no_weight_decay()  # patterns match at any depth: "vit/pos_embed" as "pos_embed"


def _pyramid(backbone: ViTBackbone, name: Optional[str] = None) -> SimpleFeaturePyramid:
  """The backbone's pyramid: its submodule when built inside its __call__, an unbound module elsewhere (to
  initialise it without the ViT). A function, not a method: flax makes a module built in any method its child."""
  vit = backbone.vit
  kw = dict(dtype=vit.dtype, param_dtype=vit.param_dtype, layer_norm_eps=vit.layer_norm_eps, name=name)
  return SimpleFeaturePyramid(vit.patch_stride, backbone.channels, tuple(backbone.strides), **kw)


def feature_channels(backbone: nn.Module) -> dict[str, int]:
  """{"stride_<s>": channels} of each map a backbone returns with return_features=True (besides "pooled")."""
  if hasattr(backbone, "feature_channels"):  # ViTBackbone, ConvNeXt
    return backbone.feature_channels()
  if isinstance(backbone, ResNet):
    specs = backbone.block_specs()
    return {f"stride_{4 * 2**spec.stage}": spec.out_channels for spec in specs}  # a stage's last block wins
  if isinstance(backbone, SwinTransformer):
    p, width = backbone.patch_size, backbone.embed_dim
    return {f"stride_{p * 2**stage}": width * 2**stage for stage in range(len(backbone.depths))}
  raise TypeError(
    f"feature_channels knows ResNet, SwinTransformer, ConvNeXt and ViTBackbone, not {type(backbone).__name__}."
  )


class Backbone(NamedTuple):
  """What build_backbone gives: the module, where its variables start, and the input normalization."""

  module: nn.Module
  variables: Optional[dict]  # None: the detector initialises it
  mean_std: Optional[tuple]  # a pretrained checkpoint's (mean, std) in 0..1 units; None for a fresh model


def build_backbone(spec: Mapping[str, Any], *, seed: int = 0) -> Backbone:
  """A detector backbone from a config-like spec, its starting variables and input normalization.

  Args:
    spec: a mapping (or ml_collections ConfigDict) with exactly one of
        model: a registered name (lvm_jax.list_models()), built by create_model with num_classes=0;
        pretrained: a checkpoint source (lvm_jax.load_checkpoint), used as from_pretrained(source,
          num_classes=0) gives it: without its head;
      and optionally
        model_args: overrides of the model's arguments (dtype, drop_path, scan_layers, ...; with `pretrained`,
          those that do not change the weights);
        pyramid: for a ViT, ViTBackbone's channels / block / strides.
      A ViT is wrapped in a ViTBackbone (with dynamic_image_size=True); ResNet and Swin are returned as they are.
    seed: the key of the fresh pyramid parameters of a pretrained ViT.

  Returns:
    Backbone(module, variables, mean_std): variables None for a `model` (the detector initialises it), else the
    checkpoint's variables as loaded (the arrays themselves, for the parameters the backbone uses; a ViT's pyramid
    fresh), in the tree module.init gives; mean_std the checkpoint's preprocessing (ImageNet's, torchvision's
    detectors' too, where the checkpoint does not say), None for a `model`.

  Raises:
    ValueError: a spec with both or neither of model / pretrained, unknown keys, num_classes in model_args, or a
      pyramid for a model that is not a ViT.
  """
  spec = dict(spec.to_dict() if hasattr(spec, "to_dict") else spec)
  unknown = sorted(set(spec) - set(SPEC_KEYS))
  if unknown or (spec.get("model") is None) == (spec.get("pretrained") is None):
    raise ValueError(
      f"A backbone spec takes exactly one of 'model' (a registered name) or 'pretrained' (a checkpoint), plus "
      f"optional 'model_args' and 'pyramid'; got {spec}" + (f" (unknown keys {unknown})." if unknown else ".")
    )
  model_args = dict(spec.get("model_args") or {})
  if "num_classes" in model_args:
    raise ValueError("A backbone has no classifier head: leave num_classes out of its model_args.")
  mean_std = None
  if spec.get("model") is not None:
    model, variables = registry.create_model(spec["model"], num_classes=0, **model_args), None
  else:
    # from_pretrained(source, num_classes=0), less the jitted init of a whole model that it does to drop the head.
    checkpoint = pretrained_lib.load_checkpoint(spec["pretrained"], **model_args)
    model, variables = checkpoint.model.clone(num_classes=0), checkpoint.variables
    preprocessing = checkpoint.preprocessing
    mean_std = normalization.IMAGENET_DEFAULT if preprocessing is None else (preprocessing.mean, preprocessing.std)
  pyramid = dict(spec.get("pyramid") or {})
  if not isinstance(model, VisionTransformer):
    if pyramid:
      raise ValueError(f"'pyramid' configures a ViT's feature pyramid; {type(model).__name__} has its own stages.")
    return Backbone(model, None if variables is None else _used_variables(model, variables, None), mean_std)
  backbone = ViTBackbone(model.clone(dynamic_image_size=True), **pyramid)
  if variables is None:
    return Backbone(backbone, None, None)
  canvas = max(max(backbone.strides), model.patch_stride)  # the smallest the backbone takes
  grid = jnp.zeros((1, canvas // model.patch_stride, canvas // model.patch_stride, model.width), model.dtype)
  fresh = nn.meta.unbox(jax.jit(_pyramid(backbone).init)(jax.random.key(seed), grid))
  loaded = {"params": {"vit": variables["params"], "pyramid": fresh["params"]}}
  return Backbone(backbone, _used_variables(backbone, loaded, canvas), mean_std)


def _used_variables(backbone: nn.Module, variables: dict, size: Optional[int]) -> dict:
  """The leaves of `variables` that backbone.init would create (the same arrays), checked for shape."""
  size = size or 64
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  wanted = nn.meta.unbox(jax.eval_shape(lambda x: backbone.init(jax.random.key(0), x, return_features=True), x))

  def pick(want, have, path):
    if not isinstance(want, Mapping):
      if getattr(have, "shape", None) != want.shape:
        raise ValueError(
          f"Backbone variable {path} is {want.shape}; the checkpoint has {getattr(have, 'shape', None)}."
        )
      return have
    if not isinstance(have, Mapping) or set(want) - set(have):
      missing = sorted(set(want) - set(have)) if isinstance(have, Mapping) else "all"
      raise ValueError(f"The checkpoint lacks backbone variables {path}/{missing}.")
    return {key: pick(want[key], have[key], f"{path}/{key}") for key in want}

  return pick(wanted, variables, "")
