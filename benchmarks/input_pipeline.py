"""Input pipeline throughput: the full train pipeline against decode-only on the same JPEG files, same run.

  python benchmarks/input_pipeline.py [--images 1000] [--batch 64] [--seconds 10] [--rounds 3]

Builds a folder of real photos (the ones scikit-image and scikit-learn ship, cropped and rescaled to
ImageNet-like sizes), then measures images/s for
  decode only:   read + decode JPEG (the floor any pipeline pays), inside tf.data and batched like the train
                 line, handing Python only each image's shape and first pixel (so no per-image Python cost
                 flatters the ratio, and the decode cannot be skipped),
  train:         read + decode + inception crop 224 + flip, batched (lvm_jax.data.pipeline), assembled into
                 a global jax.Array and normalized on the device (lvm_jax.data.device_batches),
and prints the ratio train / decode-only. Also shown: the host part alone (uint8 global batches, no device
work), the device normalize alone (ms per batch on one fixed batch), and the chain normalizing on the host.

On a CPU-only machine the "device" is the same cores as tf.data, so the train line pays for both. There the
normalize is mostly the kernel zero-filling a fresh 38.5 MB float32 output per batch (glibc mmaps every
allocation over 32 MB); the trainer raises glibc's thresholds (lvm_jax.data.host_memory) so such buffers stay
in the heap, and so does this benchmark unless --fresh-pages is given. With an accelerator the host pays only
the host line.
"""

import argparse
import os
import pathlib
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import jax  # noqa: E402
import tensorflow as tf  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from lvm_jax.data import device_batches, host_memory, ops, pipeline, sources  # noqa: E402

TRAIN_PP = "decode_inception_crop(224)|flip_lr"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def photos() -> dict[str, np.ndarray]:
  import skimage.data
  from sklearn.datasets import load_sample_images

  out = {name: getattr(skimage.data, name)() for name in ("chelsea", "astronaut", "coffee", "rocket")}
  for name, image in zip(("china", "flower"), load_sample_images().images):
    out[name] = image
  return {k: v for k, v in out.items() if v.ndim == 3}


def make_folder(root: pathlib.Path, count: int, seed: int = 0) -> None:
  """`count` JPEGs in root/train/<photo>/, random crops rescaled to ~500x375 like ImageNet's average."""
  rng = np.random.default_rng(seed)
  sources_ = photos()
  names = sorted(sources_)
  for i in range(count):
    name = names[i % len(names)]
    image = sources_[name]
    h, w = image.shape[:2]
    ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    crop = PIL.Image.fromarray(image[y : y + ch, x : x + cw]).resize((500, 375), PIL.Image.BILINEAR)
    folder = root / "train" / name
    folder.mkdir(parents=True, exist_ok=True)
    crop.save(folder / f"{i:05d}.jpg", quality=90)


def rate(batches, images_per_element: int, seconds: float) -> float:
  iterator = iter(batches)
  for _ in range(3):  # warm up: thread pools, autotuning
    next(iterator)
  count, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    next(iterator)
    count += images_per_element
  return count / (time.perf_counter() - start)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--images", type=int, default=1000)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--seconds", type=float, default=10.0, help="per line and round")
  parser.add_argument("--rounds", type=int, default=3, help="each line's figure is its best round")
  parser.add_argument("--fresh-pages", action="store_true", help="leave glibc's mmap threshold as it is")
  args = parser.parse_args()
  kept = False if args.fresh_pages else host_memory.keep_large_buffers()
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp)
    make_folder(root, args.images)
    source = sources.make_source("folder", root=str(root), split="train")
    shard = pipeline.Shard(0, 1)
    decode = ops.decode()

    def decoded(example):
      image = decode(example)["image"]
      return {"shape": tf.shape(image), "corner": image[0, 0]}

    decode_only = (
      source.dataset(0, 1).repeat().map(decoded, num_parallel_calls=tf.data.AUTOTUNE).batch(args.batch).prefetch(2)
    )
    train = pipeline.train_dataset(source, TRAIN_PP, global_batch_size=args.batch, seed=0, shard=shard)
    host_norm = pipeline.train_dataset(
      source, TRAIN_PP + "|normalize('imagenet')", global_batch_size=args.batch, seed=0, shard=shard
    )
    sharding = NamedSharding(jax.make_mesh((1,), ("data",), devices=jax.devices()[:1]), P("data"))
    normalize = jax.jit(lambda images: device_batches.normalize(images, MEAN, STD))

    def on_device():
      for batch in device_batches.global_batches(train.as_numpy_iterator(), sharding):
        yield normalize(batch["image"]).block_until_ready()

    def host_only():
      for batch in device_batches.global_batches(train.as_numpy_iterator(), sharding):
        yield jax.block_until_ready(batch)

    fixed = device_batches.to_global(next(train.as_numpy_iterator()), sharding)["image"]

    def device_only():
      while True:
        yield normalize(fixed).block_until_ready()

    # Rounds interleave the lines and each keeps its best, so a burst of load on a shared machine lowers one
    # round of one line rather than the ratio.
    lines = {
      "decode": (lambda: decode_only, args.batch),
      "train": (on_device, args.batch),
      "host_norm": (lambda: host_norm, args.batch),
      "host_only": (host_only, args.batch),
    }
    best = dict.fromkeys(lines, 0.0)
    for _ in range(args.rounds):
      for name, (batches, per_element) in lines.items():
        best[name] = max(best[name], rate(batches(), per_element, args.seconds))
    decode_rate, train_rate, host_rate, host_only_rate = (best[k] for k in lines)
    device_rate = rate(device_only(), args.batch, min(args.seconds, 5.0))
  print(
    f"machine: {os.cpu_count()} CPU cores; tensorflow {tf.__version__}; {args.images} JPEGs 500x375; "
    f"large buffers kept in the heap: {kept}; best of {args.rounds} rounds of {args.seconds:g} s"
  )
  print(f"decode only              {decode_rate:8.1f} img/s")
  print(f"train pipeline (224)     {train_rate:8.1f} img/s   (normalized on the device)")
  print(f"train / decode-only      {train_rate / decode_rate:8.2%}")
  print(
    f"host part alone          {host_only_rate:8.1f} img/s   ({host_only_rate / decode_rate:.2%} of decode-only; "
    "uint8 global batches, no device work)"
  )
  print(
    f"device normalize alone   {1e3 * args.batch / device_rate:8.2f} ms/batch of {args.batch} "
    f"({device_rate:.0f} img/s; on CPU it shares the cores with tf.data)"
  )
  print(f"host-normalized variant  {host_rate:8.1f} img/s   ({host_rate / decode_rate:.2%} of decode-only)")


if __name__ == "__main__":
  main()
