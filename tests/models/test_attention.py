"""Which attention kernel runs, and that cuDNN's fused attention gives XLA's outputs and gradients (GPU only)."""

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lvm_jax
from lvm_jax.models import layers

HOPPER = types.SimpleNamespace(platform="gpu", compute_capability="9.0")
ON_GPU = jax.default_backend() == "gpu"


def _comparable_leaves(grads, expected_grads):
  """(path, leaf, expected leaf) as float32 arrays, without the key projections' biases: their gradient is zero
  in exact arithmetic (a key bias shifts all of a query's logits alike), so both sides are rounding noise."""
  pairs = zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(expected_grads))
  for (path, leaf), expected in pairs:
    name = jax.tree_util.keystr(path)
    if "['key']['bias']" not in name:
      yield name, np.asarray(leaf, np.float32), np.asarray(expected, np.float32)


def test_auto_picks_cudnn_only_where_it_runs():
  assert layers.attention_implementation(None, 64, jnp.bfloat16, False, HOPPER) == "cudnn"
  assert layers.attention_implementation(None, 128, jnp.float16, False, HOPPER) == "cudnn"
  assert layers.attention_implementation(None, 64, jnp.float32, False, HOPPER) == "xla"
  assert layers.attention_implementation(None, 160, jnp.bfloat16, False, HOPPER) == "xla"
  assert layers.attention_implementation(None, 60, jnp.bfloat16, False, HOPPER) == "xla"
  assert layers.attention_implementation(None, 64, jnp.bfloat16, True, HOPPER) == "xla"
  turing = types.SimpleNamespace(platform="gpu", compute_capability="7.5")
  assert layers.attention_implementation(None, 64, jnp.bfloat16, False, turing) == "xla"
  assert layers.attention_implementation(None, 64, jnp.bfloat16, False, jax.devices("cpu")[0]) == "xla"


def test_explicit_choice_is_kept_and_typos_are_named():
  assert layers.attention_implementation("xla", 64, jnp.bfloat16, False, HOPPER) == "xla"
  assert layers.attention_implementation("cudnn", 64, jnp.float32, False, jax.devices("cpu")[0]) == "cudnn"
  with pytest.raises(ValueError, match="'cuDNN'"):
    layers.attention_implementation("cuDNN", 64, jnp.bfloat16, False, HOPPER)
  model = lvm_jax.create_model("vit_ti16", num_classes=3, attention_impl="flash")
  with pytest.raises(ValueError, match="'flash'"):
    model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))


@pytest.mark.parametrize("queries,keys", [(197, 197), (49, 49), (8, 5), (6, 6)])
def test_padding_for_cudnn_leaves_attention_unchanged(queries, keys, monkeypatch):
  """The odd-length padding of the cuDNN path, run through XLA's kernel (CPU): same outputs and gradients."""
  jnp_xla = jax.nn.dot_product_attention
  monkeypatch.setattr(
    jax.nn, "dot_product_attention", lambda *a, implementation=None, **kw: jnp_xla(*a, implementation="xla", **kw)
  )
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((2, queries, 3, 16)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((2, keys, 3, 16)), jnp.float32) for _ in range(2))
  bias = jnp.asarray(rng.standard_normal((1, 3, queries, keys)), jnp.float32)
  with jax.default_matmul_precision("highest"):  # GPUs default to TF32 for float32
    for b in (None, bias):

      def expected(q, k, v):
        return jnp_xla(q, k, v, bias=b)

      def padded(q, k, v):
        return layers.dot_product_attention(q, k, v, b, "cudnn")

      np.testing.assert_allclose(padded(q, k, v), expected(q, k, v), rtol=1e-5, atol=1e-6)
      grads = [
        jax.grad(lambda *qkv: jnp.sum(f(*qkv) * v[:, :1]), argnums=(0, 1, 2))(q, k, v) for f in (expected, padded)
      ]
      for a, e in zip(*grads):
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_padding_tokens_never_reach_the_valid_outputs(dropout):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 6, 32)), jnp.float32)
  attention = layers.Attention(num_heads=4, dropout=dropout, attention_impl="xla")
  variables = attention.init(jax.random.key(0), x, train=False)
  outputs = []
  for garbage in (0.0, 100.0):
    padded = x.at[:, 5:].set(garbage)
    outputs.append(
      attention.apply(variables, padded, train=True, valid_length=5, rngs={"dropout": jax.random.key(1)})[:, :5]
    )
  np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
  unmasked = attention.apply(variables, x.at[:, 5:].set(100.0), train=True, rngs={"dropout": jax.random.key(1)})
  assert np.abs(np.asarray(unmasked[:, :5] - outputs[0])).max() > 1e-2  # without the mask it would reach them


