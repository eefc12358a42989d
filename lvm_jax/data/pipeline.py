"""Train and eval tf.data pipelines over a source's per-process shards.

Training is an endless, deterministic stream: epoch e of each data shard is shuffled with a seed derived
from (seed, e), every example gets its own stateless rng from (seed, shard, e, position), and a run that
resumes after `start` examples skips exactly those (before decoding), so it sees the batches an
uninterrupted run would have seen. Evaluation visits every example of the split exactly once across all
processes, pads the last batches with masked examples, and gives every process the same number of steps.
"""

import dataclasses
import math
from typing import Callable, Optional, Sequence, Union

import numpy as np

from lvm_jax.data import pp
from lvm_jax.tf_host import tf

Op = Callable[[dict], dict]
PpSpec = Union[str, Sequence[str]]


@dataclasses.dataclass(frozen=True)
class Shard:
  """Which part of the data this process reads."""

  index: int = 0
  count: int = 1

  @classmethod
  def current(cls) -> "Shard":
    import jax

    return cls(jax.process_index(), jax.process_count())


def local_batch_size(global_batch_size: int, shard: Shard) -> int:
  if global_batch_size % shard.count:
    raise ValueError(f"global batch size {global_batch_size} is not divisible by the {shard.count} processes.")
  return global_batch_size // shard.count


def _split_ops(spec: PpSpec) -> tuple[list[Op], list[Op]]:
  """(per-example ops, batch ops): batch-level ops (mixup, cutmix) run after batching."""
  ops = pp.parse(spec)
  per_example = [op for op in ops if not pp.is_batch_op(op)]
  batch = [op for op in ops if pp.is_batch_op(op)]
  first_batch_op = next((i for i, op in enumerate(ops) if pp.is_batch_op(op)), len(ops))
  if any(not pp.is_batch_op(op) for op in ops[first_batch_op:]):
    raise ValueError(f"pp {spec!r}: batch ops (mixup, cutmix) must come last.")
  return per_example, batch


def _chain(ops: Sequence[Op]) -> Op:
  def apply(example):
    for op in ops:
      example = op(example)
    return example

  return apply


def _example_rng(seed: int, shard: Shard, epoch, position) -> tf.Tensor:
  """A stateless seed unique to (run seed, process, epoch, position in the epoch)."""
  base = tf.constant([seed, shard.index], tf.int64)
  rng = tf.random.experimental.stateless_fold_in(base, tf.cast(epoch, tf.int64))
  return tf.random.experimental.stateless_fold_in(rng, tf.cast(position, tf.int64))


