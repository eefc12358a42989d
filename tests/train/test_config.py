"""The training config schema: defaults, validation errors (unknown keys, types, values), free-form blocks,
and parse_arg for a recipe's `:ARG`."""

import copy

import ml_collections
import pytest

from lvm_jax.train import config as config_lib


def _expected(**changes):
  """defaults() as a plain dict with dotted-key changes applied."""
  out = config_lib.defaults().to_dict()
  for key, value in changes.items():
    config_lib.set_path(out, key, value)
  return out


# ------------------------------------------------------------------------------------------------ defaults


def test_validate_fills_every_default():
  full = config_lib.validate({"num_steps": 100})
  assert isinstance(full, ml_collections.ConfigDict)
  assert full.to_dict() == _expected(num_steps=100)
  # Spot checks, so a defaults() that lost its values cannot make the comparison above pass trivially.
  assert (full.seed, full.model, full.dtype, full.data.batch_size, full.num_epochs) == (
    0,
    "vit_ti16",
    "float32",
    128,
    0.0,
  )
  # Every optimizer key is present (so each can be set from the command line), at the optimizer's defaults.
  from lvm_jax.train import optimizer as optimizer_lib

  assert full.optimizer.to_dict() == {
    **optimizer_lib.DEFAULTS,
    "lr": 1e-3,
    "weight_decay": 0.05,
    "schedule": optimizer_lib.SCHEDULE_DEFAULTS,
  }
  assert full.data.train.to_dict() == {"kind": "digits", "split": "train"}
  assert full.mesh.to_dict() == {"data": -1} and full.sharding.to_dict() == {"preset": "dp"}


def test_validate_keeps_given_values_and_is_idempotent():
  given = ml_collections.ConfigDict(
    {
      "num_epochs": 2.5,
      "seed": 7,
      "data": {"batch_size": 32, "prefetch": 0},
      "label_smoothing": 0.1,
      "dtype": "bfloat16",
    }
  )
  before = copy.deepcopy(given.to_dict())
  full = config_lib.validate(given)
  assert full.to_dict() == _expected(
    num_epochs=2.5, seed=7, label_smoothing=0.1, dtype="bfloat16", **{"data.batch_size": 32, "data.prefetch": 0}
  )
  assert given.to_dict() == before  # the input is not modified
  assert config_lib.validate(full).to_dict() == full.to_dict()
  # A recipe's usual shape: defaults() with a few fields set.
  recipe = config_lib.defaults()
  recipe.num_steps = 500
  recipe.data.pp_train = "decode|resize(32)"
  recipe.optimizer.lr = 3e-3  # edits inside a free-form block keep the block's other keys
  assert config_lib.validate(recipe).to_dict() == _expected(
    num_steps=500,
    **{"data.pp_train": "decode|resize(32)", "optimizer": {**config_lib.defaults().optimizer.to_dict(), "lr": 3e-3}},
  )


def test_an_int_is_accepted_where_a_float_is_expected():
  full = config_lib.validate({"num_epochs": 3, "label_smoothing": 0})
  assert full.num_epochs == 3 and full.label_smoothing == 0


# ------------------------------------------------------------------------------------------------ unknown keys


@pytest.mark.parametrize(
  "given, message",
  [
    ({"optimzer": {"name": "sgd", "lr": 0.1}}, r"unknown key 'optimzer' \(did you mean 'optimizer'\?\)"),
    ({"optimzer": "sgd"}, r"unknown key 'optimzer' \(did you mean 'optimizer'\?\)"),
    ({"data": {"batch_sze": 32}}, r"unknown key 'data\.batch_sze' \(did you mean 'data\.batch_size'\?\)"),
    ({"num_step": 10}, r"unknown key 'num_step' \(did you mean 'num_steps'\?\)"),
    ({"model_arg": {"drop_path": 0.1}}, r"unknown key 'model_arg' \(did you mean 'model_args'\?\)"),
  ],
)
def test_unknown_key_is_named_with_a_close_match(given, message):
  with pytest.raises(ValueError, match=message):
    config_lib.validate({"num_steps": 10, **given})


def test_unknown_key_without_a_close_match_and_errors_reported_together():
  with pytest.raises(ValueError) as info:
    config_lib.validate({"num_steps": 10, "xyzzy": 1})
  assert "unknown key 'xyzzy'" in str(info.value) and "did you mean" not in str(info.value)
  with pytest.raises(ValueError) as info:
    config_lib.validate({"num_step": 10, "seed": "0", "data": {"batch_size": 1.5}})
  text = str(info.value)
  assert "'num_step'" in text and "seed='0' should be of type int" in text
  assert "data.batch_size=1.5 should be of type int" in text


def test_unknown_key_holding_an_empty_block_is_an_error():
  """An unknown key whose value is an empty block (`config.optimzer = ConfigDict()`, to be filled by a sweep,
  or `{"optimzer": {}}`) is an error naming it, although it flattens to no keys; an empty known block is fine."""
  with pytest.raises(ValueError, match=r"unknown key 'optimzer'"):
    config_lib.validate({"num_steps": 10, "optimzer": {}})
  config_lib.validate({"num_steps": 10, "data": {}})  # an empty known block stays fine


