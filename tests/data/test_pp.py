"""pp strings: parsing, literal-only arguments, helpful errors, batch-op marking."""

import numpy as np
import pytest
import tensorflow as tf

from lvm_jax.data import mix, ops, pp, randaugment


def test_parses_the_issue_example_into_ops_in_order():
  spec = "decode|inception_crop(224)|flip_lr|randaugment(2, 9)|normalize('imagenet')|onehot(10, smoothing=0.1)"
  parsed = pp.parse(spec)
  assert [op.pp_name for op in parsed] == ["decode", "inception_crop", "flip_lr", "randaugment", "normalize", "onehot"]
  assert not any(pp.is_batch_op(op) for op in parsed)


def test_list_of_strings_equals_the_joined_string():
  as_list = pp.parse(["decode", "resize(8) | normalize('inception')"])
  assert [op.pp_name for op in as_list] == ["decode", "resize", "normalize"]


def test_arguments_reach_the_op():
  (op,) = pp.parse("onehot(4, smoothing=0.2)")
  label = op({"label": tf.constant(1, tf.int64)})["label"].numpy()
  np.testing.assert_allclose(label, [0.05, 0.85, 0.05, 0.05], rtol=1e-6)
  (op,) = pp.parse("normalize(mean=(0.5, 0.5, 0.5), std=[0.25, 0.25, 0.25])")
  out = op({"image": tf.constant([[[255, 0, 128]]], tf.uint8)})["image"].numpy()
  np.testing.assert_allclose(out[0, 0], [2, -2, (128 / 255 - 0.5) / 0.25], atol=1e-6)
  (op,) = pp.parse("inception_crop((6, 9), area_min=0.5, ratio=(0.5, 2.0))")
  out = op({"image": tf.zeros([20, 30, 3], tf.uint8), "rng": tf.constant([1, 1], tf.int64)})
  assert out["image"].shape == (6, 9, 3)


def test_a_pipe_inside_a_string_argument_does_not_split():
  assert pp._split("a|b('x|y')|c((1, 2))") == ["a", "b('x|y')", "c((1, 2))"]


def test_batch_ops_are_marked():
  parsed = pp.parse("onehot(3)|mixup(0.2)|cutmix(1.0)|mixup_cutmix(0.8, 1.0, switch_prob=0.3)")
  assert [pp.is_batch_op(op) for op in parsed] == [False, True, True, True]
  assert pp.BATCH_OPS == {
    name for name, factory in pp.OPS.items() if factory in (mix.mixup, mix.cutmix, mix.mixup_cutmix)
  }


def test_the_op_table_is_explicit_and_complete():
  assert pp.OPS["decode"] is ops.decode and pp.OPS["randaugment"] is randaugment.randaugment
  for name, factory in pp.OPS.items():
    assert factory.__name__ == name, name


def test_unknown_op_names_close_matches():
  with pytest.raises(ValueError, match=r"Unknown pp op 'inception_crpo'.*did you mean inception_crop"):
    pp.parse("decode|inception_crpo(224)")
  with pytest.raises(ValueError, match=r"Unknown pp op 'zzz'.*known ops: .*center_crop_fraction"):
    pp.parse("zzz")


@pytest.mark.parametrize(
  "spec,message",
  [
    ("resize(224, bogus=1)", r"resize.*unexpected keyword argument 'bogus'.*accepts resize\(size"),
    ("onehot()", r"onehot.*missing a required argument.*accepts onehot\(num_classes"),
    ("onehot(10, smoothing=1.5)", r"onehot.*smoothing must be in \[0, 1\)"),
    ("randaugment(2, 11)", r"randaugment: magnitude must be a number in \[0, 10\]"),
    ("resize(size)", r"arguments must be Python literals.*resize accepts"),
    ("resize(__import__('os').getcwd())", r"arguments must be Python literals"),
    ("os.system('true')", r"is not `name` or `name\(args\)`"),
    ("resize(224", r"is not `name` or `name\(args\)`"),
    ("resize(**{'size': 3})", r"\*\*kwargs are not allowed"),
  ],
)
def test_bad_arguments_name_the_op_and_what_it_accepts(spec, message):
  with pytest.raises(ValueError, match=message):
    pp.parse(spec)


def test_rejects_non_string_specs():
  with pytest.raises(TypeError, match="string or a list of strings"):
    pp.parse(["decode", 3])
