"""Scaling: what each device holds and how long a train step takes as the mesh grows under DP, FSDP and TP, and
how compile time grows with depth with and without scanning over layers.

  python benchmarks/scaling.py [--models vit_b16] [--devices 1,2,4,8] [--strategies dp,fsdp,tp]
                               [--batch-per-device 1] [--steps 2] [--scan-layers] [--max-host-gib 12]
                               [--compile-models vit_b16,vit_l16,vit_h14] [--compile-depths 4,8,full]
                               [--out results.md|results.json]

The devices are fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=<largest --devices>, set
before jax is imported). The full sweep of the issue (a few hours on a 2-core host; ViT-L under DP at 8 devices
needs ~30 GiB of host memory, so raise --max-host-gib on a big host):

  python benchmarks/scaling.py --models vit_b16,vit_l16,swin_b --compile-depths 4,8,16,32,full

Table 1, for each model x strategy x device count, the train step exactly as the trainer builds it: mesh from
lvm_jax.parallel.create_mesh (dp: data=N, fsdp: fsdp=N, tp: model=N, fsdp_tp: fsdp=N/2 x model=2), the strategy's
sharded TrainState (AdamW, no EMA) and the step jitted with in/out shardings and the state donated, both from
lvm_jax.train.program.TrainProgram, which the trainer uses. The global batch is N x --batch-per-device images; under
TP every device sees the whole batch (there is no data-parallel axis).
  params / opt state MiB:  bytes one device holds (the shard shape of each array on device 0, from the shardings:
                           nothing is allocated to compute it); "of 1 dev" is the whole state per device over the
                           unsharded state: 1.0 replicated, 1/N ideally sharded.
  XLA arg / out / temp MiB: the compiled step's memory analysis per device: arguments (state + batch), outputs
                           (the new state, in the donated buffers) and temporaries (activations, gradients,
                           collectives' buffers).
  compile s:               lower() + compile() of the step.
  step s:                  median over --steps calls after one warmup call. The fake devices share the host's
                           cores, so N devices do not run N times faster: with the same work per device a growing
                           step time is the cost of the partitioning (collectives, redundant work), not a speedup.
A configuration whose state and temporaries would not fit in --max-host-gib on the host (all fake devices live in
host memory) is compiled and reported, but not run (step s: "skipped").

Table 2: compile time of the train step against depth for ViTs (create_model(name, depth=d, scan_layers=...)) on
one device, per-layer and scanned side by side. Lowered from abstract inputs (jax.ShapeDtypeStruct), so no
parameters are allocated: per-layer compile time grows with depth, scanned compile time should stay flat.
"""

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

DEFAULT_DEVICES = "1,2,4,8"


def _set_fake_devices(argv) -> None:
  """Asks XLA for as many host devices as the largest --devices (must run before jax is first imported)."""
  parser = argparse.ArgumentParser(add_help=False)
  parser.add_argument("--devices", default=DEFAULT_DEVICES)
  known, _ = parser.parse_known_args(argv)
  count = max(int(n) for n in known.devices.split(",") if n.strip())
  flag = f"--xla_force_host_platform_device_count={count}"
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()


if __name__ == "__main__":
  _set_fake_devices(sys.argv[1:])
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import jax  # noqa: E402

import lvm_jax  # noqa: E402
from lvm_jax.parallel import create_mesh, partitioning  # noqa: E402
from lvm_jax.parallel.mesh import batch_sharding  # noqa: E402
from lvm_jax.tasks.classification import Classification  # noqa: E402
from lvm_jax.train.program import TrainProgram  # noqa: E402

NUM_CLASSES = 1000
OPTIMIZER = {
  "name": "adamw",
  "lr": 1e-3,
  "weight_decay": 0.05,
  "schedule": {"warmup_steps": 100, "total_steps": 10_000, "decay": "cosine"},
}
MiB = 2.0**20


# ------------------------------------------------------------------------------------------------ memory


def per_device_bytes(tree) -> int:
  """Bytes device 0 holds of a tree of sharded arrays (or ShapeDtypeStructs carrying a sharding)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape)
    total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
  return total


def unsharded_bytes(tree) -> int:
  return sum(int(np.prod(leaf.shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree))


def xla_memory(compiled) -> dict:
  """Per-device sizes from XLA's memory analysis of a compiled executable ({} where the backend gives none)."""
  try:
    stats = compiled.memory_analysis()
  except Exception:  # not every backend / jax version implements it
    return {}
  if stats is None:
    return {}
  names = ("argument", "output", "temp", "alias", "generated_code")
  return {n: getattr(stats, f"{n}_size_in_bytes") for n in names if hasattr(stats, f"{n}_size_in_bytes")}


# ---------------------------------------------------------------------------------------------- the step


def mesh_shape(strategy: str, devices: int) -> dict:
  if strategy == "fsdp_tp":
    return {"fsdp": -1, "model": min(2, devices)}
  return {{"dp": "data", "fsdp": "fsdp", "tp": "model"}[strategy]: devices}