# ------------------------------------------------------------------------------------------------- types


@pytest.mark.parametrize(
  "given, message",
  [
    ({"num_steps": "10"}, r"num_steps='10' should be of type int"),
    ({"num_steps": 10.0}, r"num_steps=10\.0 should be of type int"),
    ({"num_steps": True}, r"num_steps=True should be of type int"),
    ({"num_steps": 1, "progress_bar": 1}, r"progress_bar=1 should be of type bool"),
    ({"num_steps": 1, "label_smoothing": "0.1"}, r"label_smoothing='0\.1' should be of type float"),
    ({"num_steps": 1, "model": 3}, r"model=3 should be of type str"),
    ({"num_steps": 1, "data": {"train": "digits"}}, r"data\.train='digits' should be of type ConfigDict"),
  ],
)
def test_wrong_type_names_key_and_type(given, message):
  with pytest.raises(ValueError, match=message):
    config_lib.validate(given)


@pytest.mark.parametrize(
  "given, key",
  [
    ({"num_steps": 10, "log_every_steps": None}, "log_every_steps"),
    ({"num_steps": 10, "data": {"batch_size": None}}, "data.batch_size"),
    ({"num_steps": None, "num_epochs": 1.0}, "num_steps"),
    ({"num_steps": 10, "seed": None}, "seed"),
  ],
)
def test_none_for_a_required_setting_is_a_value_error(given, key):
  """None for a setting that needs a value is a ValueError naming the key: not a TypeError from a range check,
  nor (seed) a value that passes validation and fails later. None is accepted only where it is documented
  (test_documented_none_settings_are_accepted)."""
  with pytest.raises(ValueError, match=key.replace(".", r"\.")):
    config_lib.validate(given)


def test_documented_none_settings_are_accepted():
  full = config_lib.validate(
    {
      "num_steps": 10,
      "pretrained": "hf:google/vit-base-patch16-224",
      "num_classes": None,
      "image_size": None,
      "best_metric": None,
      "data": {"eval": None, "normalize": None},
    }
  )
  assert full.data.eval is None and full.data.normalize is None and full.best_metric is None
  assert full.pretrained == "hf:google/vit-base-patch16-224"
  assert config_lib.validate({"num_steps": 10, "num_classes": 10, "image_size": 384}).image_size == 384


# ------------------------------------------------------------------------------------------------- values


def test_exactly_one_of_num_steps_and_num_epochs():
  with pytest.raises(ValueError, match=r"exactly one of num_steps .* got num_steps=5, num_epochs=1\.0"):
    config_lib.validate({"num_steps": 5, "num_epochs": 1.0})
  with pytest.raises(ValueError, match=r"exactly one of num_steps .* got num_steps=0, num_epochs=0\.0"):
    config_lib.validate({})
  with pytest.raises(ValueError, match=r"exactly one of num_steps"):
    config_lib.validate(config_lib.defaults())
  assert config_lib.validate({"num_epochs": 0.5}).num_epochs == 0.5


@pytest.mark.parametrize(
  "given, message",
  [
    ({"dtype": "float8"}, r"dtype='float8' is not one of \('float32', 'bfloat16', 'float16'\)"),
    ({"label_smoothing": 1.0}, r"label_smoothing must be in \[0, 1\), got 1\.0"),
    ({"label_smoothing": -0.1}, r"label_smoothing must be in \[0, 1\), got -0\.1"),
    ({"log_every_steps": 0}, r"log_every_steps must be >= 1, got 0"),
    ({"checkpoint_every_steps": 0}, r"checkpoint_every_steps must be >= 1"),
    ({"keep_checkpoints": 0}, r"keep_checkpoints must be >= 1"),
    ({"eval_every_steps": -1}, r"eval_every_steps must be >= 0"),
    ({"data": {"batch_size": 0}}, r"data\.batch_size must be >= 1"),
    ({"data": {"eval_batch_size": -1}}, r"data\.eval_batch_size >= 0"),
    ({"data": {"normalize": None}}, r"data\.normalize=None means the pretrained checkpoint's mean/std"),
  ],
)
def test_bad_values(given, message):
  with pytest.raises(ValueError, match=message):
    config_lib.validate({"num_steps": 10, **given})


# --------------------------------------------------------------------------------------------- free-form


