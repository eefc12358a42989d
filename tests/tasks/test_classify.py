"""classify / Classifier against the transformers image-classification pipeline on the same saved checkpoint,
and Preprocessing against transformers' image processors and timm's eval transform."""

import dataclasses
import json
import pathlib
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
import skimage.color
import skimage.data
from transformers import (
  AutoImageProcessor,
  ResNetConfig,
  ResNetForImageClassification,
  SwinConfig,
  SwinForImageClassification,
  ViTConfig,
  ViTForImageClassification,
  pipeline,
)

import lvm_jax
from lvm_jax.models.vit import VisionTransformer
from lvm_jax.tasks import classify
from lvm_jax.tasks.classify import Classifier, Prediction
from lvm_jax.weights.preprocessing import Preprocessing
from tests import torch_reference as ref

TIMM_FIXTURE = pathlib.Path(__file__).parents[1] / "fixtures" / "timm" / "vit_token"
LABELS = ["tabby", "tiger cat", "lynx", "cougar", "lion", "cheetah", "snow leopard", "jaguar", "leopard", "ocelot"]
TINY_VIT = dict(
  hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=64, patch_size=16
)
TINY_RESNET = dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="bottleneck")
TINY_SWIN = dict(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4)
# One preprocessor_config.json per transformers processor our checkpoints use, all producing 64x64 inputs from
# the 451x300 photo in different ways (straight resize, shortest edge + crop_pct, shortest edge + crop, resize +
# crop, legacy int sizes).
PROCESSORS = {
  "vit": {"image_processor_type": "ViTImageProcessor", "size": {"height": 64, "width": 64}},
  "vit_legacy": {
    "feature_extractor_type": "ViTFeatureExtractor",
    "size": 64,
    "resample": 3,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
  },
  "convnext": {"image_processor_type": "ConvNextImageProcessor", "size": {"shortest_edge": 64}, "crop_pct": 0.875},
  "convnext_legacy": {"feature_extractor_type": "ConvNextFeatureExtractor", "size": 64, "crop_pct": 0.9},
  "bit": {"image_processor_type": "BitImageProcessor", "size": {"shortest_edge": 73}, "crop_size": 64},
  "deit": {
    "image_processor_type": "DeiTImageProcessor",
    "size": {"height": 75, "width": 75},
    "crop_size": {"height": 64, "width": 64},
    "resample": 1,
  },
}


def save_tiny_vit(folder, preprocessor_config=PROCESSORS["vit"], seed=0):
  """A randomly initialised transformers ViT with named labels and a preprocessor config, saved to `folder`."""
  return _save_tiny(folder, ViTConfig(**TINY_VIT), ViTForImageClassification, preprocessor_config, seed)


def _save_tiny(folder, config, model_class, preprocessor_config, seed):
  return ref.save_classifier(folder, model_class, config, LABELS, preprocessor_config, seed)


def pipeline_top_k(folder, image_path, top_k=5):
  """(indices, probabilities) the transformers pipeline gives, labels mapped back to indices."""
  results = pipeline("image-classification", model=str(folder))(str(image_path), top_k=top_k)
  return [LABELS.index(r["label"]) for r in results], np.array([r["score"] for r in results])


def assert_same_predictions(actual, expected, atol=1e-6):
  """Equal classes in equal order, probabilities within `atol` (batch sizes may change the last float bits)."""
  assert len(actual) == len(expected)
  for got, want in zip(actual, expected):
    assert [(p.index, p.label) for p in got] == [(p.index, p.label) for p in want]
    np.testing.assert_allclose([p.probability for p in got], [p.probability for p in want], atol=atol, rtol=0)


