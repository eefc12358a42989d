"""ViT from big_vision / vision_transformer .npz files, against timm's own npz loader (fixture vit_npz)."""

import pathlib

import numpy as np
import pytest

import lvm_jax
from lvm_jax.weights import big_vision

NPZ = pathlib.Path(__file__).parent.parent / "fixtures" / "timm" / "vit_npz"


def test_npz_logits_match_timm_load_of_the_same_file():
  model, variables = lvm_jax.from_pretrained(NPZ / "model.npz")
  assert (
    model.image_size,
    model.patch_size,
    model.width,
    model.depth,
    model.num_heads,
    model.mlp_dim,
    model.num_classes,
    model.pooling,
  ) == (32, 8, 48, 2, 3, 192, 10, "token")
  with np.load(NPZ / "reference.npz") as ref:
    np.testing.assert_allclose(model.apply(variables, ref["input"]), ref["logits"], atol=1e-4, rtol=0)


def _npz_tensors():
  with np.load(NPZ / "model.npz") as data:
    return {k: data[k] for k in data.files}


def test_big_vision_naming_and_patch_only_position_embedding(tmp_path):
  """The newer big_vision layout: module indices _0/_1, 'params/' prefix, no class-token position."""
  renames = {
    "MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
    "MlpBlock_3": "MlpBlock_0",
    "LayerNorm_2": "LayerNorm_1",
  }
  tensors = {}
  for name, value in _npz_tensors().items():
    for old, new in renames.items():
      name = name.replace(old, new)
    tensors["params/" + name] = value
  pos = "params/Transformer/posembed_input/pos_embedding"
  tensors[pos] = tensors[pos][:, 1:]
  np.savez(tmp_path / "bv.npz", **tensors)
  model, variables = lvm_jax.from_pretrained(tmp_path / "bv.npz")
  assert model.no_embed_class and model.class_token
  x = np.random.RandomState(0).randn(2, 32, 32, 3).astype(np.float32)
  # Same weights, position embedding added to the patches only: equal to the vision_transformer model whose
  # class-token position embedding is zero.
  reference_model, reference_vars = lvm_jax.from_pretrained(NPZ / "model.npz")
  reference_vars["params"]["pos_embed"] = reference_vars["params"]["pos_embed"].at[:, 0].set(0.0)
  np.testing.assert_allclose(model.apply(variables, x), reference_model.apply(reference_vars, x), atol=1e-5)


def test_gap_checkpoint_without_class_token(tmp_path):
  tensors = {k: v for k, v in _npz_tensors().items() if k != "cls"}
  tensors["Transformer/posembed_input/pos_embedding"] = tensors["Transformer/posembed_input/pos_embedding"][:, 1:]
  np.savez(tmp_path / "gap.npz", **tensors)
  model, variables = lvm_jax.from_pretrained(tmp_path / "gap.npz")
  assert model.pooling == "gap" and not model.class_token
  # timm's logits for this file, loaded into class_token=False, global_pool="avg", fc_norm=False: the mean of
  # the normed tokens, as vision_transformer's classifier="gap".
  with np.load(NPZ / "reference.npz") as ref:
    np.testing.assert_allclose(model.apply(variables, ref["input"]), ref["logits_gap"], atol=1e-4, rtol=0)
    assert np.abs(ref["logits_gap"] - ref["logits"]).max() > 0.1  # not the class-token model's output


def test_pickled_npz_is_refused(tmp_path):
  np.savez(tmp_path / "evil.npz", **{"embedding/kernel": np.array([{"a": 1}], dtype=object)})
  with pytest.raises(ValueError, match="refusing to unpickle"):
    lvm_jax.from_pretrained(tmp_path / "evil.npz")


def test_wrong_shape_in_npz_names_the_tensor(tmp_path):
  tensors = _npz_tensors()
  tensors["Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias"] = np.zeros((47,), np.float32)
  np.savez(tmp_path / "bad.npz", **tensors)
  with pytest.raises(lvm_jax.WeightsMismatchError, match=r"Dense_1/bias: checkpoint has \(47,\)"):
    lvm_jax.from_pretrained(tmp_path / "bad.npz")


def test_not_a_vit_npz(tmp_path):
  np.savez(tmp_path / "other.npz", weights=np.zeros(3))
  with pytest.raises(ValueError, match="no 'embedding/kernel'"):
    lvm_jax.from_pretrained(tmp_path / "other.npz")


def test_npz_preprocessing_follows_the_model_size(tmp_path):
  ckpt = lvm_jax.load_checkpoint(NPZ / "model.npz")
  assert ckpt.preprocessing.size == (32, 32) and tuple(ckpt.preprocessing.mean) == (0.5, 0.5, 0.5)
  assert big_vision.preprocessing(ckpt.model.clone(image_size=384)).size == (384, 384)