def test_free_form_blocks_are_replaced_whole():
  blocks = {
    "model_args": {"drop_path": 0.1, "image_size": 32},
    "optimizer": {"name": "sgd", "lr": 0.1},  # no weight_decay=0.05 from the default block
    "mesh": {"fsdp": -1},  # no data=-1
    "sharding": {"rules": [["mlp", "model"]]},
    "data": {"train": {"kind": "folder", "path": "/images"}},  # no split="train"
  }
  full = config_lib.validate({"num_steps": 10, **blocks})
  assert full.model_args.to_dict() == {"drop_path": 0.1, "image_size": 32}
  assert full.optimizer.to_dict() == {"name": "sgd", "lr": 0.1}
  assert full.mesh.to_dict() == {"fsdp": -1}
  assert [list(r) for r in full.sharding.rules] == [["mlp", "model"]] and set(full.sharding) == {"rules"}
  assert full.data.train.to_dict() == {"kind": "folder", "path": "/images"}
  # The rest of `data` is not free-form: its other keys keep their defaults, data.eval included.
  assert full.data.to_dict() == {**_expected()["data"], "train": {"kind": "folder", "path": "/images"}}
  # Keys inside a free-form block are not checked here (their owners check them).
  config_lib.validate({"num_steps": 10, "optimizer": {"anything": 1}, "model_args": {"whatever": "x"}})


def recipe_assigning(path: str, block):
  """What a recipe's get_config returns after `c.<path> = block` (rather than setting the block's fields)."""
  c = config_lib.defaults()
  c.num_steps = 10
  config_lib.set_path(c, path, block)
  return c


@pytest.mark.parametrize(
  "path, block, lost",
  [
    ("optimizer", {"name": "sgd", "lr": 0.1, "schedule": {"warmup_steps": 5}}, "'accumulate_steps', 'b1'"),
    ("optimizer", ml_collections.ConfigDict({"name": "lamb", "lr": 2e-3}), "'accumulate_steps', 'b1'"),
    ("optimizer.schedule", {"warmup_steps": 5}, "'boundaries', 'decay', 'end_lr_fraction', 'factor', 'total_steps'"),
  ],
)
def test_a_recipe_that_assigns_a_new_optimizer_block_is_an_error(path, block, lost):
  # --config.optimizer.KEY can only set keys the recipe's config holds: the dropped ones would be out of reach.
  with pytest.raises(
    ValueError,
    match=rf"{path} was assigned a new block that lacks {lost}.*so "
    rf"--config\.{path}\.KEY cannot set them: set fields of the default block "
    rf"instead \(c\.{path}\.KEY = VALUE, or c\.{path}\.update\(KEY=VALUE",
  ):
    config_lib.validate(recipe_assigning(path, block))


def test_a_recipe_that_edits_the_optimizer_block_in_place_is_fine():
  c = recipe_assigning("optimizer.lr", 0.1)
  c.optimizer.update(name="sgd", clip_norm=1.0, schedule={"warmup_steps": 5})  # update merges nested blocks
  c.optimizer.schedule.decay = "linear"
  opt = config_lib.validate(c).optimizer
  assert (opt.name, opt.lr, opt.clip_norm, opt.weight_decay, opt.b1) == ("sgd", 0.1, 1.0, 0.05, 0.9)
  assert (opt.schedule.warmup_steps, opt.schedule.decay) == (5, "linear")
  # A block with every key (e.g. a validated config, validated again) was not cut down.
  assert config_lib.validate(config_lib.validate(c)).optimizer.to_dict() == opt.to_dict()


# ------------------------------------------------------------------------------------------------ parse_arg


def test_parse_arg_sets_fields_over_defaults():
  args = config_lib.parse_arg("model=vit,runlocal", model="resnet", runlocal=False)
  assert isinstance(args, ml_collections.ConfigDict)
  assert args.to_dict() == {"model": "vit", "runlocal": True}
  assert config_lib.parse_arg(None, model="resnet", runlocal=False).to_dict() == {"model": "resnet", "runlocal": False}
  assert config_lib.parse_arg("", runlocal=True).runlocal is True
  typed = config_lib.parse_arg(
    " batch=64 , lr=1e-3,steps=10,runlocal=false,variant=B/16 ", batch=32, lr=0.1, steps=0, runlocal=True, variant=None
  )
  assert typed.to_dict() == {"batch": 64, "lr": 1e-3, "steps": 10, "runlocal": False, "variant": "B/16"}
  assert type(typed.batch) is int and type(typed.lr) is float
  for text, value in (("TRUE", True), ("1", True), ("0", False), ("False", False)):
    assert config_lib.parse_arg(f"runlocal={text}", runlocal=False).runlocal is value


@pytest.mark.parametrize(
  "arg, message",
  [
    ("modle=vit", r"Unknown config argument 'modle' in 'modle=vit'; accepted: model, runlocal, batch"),
    ("runlocal=maybe", r"runlocal='maybe' should be true or false"),
    ("batch=big", r"batch='big' should be a int"),
    ("batch=1.5", r"batch='1\.5' should be a int"),
    ("model", r"Config argument 'model' needs a value \(model=\.\.\.\)"),
  ],
)
def test_parse_arg_errors(arg, message):
  with pytest.raises(ValueError, match=message):
    config_lib.parse_arg(arg, model="resnet", runlocal=False, batch=32)
