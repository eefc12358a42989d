"""TrainProgram, the one builder of the train step (trainer and benchmarks): the model reaches the optimizer, so
the model's own no-weight-decay patterns and layer ids shape the step that runs."""

import jax
import jax.numpy as jnp
import numpy as np

import lvm_jax
from lvm_jax import parallel
from lvm_jax.tasks.classification import Classification
from lvm_jax.train.program import TrainProgram

VIT = dict(image_size=16, patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64, num_classes=4)


def _one_step(**optimizer):
  model = lvm_jax.create_model("vit_ti16", **VIT)
  block = {"name": "adamw", "lr": 0.1, "schedule": {"decay": "constant"}, **optimizer}
  program = TrainProgram.create(
    task=Classification(4),
    model=model,
    optimizer=block,
    mesh=parallel.create_mesh(devices=jax.devices()[:1]),
    strategy=parallel.get_strategy("dp"),
    input_shape=(1, 16, 16, 3),
  )
  batch = {"image": jax.random.uniform(jax.random.key(1), (2, 16, 16, 3)) * 255, "label": jnp.array([0, 3])}
  before = jax.device_get(program.new_state().params)
  state, _ = program.train_step()(program.new_state(), batch)
  return before, jax.device_get(state.params)


def test_the_models_no_decay_patterns_and_layer_ids_reach_the_step():
  start, plain = _one_step()
  _, decayed = _one_step(weight_decay=0.5)
  _, layered = _one_step(layer_decay=0.5)
  # ViT's own no-decay list covers the position embedding and class token; kernels are decayed.
  np.testing.assert_array_equal(decayed["pos_embed"], plain["pos_embed"])
  np.testing.assert_array_equal(decayed["cls_token"], plain["cls_token"])
  kernel = decayed["block_0"]["mlp"]["fc1"]["kernel"]
  assert not np.array_equal(kernel, plain["block_0"]["mlp"]["fc1"]["kernel"])
  # Layer decay 0.5 over ViT's ids (embeddings 0, blocks 1-2, head 3 of 4): the embedding moves 1/8 as far.
  moved = lambda params: np.abs(params["pos_embed"] - start["pos_embed"]).max()
  np.testing.assert_allclose(moved(layered), moved(plain) / 8, rtol=1e-3)