def build_model(name: str, **overrides):
  model = lvm_jax.create_model(name, num_classes=NUM_CLASSES)
  if not isinstance(model, lvm_jax.VisionTransformer):
    overrides.pop("scan_layers", None)  # a ViT option; the other families ignore it here
  return model.clone(**overrides) if overrides else model


def compile_train_step(model, mesh, strategy, batch_size: int):
  """(compiled step, its TrainProgram, compile seconds): the trainer's own step (lvm_jax.train.program), lowered
  from abstract inputs so nothing is allocated."""
  size = getattr(model, "image_size", 224)
  program = TrainProgram.create(
    task=Classification(model.num_classes),
    model=model,
    optimizer=OPTIMIZER,
    mesh=mesh,
    strategy=strategy,
    input_shape=(1, size, size, 3),
  )
  data_sharding = batch_sharding(mesh, batch_size)  # also checks that the batch splits over the devices
  batch = {
    "image": jax.ShapeDtypeStruct((batch_size, size, size, 3), np.float32, sharding=data_sharding),
    "label": jax.ShapeDtypeStruct((batch_size,), np.int32, sharding=data_sharding),
  }
  t0 = time.perf_counter()
  compiled = program.train_step().lower(program.abstract_state, batch).compile()
  return compiled, program, time.perf_counter() - t0


def time_steps(compiled, program: TrainProgram, batch_size: int, count: int) -> float:
  """Median seconds of `count` steps after one warmup step, on a freshly created state and a random batch."""
  size = program.input_shape[1]
  rng = np.random.default_rng(0)
  batch = jax.device_put(
    {
      "image": rng.standard_normal((batch_size, size, size, 3), dtype=np.float32),
      "label": rng.integers(0, program.task.num_classes, batch_size).astype(np.int32),
    },
    program.batch_sharding,
  )
  state = program.new_state()
  times = []
  for i in range(count + 1):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    if i:  # the first call pays for buffer setup
      times.append(time.perf_counter() - t0)
  del state
  return statistics.median(times)


def scaling_row(name: str, strategy_name: str, devices: int, args) -> dict:
  model = build_model(name, scan_layers=args.scan_layers)
  mesh = create_mesh(mesh_shape(strategy_name, devices), jax.devices()[:devices])
  strategy = partitioning.get_strategy(strategy_name)
  batch_size = devices * args.batch_per_device
  compiled, program, compile_s = compile_train_step(model, mesh, strategy, batch_size)
  abstract = program.abstract_state
  row = dict(
    model=name,
    scan_layers=getattr(model, "scan_layers", False),
    strategy=strategy_name,
    devices=devices,
    mesh=dict(mesh.shape),
    batch=batch_size,
    params_bytes=per_device_bytes(abstract.params),
    opt_bytes=per_device_bytes(abstract.opt_state),
    state_bytes=per_device_bytes(abstract),
    unsharded_state_bytes=unsharded_bytes(abstract),
    xla=xla_memory(compiled),
    compile_s=compile_s,
    step_s=None,
  )
  host = devices * (row["xla"].get("argument", row["state_bytes"]) + row["xla"].get("temp", 0))
  row["host_bytes"] = host
  if args.steps and host <= args.max_host_gib * 2**30:
    row["step_s"] = time_steps(compiled, program, batch_size, args.steps)
  return row


# ------------------------------------------------------------------------------------------ compile vs depth


def compile_seconds(name: str, depth: int, scan_layers: bool) -> float:
  model = build_model(name, depth=depth, scan_layers=scan_layers)
  mesh = create_mesh(devices=jax.devices()[:1])
  return compile_train_step(model, mesh, partitioning.get_strategy("dp"), 1)[-1]


def depth_rows(names: list[str], depths: list[str]) -> list[dict]:
  rows = []
  for name in names:
    full = build_model(name).depth
    for depth in sorted({full if d == "full" else int(d) for d in depths}):
      if depth > full and "full" in depths:
        continue  # deeper than the real model only when asked for by number
      row = dict(model=name, depth=depth, full_depth=full)
      for scan in (False, True):
        _log(f"compile {name} depth={depth} scan_layers={scan}")
        row["scan_s" if scan else "per_layer_s"] = compile_seconds(name, depth, scan)
      rows.append(row)
  return rows


# ------------------------------------------------------------------------------------------------- report


def _fmt(value, spec: str, none: str = "n/a") -> str:
  return none if value is None else format(value, spec)


def _table(header, lines) -> str:
  out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  out += ["| " + " | ".join(cells) + " |" for cells in lines]
  return "\n".join(out)


