"""Detector throughput: lvm_jax's RetinaNet against torchvision's, same architecture, same inputs, same machine.

  python benchmarks/detection.py [--sizes 512,800] [--batch 2] [--backbone resnet50|resnet18]
                                 [--seconds 10 | --steps N] [--no-train]
                                 [--torch-python /path/to/env/bin/python] [--out results.md] [--out results.json]

The network is torchvision's retinanet_resnet50_fpn (v1: ResNet-50 with frozen BatchNorm, stem and first stage
frozen, FPN P3-P7, 91 classes) at a square canvas of each size, with random weights (speed does not depend on them):
  infer:  uint8 images -> normalized -> backbone, FPN, heads -> per-level top-k, box decoding, class-wise NMS, 300
          detections (lvm_jax: one jitted function; torchvision: model.eval() under inference_mode on a list of
          float images, its transform (normalize; resizing to the same size) and post-processing included);
  train:  forward, torchvision's losses on 8 boxes an image, backward, SGD with momentum (lvm_jax: the trainer's own
          train step, lvm_jax.train.program.TrainProgram, jitted with donation; torchvision: model.train(), the loss
          dict summed, backward, torch.optim.SGD step);
  nms:    class-wise NMS of 5,000 boxes (91 classes, IoU 0.5) down to at most 300 (lvm_jax.tasks.detection.nms
          jitted; torchvision.ops.batched_nms), the kept boxes checked to be the same.
Compilation (lvm_jax) and the first call (torch) are timed apart; each measurement warms up and reports the median.

torchvision cannot be installed beside this project's torch (see README, "Tests"), so the torchvision side runs in
another Python environment that has torch and torchvision (--torch-python; numpy is all it needs besides): this
script starts it on itself with --torchvision-worker, the inputs written to a shared .npz file so both sides see the
very same arrays. It gets as many threads as JAX's CPU backend uses.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared timing module beside this script

import numpy as np  # noqa: E402

from timing import cpu_model, cpu_threads, time_calls  # noqa: E402

NUM_CLASSES = 91
BOXES_PER_IMAGE = 8
MAX_BOXES = 16  # the padded ground truth of the lvm_jax batch
NMS_BOXES, NMS_IOU, NMS_KEEP = 5_000, 0.5, 300
# torchvision's detection reference: SGD lr 0.01 (batch 16), momentum 0.9, weight decay 1e-4.
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 1e-4
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def make_inputs(sizes, batch: int, seed: int = 0) -> dict:
  """The arrays both sides use: uint8 images [B, S, S, 3] a size, BOXES_PER_IMAGE boxes an image (x1, y1, x2, y2
  pixels, 16 to S/2 on a side) with labels in 1..90, and the NMS problem (boxes, scores, classes)."""
  rng = np.random.default_rng(seed)
  arrays = {}
  for size in sizes:
    arrays[f"images_{size}"] = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    wh = rng.uniform(16, size / 2, (batch, BOXES_PER_IMAGE, 2))
    xy = rng.uniform(0, size - wh)
    arrays[f"boxes_{size}"] = np.concatenate([xy, xy + wh], -1).astype(np.float32)
    arrays[f"labels_{size}"] = rng.integers(1, NUM_CLASSES, (batch, BOXES_PER_IMAGE)).astype(np.int64)
  centers = rng.uniform(0, 800, (NMS_BOXES, 2))
  wh = rng.uniform(10, 200, (NMS_BOXES, 2))
  arrays["nms_boxes"] = np.concatenate([centers - wh / 2, centers + wh / 2], -1).astype(np.float32)
  arrays["nms_scores"] = rng.uniform(0, 1, NMS_BOXES).astype(np.float32)
  arrays["nms_classes"] = rng.integers(0, NUM_CLASSES, NMS_BOXES).astype(np.int64)
  return arrays


# --------------------------------------------------------------------------------------------------- lvm_jax


def jax_benchmarks(arrays: dict, sizes, args) -> dict:
  import jax
  import jax.numpy as jnp

  from lvm_jax.data import device_batches
  from lvm_jax.parallel import create_mesh, partitioning
  from lvm_jax.tasks.detection import detector, nms
  from lvm_jax.tasks.detection.task import Detection, DetectorSpec
  from lvm_jax.train.program import TrainProgram

  timing = dict(seconds=args.seconds, steps=args.steps, min_repeats=args.min_repeats)
  spec = DetectorSpec(head="retinanet", version="v1", num_classes=NUM_CLASSES)
  model = spec.build(detector.resnet_backbone(args.backbone))
  out = {"device": f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind})"}
  mesh = create_mesh(devices=jax.devices()[:1])
  optimizer = {
    "name": "sgd",
    "lr": LR,
    "momentum": MOMENTUM,
    "weight_decay": WEIGHT_DECAY,
    "frozen": detector.frozen_backbone_patterns(3),
    "schedule": {"warmup_steps": 0, "total_steps": 1_000, "decay": "constant"},
  }
  for size in sizes:
    images = arrays[f"images_{size}"]
    program = TrainProgram.create(
      task=Detection(spec),
      model=model,
      optimizer=optimizer,
      mesh=mesh,
      strategy=partitioning.get_strategy("dp"),
      input_shape=(1, size, size, 3),
      normalize=(MEAN, STD),
    )
    state = program.new_state()
    variables = jax.tree.map(jnp.copy, state.variables)  # the train step donates the state's buffers
    hw = jnp.full((images.shape[0], 2), size, jnp.float32)

    def detect(variables, images):
      x = device_batches.normalize(images, MEAN, STD)
      return spec.detections(model.apply(variables, x, train=False), images.shape[1:3], hw)

    device_images = jax.device_put(images)
    t0 = time.perf_counter()
    infer = jax.jit(detect).lower(variables, device_images).compile()
    compile_s = time.perf_counter() - t0
    r = time_calls(lambda: jax.block_until_ready(infer(variables, device_images)), **timing)
    out[f"infer_{size}"] = dict(img_s=len(images) / r["median_s"], compile_s=compile_s, repeats=r["repeats"])

    if args.train:
      boxes, labels = arrays[f"boxes_{size}"], arrays[f"labels_{size}"]
      pad = MAX_BOXES - boxes.shape[1]
      batch = {
        "image": device_images,
        "boxes": np.pad(boxes, ((0, 0), (0, pad), (0, 0))),
        "labels": np.pad(labels, ((0, 0), (0, pad))).astype(np.int32),
        "box_mask": np.pad(np.ones(labels.shape, bool), ((0, 0), (0, pad))),
      }
      batch = jax.device_put(batch)
      t0 = time.perf_counter()
      step = program.train_step().lower(state, batch).compile()
      compile_s = time.perf_counter() - t0
      holder = [state]

      def train_call():
        holder[0], metrics = step(holder[0], batch)
        jax.block_until_ready(metrics)

      r = time_calls(train_call, **timing)
      out[f"train_{size}"] = dict(img_s=len(images) / r["median_s"], compile_s=compile_s, repeats=r["repeats"])

  nms_fn = jax.jit(lambda b, s, c: nms.batched_nms(b, s, c, None, NMS_IOU, NMS_KEEP))
  problem = [jax.device_put(arrays[k]) for k in ("nms_boxes", "nms_scores", "nms_classes")]
  keep, count = nms_fn(*problem)
  r = time_calls(lambda: jax.block_until_ready(nms_fn(*problem)), **timing)
  out["nms"] = dict(ms=r["median_s"] * 1e3, repeats=r["repeats"], kept=np.asarray(keep)[: int(count)].tolist())
  return out


# --------------------------------------------------------------------------------------------- torchvision


def torchvision_model(backbone: str, size: int):
  """torchvision's retinanet_resnet50_fpn as it builds it from ImageNet backbone weights (FrozenBatchNorm2d,
  trainable_backbone_layers=3, P6 from P5), on `backbone`, its transform keeping a size x size image as it is."""
  import torchvision
  from torchvision.models.detection import backbone_utils, retinanet
  from torchvision.ops import feature_pyramid_network, misc

  body = getattr(torchvision.models, backbone)(norm_layer=misc.FrozenBatchNorm2d)
  body = backbone_utils._resnet_fpn_extractor(
    body, 3, returned_layers=[2, 3, 4], extra_blocks=feature_pyramid_network.LastLevelP6P7(256, 256)
  )
  anchors = retinanet._default_anchorgen()
  return retinanet.RetinaNet(body, NUM_CLASSES, anchor_generator=anchors, min_size=size, max_size=size)


def torchvision_benchmarks(arrays: dict, sizes, args) -> dict:
  import torch
  import torchvision

  torch.set_num_threads(args.threads)
  timing = dict(seconds=args.seconds, steps=args.steps, min_repeats=args.min_repeats)
  out = {"versions": f"torch {torch.__version__}, torchvision {torchvision.__version__}, {args.threads} threads"}
  for size in sizes:
    images = [torch.from_numpy(x).permute(2, 0, 1).float() / 255 for x in arrays[f"images_{size}"]]
    torch.manual_seed(0)
    model = torchvision_model(args.backbone, size).eval()

    def infer():
      with torch.inference_mode():
        model(images)

    t0 = time.perf_counter()
    infer()
    first_s = time.perf_counter() - t0
    r = time_calls(infer, **timing)
    out[f"infer_{size}"] = dict(img_s=len(images) / r["median_s"], first_call_s=first_s, repeats=r["repeats"])

    if args.train:
      targets = [
        {"boxes": torch.from_numpy(b), "labels": torch.from_numpy(lab)}
        for b, lab in zip(arrays[f"boxes_{size}"], arrays[f"labels_{size}"])
      ]
      model.train()
      params = [p for p in model.parameters() if p.requires_grad]
      opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

      def train():
        opt.zero_grad(set_to_none=True)
        losses = model(images, targets)
        sum(losses.values()).backward()
        opt.step()

      t0 = time.perf_counter()
      train()
      first_s = time.perf_counter() - t0
      r = time_calls(train, **timing)
      out[f"train_{size}"] = dict(img_s=len(images) / r["median_s"], first_call_s=first_s, repeats=r["repeats"])

  problem = [torch.from_numpy(arrays[k]) for k in ("nms_boxes", "nms_scores", "nms_classes")]
  keep = torchvision.ops.batched_nms(*problem, NMS_IOU)[:NMS_KEEP]
  r = time_calls(lambda: torchvision.ops.batched_nms(*problem, NMS_IOU)[:NMS_KEEP], **timing)
  out["nms"] = dict(ms=r["median_s"] * 1e3, repeats=r["repeats"], kept=keep.tolist())
  return out


def run_torchvision(python: str, inputs: pathlib.Path, args) -> dict:
  """This script's --torchvision-worker in the `python` environment, on the saved inputs; its JSON result."""
  command = [python, __file__, "--torchvision-worker", str(inputs), "--threads", str(cpu_threads())]
  command += ["--sizes", args.sizes, "--backbone", args.backbone, "--seconds", str(args.seconds)]
  command += ["--min-repeats", str(args.min_repeats)] + (["--steps", str(args.steps)] if args.steps else [])
  command += [] if args.train else ["--no-train"]
  done = subprocess.run(command, capture_output=True, text=True)
  if done.returncode != 0:
    raise SystemExit(f"error: the torchvision side ({python}) failed:\n{done.stderr[-3000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------- report


def _fmt(value, spec: str) -> str:
  return "-" if value is None else format(value, spec)


def rows(results: dict, sizes) -> list[dict]:
  ours, theirs = results["lvm_jax"], results.get("torchvision", {})
  table = []
  for mode in ("infer", "train"):
    for size in sizes:
      if f"{mode}_{size}" not in ours:
        continue
      mine, ref = ours[f"{mode}_{size}"]["img_s"], theirs.get(f"{mode}_{size}", {}).get("img_s")
      table.append(
        dict(
          what=f"{mode} {size}x{size}",
          lvm_jax=mine,
          torchvision=ref,
          ratio=None if not ref else mine / ref,
          compile_s=ours[f"{mode}_{size}"]["compile_s"],
          unit="img/s",
        )
      )
  mine, ref = ours["nms"]["ms"], theirs.get("nms", {}).get("ms")
  table.append(
    dict(what="nms 5000 -> 300", lvm_jax=mine, torchvision=ref, ratio=None if not ref else ref / mine, unit="ms")
  )
  return table


def markdown(table: list[dict]) -> str:
  lines = ["| what | lvm_jax | torchvision | lvm_jax / torchvision | compile s |", "|---|---|---|---|---|"]
  for r in table:
    fmt = ".2f" if r["unit"] == "img/s" else ".1f"
    lines.append(
      f"| {r['what']} ({r['unit']}) | {_fmt(r['lvm_jax'], fmt)} | {_fmt(r['torchvision'], fmt)} | "
      f"{_fmt(r['ratio'], '.2f')}x | {_fmt(r.get('compile_s'), '.1f')} |"
    )
  return "\n".join(lines)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sizes", default="512,800", help="square canvas sides, comma-separated")
  parser.add_argument("--batch", type=int, default=2, help="images a call (torchvision's references: 2 a GPU)")
  parser.add_argument("--backbone", choices=("resnet50", "resnet18"), default="resnet50")
  parser.add_argument("--seconds", type=float, default=10.0, help="time per measurement (after warmup)")
  parser.add_argument("--steps", type=int, default=None, help="a fixed number of timed calls instead of --seconds")
  parser.add_argument("--min-repeats", type=int, default=3)
  parser.add_argument("--train", action=argparse.BooleanOptionalAction, default=True, help="also the train step")
  parser.add_argument(
    "--torch-python", default=None, help="a Python with torch + torchvision; without it, lvm_jax alone"
  )
  parser.add_argument("--out", type=pathlib.Path, action="append", default=[], help="results .json or markdown")
  parser.add_argument("--torchvision-worker", type=pathlib.Path, default=None, help=argparse.SUPPRESS)
  parser.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  args.size_list = [int(s) for s in args.sizes.split(",") if s.strip()]
  if not args.size_list or min(args.size_list) < 64 or any(s % 32 for s in args.size_list):
    parser.error(f"--sizes: multiples of 32 of at least 64, got {args.sizes!r}")
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.torchvision_worker:  # the other environment: torch side only, one JSON line on stdout
    with np.load(args.torchvision_worker) as data:
      arrays = dict(data)
    print(json.dumps(torchvision_benchmarks(arrays, args.size_list, args)))
    return {}

  from lvm_jax.data import host_memory

  host_memory.keep_large_buffers()  # as the trainer does
  start = time.perf_counter()
  arrays = make_inputs(args.size_list, args.batch)
  results = {"lvm_jax": jax_benchmarks(arrays, args.size_list, args)}
  if args.torch_python:
    with tempfile.TemporaryDirectory() as tmp:
      inputs = pathlib.Path(tmp) / "inputs.npz"
      np.savez(inputs, **arrays)
      results["torchvision"] = run_torchvision(args.torch_python, inputs, args)
    same = results["torchvision"]["nms"]["kept"] == results["lvm_jax"]["nms"]["kept"]
    results["nms_same_boxes"] = same
  table = rows(results, args.size_list)
  import jax

  print(
    f"machine: {cpu_model()}, {cpu_threads()} CPU threads; lvm_jax on {results['lvm_jax']['device']}, "
    f"jax {jax.__version__}; " + results.get("torchvision", {}).get("versions", "torchvision not run")
  )
  print(
    f"RetinaNet v1 {args.backbone}-FPN, {NUM_CLASSES} classes, batch {args.batch}, float32; median of >= "
    f"{args.min_repeats} calls over {args.steps and f'{args.steps} steps' or f'{args.seconds:g} s'}; "
    f"run took {time.perf_counter() - start:.0f} s"
    + ("" if "nms_same_boxes" not in results else f"; NMS keeps the same boxes: {results['nms_same_boxes']}")
  )
  print(markdown(table))
  for path in args.out:
    if path.suffix == ".json":
      path.write_text(json.dumps(dict(rows=table, raw=results), indent=1, default=str))
    else:
      path.write_text(markdown(table) + "\n")
  return results


if __name__ == "__main__":
  main()
