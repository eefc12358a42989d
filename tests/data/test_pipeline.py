"""The train/eval pipelines on the real digits data: determinism, exact resume, exact eval on 1 and 8 devices."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from lvm_jax.data import device_batches, pipeline, pp, sources
from tests.data.pipeline_cases import EVAL_PP, GLOBAL_BATCH, SEED, TRAIN_PP

ONE = pipeline.Shard(0, 1)


@pytest.fixture(scope="module")
def train(digits_dir):
  return sources.make_source("digits", split="train", data_dir=digits_dir)


@pytest.fixture(scope="module")
def test(digits_dir):
  return sources.make_source("digits", split="test", data_dir=digits_dir)


def batches(ds, n):
  return list(itertools.islice(ds.as_numpy_iterator(), n))


def test_same_seed_same_batches_other_seed_other_batches(train):
  a = batches(pipeline.train_dataset(train, TRAIN_PP, global_batch_size=32, seed=SEED, shard=ONE), 3)
  b = batches(pipeline.train_dataset(train, TRAIN_PP, global_batch_size=32, seed=SEED, shard=ONE), 3)
  c = batches(pipeline.train_dataset(train, TRAIN_PP, global_batch_size=32, seed=SEED + 1, shard=ONE), 3)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  assert not np.array_equal(a[0]["image"], c[0]["image"])
  assert a[0]["image"].shape == (32, 16, 16, 3) and a[0]["image"].dtype == np.float32
  assert a[0]["label"].shape == (32, 10)
  np.testing.assert_allclose(a[0]["label"].sum(-1), 1.0, atol=1e-6)


def test_resume_sees_exactly_the_batches_an_uninterrupted_run_sees(train):
  """Across an epoch boundary: 1,437 training digits in batches of 256 end the first epoch in batch 5."""
  full = batches(pipeline.train_dataset(train, TRAIN_PP, global_batch_size=256, seed=SEED, shard=ONE), 9)
  resumed = batches(
    pipeline.train_dataset(train, TRAIN_PP, global_batch_size=256, seed=SEED, shard=ONE, start=4 * 256), 5
  )
  for x, y in zip(full[4:], resumed):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])


def test_each_epoch_is_a_new_permutation_of_the_split(train):
  ds = pipeline.train_dataset(
    train, "decode|normalize((0, 0, 0), (1, 1, 1))", global_batch_size=1437, seed=SEED, shard=ONE, shuffle_buffer=2000
  )
  first, second = batches(ds, 2)
  key = lambda b: sorted(map(bytes, (np.round(b["image"] * 255).astype(np.uint8).reshape(len(b["image"]), -1))))
  assert key(first) == key(second)  # the same examples, each once
  assert not np.array_equal(first["label"], second["label"])  # in a new order
  assert np.bincount(first["label"], minlength=10).min() > 100


def _predict(images):
  """A fixed "model": deterministic logits from the pixels."""
  w = jax.random.normal(jax.random.key(0), (16 * 16 * 3, 10))
  return jnp.argmax(images.reshape(images.shape[0], -1) @ w, axis=-1)


@pytest.mark.parametrize("num_devices", [1, 8])
def test_eval_top1_equals_numpy_over_the_same_predictions(test, num_devices):
  assert test.num_examples == 360 and 360 % GLOBAL_BATCH  # a last, partial batch
  mesh = jax.make_mesh(
    (num_devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:num_devices]
  )
  sharding = NamedSharding(mesh, P("data"))
  evals = pipeline.eval_dataset(test, EVAL_PP, global_batch_size=GLOBAL_BATCH, shard=ONE)
  correct = seen = 0
  steps = 0
  for batch in device_batches.global_batches(evals.as_numpy_iterator(), sharding):
    assert batch["image"].sharding == sharding
    hits = (_predict(batch["image"]) == batch["label"]) * batch["mask"]
    correct += int(hits.sum())
    seen += int(batch["mask"].sum())
    steps += 1
  assert steps == pipeline.eval_steps(test, GLOBAL_BATCH, 1) == 6 and seen == 360

  decode = pipeline._chain(pp.parse(EVAL_PP))
  images, labels = [], []
  for example in test.dataset(0, 1):
    out = decode({**example, "rng": np.zeros(2, np.int64)})
    images.append(out["image"].numpy())
    labels.append(int(example["label"]))
  expected = float(np.mean(np.asarray(_predict(jnp.asarray(np.stack(images)))) == np.array(labels)))
  assert correct / seen == pytest.approx(expected, abs=1e-9)
  assert 0.0 < expected < 1.0


def test_eval_with_uneven_process_shards_gives_all_processes_the_same_steps(test):
  sizes = [test.shard_size(i, 3) for i in range(3)]
  assert sum(sizes) == 360
  steps = pipeline.eval_steps(test, 48, 3)
  masks = []
  for i in range(3):
    ds = pipeline.eval_dataset(test, EVAL_PP, global_batch_size=48, shard=pipeline.Shard(i, 3))
    got = batches(ds, 100)
    assert len(got) == steps
    masks.append(sum(int(b["mask"].sum()) for b in got))
  assert masks == sizes


def test_batch_not_divisible_by_processes_is_a_clear_error(train):
  with pytest.raises(ValueError, match="global batch size 10 is not divisible by the 4 processes"):
    pipeline.train_dataset(train, TRAIN_PP, global_batch_size=10, seed=0, shard=pipeline.Shard(0, 4))


def test_global_batches_do_not_depend_on_the_process_count(train):
  """With num_shards=4, one process (4 shards) and two processes (2 shards each) build the same global batches,
  also when resuming at step 3 (start = 3 * 16 / 4 examples a shard)."""

  def global_batches(count, start=0):
    streams = [
      pipeline.train_dataset(
        train, TRAIN_PP, global_batch_size=16, seed=3, start=start, shard=pipeline.Shard(i, count), num_shards=4
      ).as_numpy_iterator()
      for i in range(count)
    ]
    return [
      {k: np.concatenate([next_[k] for next_ in parts]) for k in parts[0]}
      for parts in (tuple(next(s) for s in streams) for _ in range(5))
    ]

  one, two = global_batches(1), global_batches(2)
  for a, b in zip(one, two):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  resumed = global_batches(2, start=3 * 4)
  for a, b in zip(one[3:], resumed):
    np.testing.assert_array_equal(a["image"], b["image"])
  with pytest.raises(ValueError, match="num_shards=3 must be a multiple of the 2 processes"):
    pipeline.train_dataset(train, TRAIN_PP, global_batch_size=12, seed=0, shard=pipeline.Shard(0, 2), num_shards=3)