def _shard_stream(
  source,
  shard: Shard,
  per_example: list[Op],
  batch_ops: list[Op],
  batch_size: int,
  seed: int,
  start: int,
  shuffle_buffer: int,
) -> tf.data.Dataset:
  """One shard's endless stream of batches: per-epoch shuffle, per-example rng, skip `start`, ops, batch."""
  shard_size = source.shard_size(shard.index, shard.count)
  if shard_size == 0:
    raise ValueError(f"data shard {shard.index} of {shard.count} has no training examples.")
  first_epoch, offset = divmod(int(start), shard_size)
  base = source.references(shard.index, shard.count)

  def epoch_examples(epoch):
    key = tf.random.experimental.stateless_fold_in(tf.constant([seed, 1], tf.int64), epoch)
    epoch_seed = tf.random.stateless_uniform([], key, minval=None, maxval=None, dtype=tf.int64)
    shuffled = base.shuffle(min(shuffle_buffer, shard_size), seed=epoch_seed, reshuffle_each_iteration=False)
    return shuffled.enumerate().map(lambda i, ex: {**ex, "rng": _example_rng(seed, shard, epoch, i)})

  ds = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max).flat_map(epoch_examples)
  ds = ds.skip(offset)  # a resume never decodes the skipped examples (nor reads them, for a source with `load`)
  if source.load is not None:
    ds = ds.map(source.load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.map(_chain(per_example), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(batch_size, drop_remainder=True)
  if batch_ops:
    ds = ds.map(_chain(batch_ops), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.map(lambda batch: {k: v for k, v in batch.items() if k != "rng"})


def train_dataset(
  source,
  spec: PpSpec,
  *,
  global_batch_size: int,
  seed: int,
  start: int = 0,
  shard: Optional[Shard] = None,
  num_shards: Optional[int] = None,
  shuffle_buffer: int = 10_000,
  prefetch: int = 2,
) -> tf.data.Dataset:
  """Batches of this process's share of `global_batch_size`, forever.

  The split is read as `num_shards` data shards (default: one per process), each shuffled and batched on its
  own (global_batch_size / num_shards examples a step, batch ops such as mixup within it); a process reads only
  its num_shards / process_count shards and concatenates their batches. The global batch is therefore the same
  for every process count that divides num_shards: a run can move between 1 host and several and see the same
  examples in the same order.

  Args:
    source: a Source (lvm_jax.data.sources.make_source) of the training split.
    spec: the pp string (or list of op strings), e.g. "decode_inception_crop(224)|flip_lr|mixup_cutmix(0.8, 1.0)";
      batch ops (mixup, cutmix) come last and run on each shard's batches.
    global_batch_size: examples per step over all processes; divisible by num_shards and the process count.
    seed: the run's seed: the same seed gives the same shuffles and augmentations.
    start: how many examples each shard already consumed, step * global_batch_size / num_shards on resume; the
      stream then continues exactly as an uninterrupted one would, without reading the skipped examples.
    shard: which process this is (default: jax.process_index() of jax.process_count()).
    num_shards: data shards the split is read as (default: one per process); a multiple of the process count.
    shuffle_buffer: examples (or file references) per shard's shuffle buffer; capped at the shard's size.
    prefetch: batches prepared ahead.

  Returns:
    An endless tf.data.Dataset of this process's batches, dicts of "image" (whatever the pp leaves: uint8
    unless it normalizes) and "label" (int, or soft [batch, classes] labels after onehot/mixup), with
    global_batch_size / process_count examples each.
  """
  shard = shard or Shard.current()
  num_shards = num_shards or shard.count
  if num_shards % shard.count:
    raise ValueError(f"data.num_shards={num_shards} must be a multiple of the {shard.count} processes.")
  local_batch_size(global_batch_size, shard)
  if global_batch_size % num_shards:
    raise ValueError(f"global batch size {global_batch_size} is not divisible by data.num_shards={num_shards}.")
  per_example, batch_ops = _split_ops(spec)
  mine = num_shards // shard.count
  streams = [
    _shard_stream(
      source,
      Shard(shard.index * mine + i, num_shards),
      per_example,
      batch_ops,
      global_batch_size // num_shards,
      seed,
      start,
      shuffle_buffer,
    )
    for i in range(mine)
  ]
  if len(streams) == 1:
    ds = streams[0]
  else:
    ds = tf.data.Dataset.zip(tuple(streams)).map(
      lambda *parts: {k: tf.concat([p[k] for p in parts], axis=0) for k in parts[0]}
    )
  return ds.prefetch(prefetch)


def eval_steps(source, global_batch_size: int, shard_count: int) -> int:
  """Steps that cover the largest shard: every process runs this many, padding where it runs out."""
  local_batch = global_batch_size // shard_count
  largest = max(source.shard_size(i, shard_count) for i in range(shard_count))
  return max(1, math.ceil(largest / local_batch))


def eval_dataset(
  source, spec: PpSpec, *, global_batch_size: int, shard: Optional[Shard] = None, prefetch: int = 2
) -> tf.data.Dataset:
  """Every example of the split exactly once across processes, in batches with a "mask" (1 real, 0 padding).

  All processes yield eval_steps(...) batches, so collective computations line up.

  Args:
    source: a Source of the evaluation split.
    spec: the pp string, deterministic and ending in a fixed size, e.g. "decode|resize_small(256)|central_crop(224)";
      batch ops (mixup, cutmix) are an error here.
    global_batch_size: examples per step over all processes, divisible by the process count.
    shard: which process this is (default: jax.process_index() of jax.process_count()).
    prefetch: batches prepared ahead.

  Returns:
    A finite tf.data.Dataset of this process's batches: the pp's outputs plus "mask" (int32), zero-filled
    examples with mask 0 padding the last batches; weight every metric by the mask.
  """
  shard = shard or Shard.current()
  local_batch = local_batch_size(global_batch_size, shard)
  per_example, batch_ops = _split_ops(spec)
  if batch_ops:
    raise ValueError(f"pp {spec!r}: batch ops (mixup, cutmix) are for training, not evaluation.")
  steps = eval_steps(source, global_batch_size, shard.count)
  fixed_rng = tf.constant([0, 0], tf.int64)  # eval ops are deterministic; the key is there for the contract
  ds = source.dataset(shard.index, shard.count).map(lambda ex: {**ex, "rng": fixed_rng})
  ds = ds.map(_chain(per_example), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.map(lambda ex: {**{k: v for k, v in ex.items() if k != "rng"}, "mask": tf.constant(1, tf.int32)})
  unknown = [f"{k} {tuple(s.shape)}" for k, s in ds.element_spec.items() if None in s.shape]
  if unknown:
    raise ValueError(
      f"pp {spec!r} leaves examples of unknown shape ({', '.join(unknown)}); end it with a fixed-size resize or "
      "crop (detection: det_resize_pad or det_scale_jitter, then det_pad_boxes) so examples can be batched."
    )
  padding = steps * local_batch - source.shard_size(shard.index, shard.count)
  blank = {k: tf.zeros(s.shape, s.dtype) for k, s in ds.element_spec.items()}
  ds = ds.concatenate(tf.data.Dataset.from_tensors(blank).repeat(padding))
  return ds.batch(local_batch, drop_remainder=True).prefetch(prefetch)