def assert_matches_pipeline(predictions, expected):
  indices, probabilities = expected
  assert [p.index for p in predictions] == indices
  assert [p.label for p in predictions] == [LABELS[i] for i in indices]
  np.testing.assert_allclose([p.probability for p in predictions], probabilities, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def weights_folder(tmp_path_factory):
  return save_tiny_vit(tmp_path_factory.mktemp("tiny_vit"))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  folder = tmp_path_factory.mktemp("photos")
  cat = PIL.Image.fromarray(skimage.data.chelsea())
  paths = {"jpeg": folder / "chelsea.jpg", "png": folder / "chelsea.png"}
  cat.save(paths["jpeg"], quality=90)
  cat.save(paths["png"])
  return paths


def with_processor(weights_folder, tmp_path, name):
  folder = tmp_path / name
  shutil.copytree(weights_folder, folder)
  (folder / "preprocessor_config.json").write_text(json.dumps(PROCESSORS[name]))
  return folder


@pytest.mark.parametrize("name", sorted(PROCESSORS))
def test_top5_equals_the_transformers_pipeline(weights_folder, photos, tmp_path, name):
  folder = with_processor(weights_folder, tmp_path, name)
  classifier = Classifier(folder)
  predictions = classifier([photos["jpeg"], photos["png"]], top_k=5)
  for kind, preds in zip(("jpeg", "png"), predictions):
    expected = pipeline_top_k(folder, photos[kind])
    assert_matches_pipeline(preds, expected)
    assert np.diff(expected[1]).max() < -1e-3  # distinct probabilities: the order itself is checked


def test_swin_top5_equals_the_transformers_pipeline(photos, tmp_path):
  # microsoft/swin-*'s preprocessor config: the legacy ViT feature extractor, bicubic, ImageNet statistics.
  folder = _save_tiny(tmp_path, SwinConfig(**TINY_SWIN), SwinForImageClassification, PROCESSORS["vit_legacy"], 3)
  classifier = Classifier(folder)
  assert type(classifier.checkpoint.model).__name__ == "SwinTransformer"
  for kind, predictions in zip(("jpeg", "png"), classifier([photos["jpeg"], photos["png"]])):
    assert_matches_pipeline(predictions, pipeline_top_k(folder, photos[kind]))


def test_resnet_top5_equals_the_transformers_pipeline(photos, tmp_path):
  # microsoft/resnet-50's preprocessor config: the legacy ConvNext feature extractor, shorter side / crop_pct.
  processor = {
    "feature_extractor_type": "ConvNextFeatureExtractor",
    "size": 64,
    "crop_pct": 0.875,
    "resample": 3,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
  }
  folder = _save_tiny(tmp_path, ResNetConfig(**TINY_RESNET), ResNetForImageClassification, processor, 4)
  classifier = Classifier(folder)
  assert type(classifier.checkpoint.model).__name__ == "ResNet"
  assert classifier.preprocessing.resize_shorter == 73  # int(64 / 0.875)
  for kind, predictions in zip(("jpeg", "png"), classifier([photos["jpeg"], photos["png"]])):
    assert_matches_pipeline(predictions, pipeline_top_k(folder, photos[kind]))


@pytest.mark.parametrize("name", sorted(PROCESSORS))
def test_preprocessing_gives_the_image_processors_pixels(weights_folder, photos, tmp_path, name):
  folder = with_processor(weights_folder, tmp_path, name)
  ours = lvm_jax.load_checkpoint(folder).preprocessing(PIL.Image.open(photos["png"]).convert("RGB"))
  processor = AutoImageProcessor.from_pretrained(folder)
  theirs = processor(PIL.Image.open(photos["png"]), return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
  assert ours.shape == (64, 64, 3) and ours.dtype == np.float32
  np.testing.assert_array_equal(ours, theirs)


def test_a_small_preprocessing_change_moves_the_probabilities(weights_folder, photos):
  # The pipeline comparison would not notice a preprocessing mistake if probabilities hardly depended on it.
  ckpt = lvm_jax.load_checkpoint(weights_folder)
  shifted = dataclasses.replace(ckpt, preprocessing=dataclasses.replace(ckpt.preprocessing, interpolation="bicubic"))
  before = Classifier(ckpt).probabilities(photos["png"])
  after = Classifier(shifted).probabilities(photos["png"])
  assert np.abs(before - after).max() > 1e-3


@pytest.fixture(scope="module")
def mode_files(tmp_path_factory):
  """The photo as grayscale, palette, RGBA (alpha varying) and CMYK files, and a 16-bit grayscale PNG."""
  folder = tmp_path_factory.mktemp("modes")
  cat = skimage.data.chelsea()
  gray = (skimage.color.rgb2gray(cat) * 255).round().astype(np.uint8)
  alpha = np.tile(np.linspace(0, 255, cat.shape[1]).astype(np.uint8), (cat.shape[0], 1))
  files = {
    "gray.jpg": PIL.Image.fromarray(gray),
    "gray.png": PIL.Image.fromarray(gray),
    "palette.png": PIL.Image.fromarray(cat).quantize(colors=64),
    "rgba.png": PIL.Image.fromarray(np.dstack([cat, alpha])),
    "cmyk.jpg": PIL.Image.fromarray(cat).convert("CMYK"),
    "gray16.png": PIL.Image.fromarray(gray.astype(np.uint16) * 257),
  }
  for name, image in files.items():
    image.save(folder / name)
  return folder


@pytest.mark.parametrize("name", ["gray.jpg", "gray.png", "palette.png", "rgba.png", "cmyk.jpg"])
def test_other_image_modes_equal_the_pipeline(weights_folder, mode_files, name):
  predictions = classify.classify(weights_folder, mode_files / name)[0]
  assert_matches_pipeline(predictions, pipeline_top_k(weights_folder, mode_files / name))


def test_16_bit_png_equals_the_pipeline_on_its_8_bit_version(weights_folder, mode_files):
  # transformers' load_image saturates 16-bit grayscale to white; we scale it, which gives the 8-bit image.
  predictions = classify.classify(weights_folder, mode_files / "gray16.png")[0]
  assert_matches_pipeline(predictions, pipeline_top_k(weights_folder, mode_files / "gray.png"))


def test_paths_pil_images_and_arrays_give_the_same_predictions(weights_folder, photos):
  classifier = Classifier(weights_folder)
  array = skimage.data.chelsea()
  from_path = classifier(photos["png"])
  assert len(from_path) == 1 and len(from_path[0]) == 5
  assert classifier(str(photos["png"])) == from_path
  assert classifier(PIL.Image.open(photos["png"])) == from_path
  assert classifier(array) == from_path
  batch = classifier(np.stack([array, array[:, ::-1]]))  # [N, H, W, C]: N images
  assert len(batch) == 2
  assert_same_predictions(batch[:1], from_path)
  assert_same_predictions(classifier((array, array[:, ::-1])), batch)
  assert [p.index for p in batch[1]] != [p.index for p in batch[0]]  # the mirrored photo is another input


def test_classifier_compiles_once_per_batch_bucket(weights_folder):
  classifier = Classifier(weights_folder, batch_size=4)
  cats = [
    skimage.data.chelsea(),
    skimage.data.chelsea()[:, ::-1],
    skimage.data.astronaut(),
    skimage.data.coffee(),
    skimage.data.rocket(),
  ]
  single = [classifier(image)[0] for image in cats]
  assert classifier._traces == 1  # five calls, one compilation
  assert_same_predictions(classifier(cats[:3]), single[:3])  # 3 images: padded to the bucket of 4
  assert_same_predictions(classifier(cats[:4]), single[:4])
  assert classifier._traces == 2
  assert_same_predictions(classifier(cats), single)  # 5 images: a batch of 4, then the fifth alone
  assert classifier._traces == 2


def test_top_k_is_clamped_sorted_and_probabilities_sum_to_one(weights_folder, photos):
  classifier = Classifier(weights_folder)
  predictions = classifier(photos["png"], top_k=100)[0]
  assert sorted(p.index for p in predictions) == list(range(len(LABELS)))
  probabilities = [p.probability for p in predictions]
  assert probabilities == sorted(probabilities, reverse=True)
  assert abs(sum(probabilities) - 1) < 1e-6
  assert classifier(photos["png"], top_k=1)[0] == predictions[:1]
  with pytest.raises(ValueError, match="top_k must be at least 1"):
    classifier(photos["png"], top_k=0)


def _checkpoint(num_classes, labels=None, seed=0):
  """A tiny lvm_jax ViT with random weights (numpy: quicker than a first eager init), wrapped as a Checkpoint."""
  model = VisionTransformer(
    num_classes=num_classes, image_size=32, patch_size=16, width=32, depth=1, mlp_dim=64, num_heads=2
  )
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  rng = np.random.RandomState(seed)
  variables = jax.tree.map(lambda s: rng.normal(0, 0.5, s.shape).astype(np.float32), shapes)
  return lvm_jax.Checkpoint(model, variables, labels, Preprocessing(size=(32, 32)), "test")


def test_1000_classes_without_names_get_imagenet_names():
  names = classify.imagenet1k_class_names()
  assert len(names) == 1000
  assert names[0] == "tench, Tinca tinca" and names[281] == "tabby, tabby cat"
  assert names[999] == "toilet tissue, toilet paper, bathroom tissue"
  predictions = classify.classify(_checkpoint(1000), skimage.data.chelsea(), top_k=3)[0]
  assert [p.label for p in predictions] == [names[p.index] for p in predictions]


def test_labels_without_names_or_with_the_wrong_count():
  assert Classifier(_checkpoint(7)).labels == [f"class_{i}" for i in range(7)]
  assert Classifier(_checkpoint(3, labels=["a", "b", "c"])).labels == ["a", "b", "c"]
  with pytest.raises(ValueError, match="names 2 classes but its head has 3"):
    Classifier(_checkpoint(3, labels=["a", "b"]))


def test_a_model_without_head_is_refused():
  ckpt = _checkpoint(3)
  headless = dataclasses.replace(ckpt, model=ckpt.model.clone(num_classes=0))
  with pytest.raises(ValueError, match="no classification head"):
    Classifier(headless)


def test_timm_checkpoint_classifies_with_its_pretrained_cfg():
  ckpt = lvm_jax.load_checkpoint(TIMM_FIXTURE)
  assert ckpt.preprocessing == Preprocessing(
    size=(32, 32), resize_shorter=35, interpolation="bicubic", crop_rounding="round"
  )  # floor(32 / 0.9) = 35
  # The classifier's logits for a real photo are the model's on the pixels of timm's own eval transform
  # (stored by tests/fixtures/timm/make_timm_fixtures.py): preprocessing and forward pass end to end.
  manifest = json.loads((TIMM_FIXTURE.parent / "MANIFEST.json").read_text())["preprocessing"]
  mean, std = (np.asarray(manifest["fixtures"]["vit_token"]["data_config"][k], np.float32) for k in ("mean", "std"))
  with np.load(TIMM_FIXTURE.parent / "preprocessing.npz", allow_pickle=False) as data:
    timm_pixels = (data["vit_token.chelsea"].astype(np.float32) / np.float32(255) - mean) / std
  want = np.asarray(ckpt.model.apply(ckpt.variables, timm_pixels[None], train=False))[0]
  classifier = Classifier(ckpt)
  np.testing.assert_allclose(classifier.logits(skimage.data.chelsea())[0], want, atol=1e-5, rtol=0)
  predictions = classifier(skimage.data.chelsea(), top_k=3)[0]
  assert [p.index for p in predictions] == list(np.argsort(-want, kind="stable")[:3])
  assert [p.label for p in predictions] == [f"class_{p.index}" for p in predictions]


def test_prediction_formatting():
  predictions = [Prediction("tabby, tabby cat", 281, 0.625), Prediction("lynx", 287, 0.0625)]
  assert json.loads(classify.format_predictions(predictions, as_json=True)) == [
    {"label": "tabby, tabby cat", "index": 281, "probability": 0.625},
    {"label": "lynx", "index": 287, "probability": 0.0625},
  ]
  assert classify.format_predictions(predictions).splitlines() == [
    "  62.50%  tabby, tabby cat  [281]",
    "   6.25%  lynx  [287]",
  ]


def test_compute_dtype_override(weights_folder, photos):
  exact = Classifier(weights_folder).probabilities(photos["png"])
  bf16 = Classifier(weights_folder, dtype=jnp.bfloat16)
  assert bf16.checkpoint.model.dtype == jnp.bfloat16
  approx = bf16.probabilities(photos["png"])
  assert 0 < np.abs(approx - exact).max() < 0.03  # bfloat16 really computed, and still close
  with pytest.raises(ValueError, match=r"overrides \['dtype'\] need a source"):
    Classifier(bf16.checkpoint, dtype=jnp.float32)


# ---- Preprocessing: configs, defaults, timm's crop and the round trip through transformers ----


def test_missing_preprocessor_config_uses_transformers_defaults_at_the_model_size(tmp_path):
  model = VisionTransformer(image_size=64)
  assert Preprocessing.from_hf(tmp_path / "preprocessor_config.json", model) == Preprocessing(size=(64, 64))


@pytest.mark.parametrize(
  "config,message",
  [
    ({"image_processor_type": "SamImageProcessor"}, "image processor 'SamImageProcessor' is not supported"),
    ({"image_processor_type": "ViTImageProcessor", "do_resize": False}, "do_resize=false"),
    ({"image_processor_type": "ViTImageProcessor", "size": {"shortest_edge": 64}}, "without a center crop"),
    ({"image_processor_type": "ViTImageProcessor", "resample": 7}, "resample 7 is not a PIL resampling code"),
  ],
)
def test_unsupported_preprocessor_configs_are_clear_errors(tmp_path, config, message):
  (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match=message):
    Preprocessing.from_hf(tmp_path / "preprocessor_config.json", VisionTransformer())


def test_timm_center_crop_rounds_the_margin_like_torchvision():
  # A 3-pixel margin: torchvision's CenterCrop starts at round(1.5) = 2, transformers at 1. The image already
  # has the resize size, so only the crop acts and pixel values reveal the offset.
  rows = np.repeat(np.arange(35, dtype=np.uint8)[:, None], 35, axis=1)
  image = PIL.Image.fromarray(np.dstack([rows, rows.T, rows]))
  cfg = {"pretrained_cfg": {"input_size": [3, 32, 32], "crop_pct": 0.9, "mean": [0, 0, 0], "std": [1, 1, 1]}}
  timm_pixels = Preprocessing.from_timm(cfg)(image) * 255
  assert timm_pixels[0, 0, 0].round() == 2 and timm_pixels[0, 0, 1].round() == 2
  hf_pixels = dataclasses.replace(Preprocessing.from_timm(cfg), crop_rounding="floor")(image) * 255
  assert hf_pixels[0, 0, 0].round() == 1


def test_timm_defaults_and_squash_mode():
  assert Preprocessing.from_timm({"pretrained_cfg": {}}) == Preprocessing(
    size=(224, 224),
    resize_shorter=256,
    interpolation="bicubic",
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    crop_rounding="round",
  )
  squash = Preprocessing.from_timm(
    {
      "pretrained_cfg": {
        "input_size": [3, 384, 384],
        "crop_pct": 1.0,
        "crop_mode": "squash",
        "interpolation": "bilinear",
      }
    }
  )
  assert (squash.size, squash.resize_size, squash.resize_shorter) == ((384, 384), (384, 384), None)
  with pytest.raises(ValueError, match="crop_mode 'border'"):
    Preprocessing.from_timm({"pretrained_cfg": {"crop_mode": "border"}})


@pytest.mark.parametrize(
  "preprocessing",
  [
    Preprocessing(size=(64, 64)),
    Preprocessing(size=(64, 48), resize_size=(80, 70), interpolation="bicubic", mean=(0.4, 0.5, 0.6)),
    Preprocessing(size=(64, 64), resize_shorter=73, interpolation="lanczos", std=(0.2, 0.3, 0.4)),
    Preprocessing(size=(64, 64), rescale=1.0, mean=(100, 110, 120), std=(50, 60, 70)),
  ],
  ids=["straight", "resize_then_crop", "shorter_then_crop", "no_rescale"],
)
def test_to_hf_is_read_back_by_transformers_and_by_from_hf(tmp_path, preprocessing, photos):
  (tmp_path / "preprocessor_config.json").write_text(json.dumps(preprocessing.to_hf()))
  assert Preprocessing.from_hf(tmp_path / "preprocessor_config.json", VisionTransformer()) == preprocessing
  processor = AutoImageProcessor.from_pretrained(tmp_path)
  image = PIL.Image.open(photos["png"]).convert("RGB")
  theirs = processor(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
  np.testing.assert_array_equal(preprocessing(image), theirs)


def test_save_pretrained_writes_a_preprocessor_config_the_pipeline_uses(weights_folder, photos, tmp_path):
  ckpt = lvm_jax.load_checkpoint(with_processor(weights_folder, tmp_path, "convnext"))
  lvm_jax.save_pretrained(
    ckpt.model, ckpt.variables, tmp_path / "saved", labels=ckpt.labels, preprocessing=ckpt.preprocessing
  )
  assert lvm_jax.load_checkpoint(tmp_path / "saved").preprocessing == ckpt.preprocessing
  expected = pipeline_top_k(tmp_path / "saved", photos["jpeg"])
  assert_matches_pipeline(classify.classify(ckpt, photos["jpeg"])[0], expected)
