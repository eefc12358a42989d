"""Two processes x two CPU devices on loopback (jax.distributed, gloo): disjoint shards, whole split, and the
assembled global batches equal the concatenation of the per-process batches built in one process."""

import collections
import os
import socket
import subprocess
import sys

import numpy as np

from lvm_jax.data import pipeline, sources
from tests.data.pipeline_cases import EVAL_PP, GLOBAL_BATCH, SEED, TRAIN_PP

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_read_disjoint_shards_and_assemble_the_global_batch(digits_dir, tmp_path):
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = ROOT
  procs = [
    subprocess.Popen(
      [sys.executable, "-m", "tests.data.multihost_worker", str(i), str(port), digits_dir, str(tmp_path / f"p{i}.npz")],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
    )
    for i in range(2)
  ]
  for p in procs:
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out.decode()[-3000:]
  results = [dict(np.load(tmp_path / f"p{i}.npz")) for i in range(2)]

  test = sources.make_source("digits", split="test", data_dir=digits_dir)
  # Examples by identity (encoded image, label): the two shards together are the split, each example once.
  whole = list(test.dataset(0, 1).as_numpy_iterator())
  split = collections.Counter(zip(np.array([ex["image"] for ex in whole]).tolist(), [int(ex["label"]) for ex in whole]))
  shards = [collections.Counter(zip(r["shard_images"].tolist(), r["shard_labels"].tolist())) for r in results]
  assert len(split) > 0.95 * test.num_examples  # nearly every example is distinct: identity means something
  assert shards[0] + shards[1] == split
  assert [sum(s.values()) for s in shards] == [test.shard_size(i, 2) for i in range(2)]

  # What each global batch must be: process 0's local batch, then process 1's (built here, in one process).
  locals_ = [
    list(
      pipeline.eval_dataset(
        test, EVAL_PP, global_batch_size=GLOBAL_BATCH, shard=pipeline.Shard(i, 2)
      ).as_numpy_iterator()
    )
    for i in range(2)
  ]
  assert int(results[0]["eval_steps"]) == len(locals_[0]) == len(locals_[1])
  for step in range(len(locals_[0])):
    for key in ("image", "label", "mask"):
      expected = np.concatenate([locals_[0][step][key], locals_[1][step][key]])
      for r in results:  # every process gathered the same global batch
        np.testing.assert_array_equal(r[f"eval_{step}_{key}"], expected)

  # The rows the mask keeps are the whole split once (padding masked out): as one process evaluates it.
  def kept(batches):
    return collections.Counter(
      (b["image"][i].tobytes(), int(b["label"][i])) for b in batches for i in np.flatnonzero(b["mask"])
    )

  steps = range(int(results[0]["eval_steps"]))
  gathered = [{k: results[0][f"eval_{step}_{k}"] for k in ("image", "label", "mask")} for step in steps]
  one_process = pipeline.eval_dataset(test, EVAL_PP, global_batch_size=GLOBAL_BATCH, shard=pipeline.Shard(0, 1))
  assert sum(int(b["mask"].sum()) for b in gathered) == test.num_examples
  assert kept(gathered) == kept(one_process.as_numpy_iterator())

  train = sources.make_source("digits", split="train", data_dir=digits_dir)
  for step in range(3):
    parts = [
      list(
        pipeline.train_dataset(train, TRAIN_PP, global_batch_size=GLOBAL_BATCH, seed=SEED, shard=pipeline.Shard(i, 2))
        .take(3)
        .as_numpy_iterator()
      )[step]
      for i in range(2)
    ]
    for key in ("image", "label"):
      np.testing.assert_array_equal(results[0][f"train_{step}_{key}"], np.concatenate([parts[0][key], parts[1][key]]))
