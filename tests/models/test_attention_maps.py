"""Attention weights sown by layers.Attention, against transformers' output_attentions, and the maps built on them."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification

import lvm_jax
from lvm_jax import kernels
from lvm_jax.models import attention_maps, layers
from lvm_jax.models.vit import VisionTransformer, stack_blocks
from tests import torch_reference as ref

HF_TINY = dict(
  hidden_size=32,
  num_hidden_layers=2,
  num_attention_heads=4,
  intermediate_size=64,
  image_size=32,
  patch_size=8,
  num_labels=3,
  attn_implementation="eager",  # the fused (sdpa) path returns no attention weights
)
TINY = dict(num_classes=3, image_size=32, patch_size=8, width=32, depth=2, mlp_dim=64, num_heads=4)


@pytest.fixture(scope="module")
def hf_vit(tmp_path_factory):
  """(lvm_jax model, variables, images, transformers' attentions [layers, batch, heads, 17, 17])."""
  torch.manual_seed(0)
  # Scale 0.5 spreads the logits, so the softmax is far from uniform and a wrong weight would show.
  torch_model = ref.randomize(ViTForImageClassification(ViTConfig(**HF_TINY)), scale=0.5)
  folder = tmp_path_factory.mktemp("vit_attention")
  torch_model.save_pretrained(folder)
  model, variables = lvm_jax.from_pretrained(folder)
  x = ref.images(2, 32)
  with torch.no_grad():
    out = torch_model(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), output_attentions=True)
  expected = np.stack([a.numpy() for a in out.attentions])
  return model, variables, x, expected


def test_weights_match_transformers_for_every_layer(hf_vit):
  model, variables, x, expected = hf_vit
  weights = attention_maps.attention_weights(model, variables, x)
  assert weights.shape == (2, 2, 4, 17, 17) and weights.dtype == jnp.float32
  assert expected.max() > 0.5  # peaked rows: the comparison is not between near-uniform weights
  np.testing.assert_allclose(weights, expected, atol=1e-5, rtol=0)
  np.testing.assert_allclose(weights.sum(axis=-1), 1.0, atol=1e-6)
  np.testing.assert_allclose(
    attention_maps.class_token_attention(weights, model.grid_size),
    expected[-1, :, :, 0, 1:].mean(axis=1).reshape(2, 4, 4),
    atol=1e-5,
    rtol=0,
  )


def test_scanned_layers_give_the_per_layer_weights(hf_vit):
  model, variables, x, _ = hf_vit
  params = nn.meta.unbox(variables)["params"]
  scanned = attention_maps.attention_weights(model.clone(scan_layers=True), {"params": stack_blocks(params)}, x)
  per_layer = attention_maps.attention_weights(model, variables, x)
  np.testing.assert_allclose(scanned, per_layer, atol=1e-6, rtol=0)


def test_weights_give_the_attention_output():
  # Swin's case: a bias grouped over the batch (example i takes bias[i % 2]), and padding keys masked out.
  attention = layers.Attention(num_heads=2)
  x = jax.random.normal(jax.random.key(0), (4, 6, 8))
  bias = jax.random.normal(jax.random.key(1), (2, 2, 6, 6))
  params = nn.meta.unbox(attention.init(jax.random.key(2), x, train=False))["params"]
  for cpu_kernels in (True, False):
    with kernels.use_cpu_kernels(cpu_kernels):
      out, state = attention.apply(
        {"params": params}, x, train=False, bias=bias, valid_length=5, mutable=["intermediates"]
      )
    (weights,) = state["intermediates"]["attention_weights"]
    assert weights.shape == (4, 2, 6, 6)
    np.testing.assert_array_equal(weights[..., 5], 0.0)
    value = jnp.einsum("bkd,dnh->bknh", x, params["value"]["kernel"]) + params["value"]["bias"]
    heads = jnp.einsum("bnqk,bknh->bqnh", weights, value)
    expected = jnp.einsum("bqnh,nhd->bqd", heads, params["out"]["kernel"]) + params["out"]["bias"]
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)


def test_padded_encoder_weights_are_cut_to_the_tokens(monkeypatch):
  # attention_impl="cudnn" pads 17 tokens to 18; run that path with XLA's kernel, which CPUs have.
  jax_attention = kernels.jax_attention
  monkeypatch.setattr(kernels, "jax_attention", lambda q, k, v, b, n, impl: jax_attention(q, k, v, b, n, "xla"))
  model = VisionTransformer(**TINY)
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  variables = model.init(jax.random.key(0), x)
  padded = attention_maps.attention_weights(model.clone(attention_impl="cudnn"), variables, x)
  np.testing.assert_allclose(padded, attention_maps.attention_weights(model, variables, x), atol=1e-6, rtol=0)