@pytest.mark.parametrize("scan_layers", [False, True])
def test_vit_padded_encoder_gives_the_unpadded_outputs_and_gradients(scan_layers, monkeypatch):
  """What ViT does for cuDNN (one padding token through the encoder, masked as a key), checked with XLA's kernel."""
  model = lvm_jax.create_model(
    "vit_ti16", num_classes=5, image_size=64, depth=2, scan_layers=scan_layers, attention_impl="xla"
  )  # 16 patches + class token: odd
  images = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), images))["params"]
  params["head"]["kernel"] = jax.random.normal(jax.random.key(2), params["head"]["kernel"].shape)

  def loss(params):
    logits = model.apply({"params": params}, images)
    return jnp.sum(logits * jnp.arange(5.0)), logits

  # A new jit each: the attention implementation is chosen while tracing.
  (_, plain_logits), plain_grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  calls = []
  monkeypatch.setattr(type(model), "_attention_implementation", lambda self: calls.append(self) or "cudnn")
  (_, padded_logits), padded_grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  assert len(calls) == 1
  np.testing.assert_allclose(padded_logits, plain_logits, rtol=1e-5, atol=1e-5)
  for path, a, e in _comparable_leaves(padded_grads, plain_grads):  # float32 sums of 17 vs 18 rows
    np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-5 * np.abs(e).max(), err_msg=path)


@pytest.mark.skipif(not ON_GPU, reason="cuDNN attention needs an NVIDIA GPU")
def test_cudnn_vit_matches_xla_vit_outputs_and_gradients():
  kw = dict(num_classes=10, dtype=jnp.bfloat16)
  xla_model = lvm_jax.create_model("vit_s16", attention_impl="xla", **kw)
  cudnn_model = lvm_jax.create_model("vit_s16", attention_impl="cudnn", **kw)
  images = jax.random.normal(jax.random.key(1), (4, 224, 224, 3))
  variables = nn.meta.unbox(xla_model.init(jax.random.key(0), images))
  # A head that is not zero, so the gradients reach every block.
  head = variables["params"]["head"]
  head["kernel"] = jax.random.normal(jax.random.key(2), head["kernel"].shape) * 0.05

  def loss(params, model):
    logits = model.apply({"params": params}, images, train=True).astype(jnp.float32)
    return jnp.mean(jax.nn.log_softmax(logits)[:, 0]), logits

  (l_xla, y_xla), g_xla = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(
    variables["params"], xla_model
  )
  (l_cudnn, y_cudnn), g_cudnn = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(
    variables["params"], cudnn_model
  )
  hlo = jax.jit(lambda p: cudnn_model.apply({"params": p}, images)).lower(variables["params"]).compile().as_text()
  assert "cudnn" in hlo.lower()  # the fused kernel really runs
  # bfloat16 has 8 bits of mantissa: the two kernels sum in different orders.
  np.testing.assert_allclose(np.asarray(y_cudnn), np.asarray(y_xla), atol=0.05, rtol=0.05)
  for path, a, b in _comparable_leaves(g_cudnn, g_xla):
    assert np.linalg.norm(a - b) <= 0.05 * np.linalg.norm(b) + 1e-6, path
