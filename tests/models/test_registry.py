"""The variant registry: exact parameter counts against the published ones, names and errors."""

import jax
import pytest

import lvm_jax

# Parameters (trainable, BatchNorm running statistics excluded) at 1000 classes and the variant's own
# image size, as published by the papers / timm / torchvision, and equal to the transformers models built
# from the same configuration.
PUBLISHED_PARAMS = {
  "vit_ti16": 5_717_416,
  "vit_s16": 22_050_664,
  "vit_s32": 22_878_952,
  "vit_b16": 86_567_656,
  "vit_b32": 88_224_232,
  "vit_l16": 304_326_632,
  "vit_l32": 306_535_400,
  "vit_h14": 632_045_800,
  "vit_g14": 1_012_611_432,
  "resnet18": 11_689_512,
  "resnet34": 21_797_672,
  "resnet50": 25_557_032,
  "resnet101": 44_549_160,
  "resnet152": 60_192_808,
  "swin_t": 28_288_354,
  "swin_s": 49_606_258,
  "swin_b": 87_768_224,
  "swin_l": 196_532_476,
  "swin_b_384": 87_903_584,
  "swin_l_384": 196_735_516,
  "convnext_tiny": 28_589_128,
  "convnext_small": 50_223_688,
  "convnext_base": 88_591_464,
  "convnext_large": 197_767_336,
  "bit_r50x1": 25_549_352,  # BiT (timm resnetv2_*_bit, transformers Bit): BiT-M R50x1 ~25.5M
  "bit_r50x3": 217_319_080,
  "bit_r101x1": 44_541_480,
  "bit_r101x3": 387_934_888,
  "bit_r152x2": 236_335_208,
  "bit_r152x4": 936_533_224,
  "vit_b16_r50": 98_659_112,  # timm vit_base_r50_s16_224 (98_950_952 at 384)
  "efficientnet_b0": 5_288_548,
  "efficientnet_b1": 7_794_184,
  "efficientnet_b2": 9_109_994,
  "efficientnet_b3": 12_233_232,
  "efficientnet_b4": 19_341_616,
  "efficientnet_b5": 30_389_784,
  "efficientnet_b6": 43_040_704,
  "efficientnet_b7": 66_347_960,
  "mobilenet_v2": 3_504_872,  # torchvision's num_params
}


def count(variables, collection="params"):
  return sum(x.size for x in jax.tree.leaves(variables.get(collection, {})))


def test_every_registered_variant_is_in_the_table():
  assert sorted(PUBLISHED_PARAMS) == lvm_jax.list_models()


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_parameter_count_matches_published(name):
  variables = lvm_jax.abstract_variables(lvm_jax.create_model(name))
  assert count(variables) == PUBLISHED_PARAMS[name]


def test_unknown_name_lists_close_matches():
  with pytest.raises(ValueError, match=r"Unknown model 'vit_b_16'\. Did you mean vit_b16"):
    lvm_jax.create_model("vit_b_16")


def test_unknown_override_names_the_argument():
  with pytest.raises(TypeError, match=r"VisionTransformer \(vit_s16\) has no argument 'num_class'"):
    lvm_jax.create_model("vit_s16", num_class=10)


def test_list_models_filters_by_pattern():
  assert lvm_jax.list_models("resnet*") == ["resnet101", "resnet152", "resnet18", "resnet34", "resnet50"]