def scaling_markdown(rows: list[dict]) -> str:
  header = (
    "model",
    "strategy",
    "devices",
    "mesh",
    "global batch",
    "params MiB/dev",
    "opt state MiB/dev",
    "state of 1 dev",
    "XLA arg MiB",
    "XLA out MiB",
    "XLA temp MiB",
    "compile s",
    "step s",
  )
  lines = []
  for r in rows:
    mesh = " x ".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1) or "1"
    xla = {k: _fmt(r["xla"].get(k) and r["xla"][k] / MiB, ".1f") for k in ("argument", "output", "temp")}
    model = r["model"] + (" (scanned)" if r["scan_layers"] else "")
    lines.append(
      (
        model,
        r["strategy"],
        str(r["devices"]),
        mesh,
        str(r["batch"]),
        f"{r['params_bytes'] / MiB:.1f}",
        f"{r['opt_bytes'] / MiB:.1f}",
        f"{r['state_bytes'] / r['unsharded_state_bytes']:.3f}",
        xla["argument"],
        xla["output"],
        xla["temp"],
        f"{r['compile_s']:.1f}",
        _fmt(r["step_s"], ".2f", "skipped"),
      )
    )
  return _table(header, lines)


def depth_markdown(rows: list[dict]) -> str:
  header = ("model", "depth", "compile s per-layer", "compile s scanned", "per-layer / scanned")
  lines = [
    (
      r["model"],
      f"{r['depth']}" + (" (full)" if r["depth"] == r["full_depth"] else ""),
      f"{r['per_layer_s']:.1f}",
      f"{r['scan_s']:.1f}",
      f"{r['per_layer_s'] / r['scan_s']:.2f}",
    )
    for r in rows
  ]
  return _table(header, lines)


def _log(message: str) -> None:
  print(f"[{time.perf_counter() - _START:6.0f}s] {message}", file=sys.stderr, flush=True)


_START = time.perf_counter()


def _names(text: str) -> list[str]:
  return [n.strip() for n in text.split(",") if n.strip()]


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", default="vit_b16", help="comma-separated registered names (table 1)")
  parser.add_argument("--devices", default=DEFAULT_DEVICES, help="device counts (fake CPU devices)")
  parser.add_argument("--strategies", default="dp,fsdp,tp", help="sharding presets: dp, fsdp, tp, fsdp_tp")
  parser.add_argument("--batch-per-device", type=int, default=1)
  parser.add_argument("--steps", type=int, default=2, help="timed steps after one warmup (0: memory and compile only)")
  parser.add_argument("--scan-layers", action="store_true", help="table 1 ViTs with scan_layers=True")
  parser.add_argument(
    "--max-host-gib",
    type=float,
    default=12.0,
    help="run steps only when every fake device's state + temporaries fit in this much host memory",
  )
  parser.add_argument("--compile-models", default="vit_b16,vit_l16,vit_h14", help="ViTs for table 2 ('' skips it)")
  parser.add_argument(
    "--compile-depths", default="4,8,full", help="depths for table 2; 'full' is each model's own depth"
  )
  parser.add_argument("--out", type=pathlib.Path, default=None, help="write the results (.json, else markdown)")
  args = parser.parse_args(argv)
  models, strategies = _names(args.models), _names(args.strategies)
  counts = sorted({int(n) for n in _names(args.devices)})
  compile_models, depths = _names(args.compile_models), _names(args.compile_depths)
  for name in models + compile_models:
    lvm_jax.create_model(name)  # unknown names fail now, with suggestions, not after minutes of work
  for name in strategies:
    partitioning.get_strategy(name)
  if counts[-1] > jax.device_count():
    parser.error(f"--devices asks for {counts[-1]} devices, {jax.device_count()} are available.")

  rows = []
  for name in models:
    for strategy in strategies:
      for devices in counts:
        _log(f"{name} {strategy} on {devices} device(s)")
        rows.append(scaling_row(name, strategy, devices, args))
  deep = depth_rows(compile_models, depths) if compile_models and depths else []

  device = jax.devices()[0]
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
  print(
    f"machine: {jax.device_count()} {device.platform} devices ({device.device_kind}) on {os.cpu_count()} CPU "
    f"cores; jax {jax.__version__}; run took {time.perf_counter() - _START:.0f} s"
    + (f"; load average at the end {load:.2f} (1 min)" if load is not None else "")
  )
  note = (
    (
      "fake CPU devices share the host's cores: step time measures the cost of partitioning (collectives, "
      "redundant work), not a speedup"
    )
    if device.platform == "cpu"
    else "real devices"
  )
  if rows:
    print(
      f"\nTrain step (AdamW, float32, {args.batch_per_device} image(s) per device; median of {args.steps} "
      f"steps after warmup). Note: {note}."
    )
    print(scaling_markdown(rows))
  if deep:
    print("\nCompile time of the train step (1 device, batch 1, abstract inputs) against depth:")
    print(depth_markdown(deep))
  if args.out:
    if args.out.suffix == ".json":
      args.out.write_text(json.dumps(dict(scaling=rows, compile_vs_depth=deep, note=note), indent=1))
    else:
      tables = ([scaling_markdown(rows)] if rows else []) + ([depth_markdown(deep)] if deep else [])
      args.out.write_text("\n\n".join(tables) + "\n")


if __name__ == "__main__":
  main()