def test_plain_apply_computes_no_weights(monkeypatch):
  def refuse(*args):
    raise AssertionError("attention weights computed without a request for intermediates")

  monkeypatch.setattr(layers, "attention_probabilities", refuse)
  x = jnp.ones((2, 32, 32, 3))
  for scan in (False, True):
    model = VisionTransformer(**TINY, scan_layers=scan, attention_dropout=0.1)
    variables = model.init(jax.random.key(0), x)
    assert set(variables) == {"params"}
    assert jnp.shape(model.apply(variables, x)) == (2, 3)  # an array, not (logits, state)

    def loss(params):
      return model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(1)}).sum()

    jax.jit(lambda v: model.apply(v, x)).lower(variables)
    jax.jit(jax.grad(loss)).lower(variables["params"])
    with pytest.raises(AssertionError, match="without a request"):  # the patch is the one the layer calls
      model.apply(variables, x, mutable=["intermediates"])


def uniform(layers_, batch, heads, tokens):
  return jnp.full((layers_, batch, heads, tokens, tokens), 1.0 / tokens)


def test_rollout_of_uniform_attention_is_uniform():
  for prefix in (0, 1):
    tokens = 16 + prefix
    rollout = attention_maps.attention_rollout(uniform(3, 2, 4, tokens), 4)
    # (U/2 + I/2)^3 = (1 - 1/8) U + I/8 with U the uniform matrix (U U = U): from the class token's row every
    # patch gets 7/8 / tokens; the mean of all rows gives each 1 / tokens.
    expected = 7 / 8 / tokens if prefix else 1 / tokens
    np.testing.assert_allclose(rollout, np.full((2, 4, 4), expected), atol=1e-7, rtol=0)


# Two layers over a class token and a 1x2 grid. Layer 1's heads average to [[0 .5 .5] [1 0 0] [0 0 1]], so
# A1 = [[.5 .25 .25] [.5 .5 0] [0 0 1]]; layer 2 sends every query to token 1: A2 = [[.5 .5 0] [0 1 0] [0 .5 .5]].
# A2 A1 = [[.5 .375 .125] [.5 .5 0] [.25 .25 .5]].
HAND = np.array(
  [
    [[[0, 1, 0], [1, 0, 0], [0, 0, 1]], [[0, 0, 1], [1, 0, 0], [0, 0, 1]]],
    [[[0, 1, 0], [0, 1, 0], [0, 1, 0]], [[0, 1, 0], [0, 1, 0], [0, 1, 0]]],
  ],
  np.float32,
)[:, None]  # [layers, batch, heads, tokens, tokens]


def test_rollout_of_a_hand_made_example():
  np.testing.assert_allclose(attention_maps.attention_rollout(HAND, (1, 2)), [[[0.375, 0.125]]], atol=1e-7)
  # Read as three patches of a model without a class token: the mean of A2 A1's rows.
  np.testing.assert_allclose(
    attention_maps.attention_rollout(HAND, (1, 3)), [[[1.25 / 3, 1.125 / 3, 0.625 / 3]]], atol=1e-7
  )
  # The layers' order matters: A1 A2 would give [.625, .125].
  np.testing.assert_allclose(attention_maps.class_token_attention(HAND, (1, 2)), [[[1.0, 0.0]]])


def test_rollout_head_fusion_and_discard():
  weights = np.random.RandomState(0).dirichlet(np.ones(5), (2, 1, 3, 5)).astype(np.float32)  # rows sum to 1
  fused = weights.max(axis=2)
  discard = 2  # 0.4 of 5 keys: each row's two weakest
  fused[np.argsort(np.argsort(fused, axis=-1), axis=-1) < discard] = 0
  flow = 0.5 * fused + 0.5 * np.eye(5)
  flow /= flow.sum(axis=-1, keepdims=True)
  expected = (flow[1] @ flow[0])[:, 0, 1:].reshape(1, 2, 2)
  rollout = attention_maps.attention_rollout(weights, 2, head_fusion="max", discard_ratio=0.4)
  np.testing.assert_allclose(rollout, expected, atol=1e-6, rtol=0)


def test_clear_errors():
  with pytest.raises(ValueError, match="VisionTransformer"):
    attention_maps.attention_weights(lvm_jax.SwinTransformer(), {}, jnp.zeros((1, 224, 224, 3)))
  with pytest.raises(ValueError, match="needs a model with a class token"):
    attention_maps.class_token_attention(uniform(1, 1, 2, 16), 4)
  with pytest.raises(ValueError, match="at least 16 tokens"):
    attention_maps.attention_rollout(uniform(1, 1, 2, 9), 4)
  with pytest.raises(ValueError, match="head_fusion"):
    attention_maps.attention_rollout(uniform(1, 1, 2, 17), 4, head_fusion="sum")
  with pytest.raises(ValueError, match="discard_ratio"):
    attention_maps.attention_rollout(uniform(1, 1, 2, 17), 4, discard_ratio=1.0)
