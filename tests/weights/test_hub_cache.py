"""Hub ids resolve through huggingface_hub; offline, from its cache (laid out here as the hub client writes it)."""

import shutil

import huggingface_hub
import numpy as np
import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification

import lvm_jax
from tests import torch_reference as ref


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  return tmp_path / "hub"


def _put_in_cache(cache, repo_id, folder, revision="0123456789abcdef0123456789abcdef01234567"):
  repo = cache / ("models--" + repo_id.replace("/", "--"))
  (repo / "refs").mkdir(parents=True)
  (repo / "refs" / "main").write_text(revision)
  shutil.copytree(folder, repo / "snapshots" / revision)


def test_hub_id_is_read_from_the_cache_when_offline(offline_cache, tmp_path):
  torch.manual_seed(0)
  torch_model = ref.randomize(
    ViTForImageClassification(
      ViTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=16,
        num_labels=3,
      )
    )
  )
  torch_model.save_pretrained(tmp_path / "saved")
  _put_in_cache(offline_cache, "someorg/tiny-vit", tmp_path / "saved")
  model, variables = lvm_jax.from_pretrained("someorg/tiny-vit")
  x = ref.images(2, 32)
  np.testing.assert_allclose(model.apply(variables, x), ref.logits(torch_model, x), atol=1e-4, rtol=0)


def test_hub_id_missing_offline_is_a_clear_error(offline_cache):
  with pytest.raises(FileNotFoundError, match="Could not download 'someorg/absent'.*not in the local cache"):
    lvm_jax.from_pretrained("someorg/absent")
