"""Model throughput: lvm_jax inference and train-step images/s against the PyTorch reference, same run, same inputs.

  python benchmarks/models.py [--models vit_b16,resnet50,swin_t] [--batch 8] [--dtype float32|bfloat16]
                              [--seconds 10 | --steps N] [--no-torch] [--no-compile] [--compile-train]
                              [--no-train] [--attention-impl auto|xla|cudnn] [--profile DIR]
                              [--out results.md] [--out results.json]

For each model (any registered variant name, built with lvm_jax.create_model(num_classes=1000)):
  infer:  jax.jit(model.apply(..., train=False)) on one fixed batch;
  train:  the trainer's own train step (lvm_jax.train.program.TrainProgram: AdamW, the state created in its
          shardings on a 1-device mesh, jitted with donation):
          forward + backward + optimizer update + BatchNorm statistics.
Compilation (lower().compile()) is timed apart; each measurement then warms up and reports the median time of
repeated calls (each call waited for with block_until_ready), as images/s.

The PyTorch reference is the same architecture in HF transformers on torch, built from the model's own hf_config
(random weights: speed does not depend on them), fed the same images (NCHW): inference in eval mode under
torch.inference_mode, training as forward + cross-entropy + backward + AdamW step; each eager and with torch.compile
(a failure is reported as n/a; the compiled train step only with --compile-train, since on a small CPU host
compiling forward + backward takes minutes a model). bfloat16 runs torch under CPU/GPU autocast and lvm_jax with
dtype=bfloat16 compute (float32 params in both). torch gets as many threads as JAX's CPU backend uses.

Achieved FLOP/s use the published per-image MACs (2 FLOPs a MAC; training counted as 3x the forward); a
variant without a published number falls back to XLA's cost analysis of the compiled inference (marked *).
MFU is achieved FLOP/s over the matmul peak measured in this run (lvm_jax.train.throughput.measured_matmul_peak
on CPU; the published peak on known accelerators). torch's own matmul peak is printed for reference.
"""

import argparse
import contextlib
import gc
import json
import os
import pathlib
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared timing module beside this script

import numpy as np  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import lvm_jax  # noqa: E402
from lvm_jax.data import host_memory  # noqa: E402
from lvm_jax.models import registry  # noqa: E402
from lvm_jax.parallel import create_mesh, partitioning  # noqa: E402
from lvm_jax.parallel.mesh import batch_sharding  # noqa: E402
from lvm_jax.tasks.classification import Classification  # noqa: E402
from lvm_jax.train import throughput  # noqa: E402
from lvm_jax.train.program import TrainProgram  # noqa: E402
from timing import cpu_model, cpu_threads, time_calls  # noqa: E402

# Published forward MACs per image at 224 (ViT paper / timm / Swin paper tables), in GMACs.
PUBLISHED_GMACS = {"vit_b16": 17.58, "resnet50": 4.11, "swin_t": 4.51, "convnext_tiny": 4.47, "efficientnet_b0": 0.39}
TRAIN_FLOPS_FACTOR = 3.0  # forward + backward (~2x forward)
NUM_CLASSES = 1000
PROFILE_STEPS = 3
OPTIMIZER = {
  "name": "adamw",
  "lr": 1e-3,
  "weight_decay": 0.05,
  "schedule": {"warmup_steps": 100, "total_steps": 10_000, "decay": "cosine"},
}


# ------------------------------------------------------------------------------------------------------ timing


# --------------------------------------------------------------------------------------------------- lvm_jax


def model_overrides(name: str, args) -> dict:
  """create_model keywords from the flags: --attention-impl reaches the models that have an attention_impl."""
  overrides = dict(num_classes=NUM_CLASSES, dtype=jnp.dtype(args.dtype))
  if args.attention_impl != "auto" and "attention_impl" in registry.model_fields(type(lvm_jax.create_model(name))):
    overrides["attention_impl"] = args.attention_impl
  return overrides


def jax_benchmarks(name: str, images: np.ndarray, labels: np.ndarray, args) -> dict:
  model = lvm_jax.create_model(name, **model_overrides(name, args))
  batch_size = images.shape[0]
  mesh = create_mesh(devices=jax.devices()[:1])
  strategy = partitioning.get_strategy("dp")
  program = TrainProgram.create(
    task=Classification(NUM_CLASSES),
    model=model,
    optimizer=OPTIMIZER,
    mesh=mesh,
    strategy=strategy,
    input_shape=(1,) + images.shape[1:],
  )
  batch = jax.device_put({"image": images, "label": labels}, batch_sharding(mesh, batch_size))
  timing = dict(seconds=args.seconds, steps=args.steps, min_repeats=args.min_repeats)
  out = {}

  state = program.new_state()
  # Own copies: the train step donates the state's buffers.
  variables = jax.tree.map(jnp.copy, state.variables)
  infer = jax.jit(partitioning.with_sharding_rules(lambda v, x: model.apply(v, x, train=False), mesh, strategy))
  t0 = time.perf_counter()
  infer_c = infer.lower(variables, batch["image"]).compile()
  compile_s = time.perf_counter() - t0
  r = time_calls(lambda: jax.block_until_ready(infer_c(variables, batch["image"])), **timing)
  out["infer"] = dict(
    img_s=batch_size / r["median_s"],
    compile_s=compile_s,
    repeats=r["repeats"],
    xla_flops=throughput.compiled_flops(infer_c),
  )
  variables = infer_c = None  # free the copies before the train step's state is built
  gc.collect()

  if args.train:
    t0 = time.perf_counter()
    train_c = program.train_step().lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    holder = [state]

    def call():
      new_state, metrics = train_c(holder[0], batch)
      holder[0] = new_state
      jax.block_until_ready((new_state, metrics))

    r = time_calls(call, **timing)
    out["train"] = dict(
      img_s=batch_size / r["median_s"],
      compile_s=compile_s,
      repeats=r["repeats"],
      xla_flops=throughput.compiled_flops(train_c),
    )
    if args.profile:
      # A few steps traced after the timing (jax.profiler; the Perfetto JSON sits under plugins/profile/<run>/).
      with jax.profiler.trace(str(args.profile / name), create_perfetto_trace=True):
        for _ in range(PROFILE_STEPS):
          call()
    del holder, train_c
  del state
  gc.collect()
  return out


# ------------------------------------------------------------------------------------------------- PyTorch


def torch_model(name: str):
  """The transformers model for the same network as lvm_jax's `name`, built from its hf_config."""
  import transformers
  from lvm_jax.weights import hf

  model = lvm_jax.create_model(name, num_classes=NUM_CLASSES)
  family = hf._model_type(model)
  converter = hf.FAMILIES[family][0]
  config = dict(converter.hf_config(model))
  config.pop("model_type")
  architecture = config.pop("architectures")[0]
  cls = getattr(transformers, architecture)
  return cls(transformers.AutoConfig.for_model(family, **config, num_labels=NUM_CLASSES))


def torch_benchmarks(name: str, images: np.ndarray, labels: np.ndarray, args) -> dict:
  import torch
  import torch.nn.functional as F

  device = "cuda" if torch.cuda.is_available() and jax.devices()[0].platform == "gpu" else "cpu"
  x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(device)
  y = torch.from_numpy(labels.astype(np.int64)).to(device)
  batch_size = images.shape[0]
  timing = dict(seconds=args.seconds, steps=args.steps, min_repeats=args.min_repeats)
  autocast = (
    (lambda: torch.autocast(device, dtype=torch.bfloat16)) if args.dtype == "bfloat16" else contextlib.nullcontext
  )
  sync = (lambda: torch.cuda.synchronize()) if device == "cuda" else (lambda: None)
  torch.manual_seed(0)
  base = torch_model(name).to(device)
  out = {}
  variants = [("eager", False)] + ([("compile", True)] if args.compile else [])

  def run_infer(module):
    with torch.inference_mode(), autocast():
      module(pixel_values=x).logits.float()
    sync()

  for label, compiled in variants:
    base.eval()
    try:
      module = torch.compile(base) if compiled else base
      t0 = time.perf_counter()
      run_infer(module)  # the first call compiles
      first_s = time.perf_counter() - t0
      r = time_calls(lambda: run_infer(module), **timing)
      out[f"infer_{label}"] = dict(img_s=batch_size / r["median_s"], first_call_s=first_s, repeats=r["repeats"])
    except Exception as e:  # torch.compile can fail (no compiler, unsupported op): report, keep going
      out[f"infer_{label}"] = dict(img_s=None, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    del module
    gc.collect()

  if args.train:
    for label, compiled in variants if args.compile_train else variants[:1]:
      torch.manual_seed(0)
      model = torch_model(name).to(device)  # fresh: training changes the weights
      model.train()
      opt = torch.optim.AdamW(model.parameters(), lr=OPTIMIZER["lr"], weight_decay=OPTIMIZER["weight_decay"])

      def run_train(module):
        opt.zero_grad(set_to_none=True)
        with autocast():
          logits = module(pixel_values=x).logits
        loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        opt.step()
        sync()

      try:
        module = torch.compile(model) if compiled else model
        t0 = time.perf_counter()
        run_train(module)
        first_s = time.perf_counter() - t0
        r = time_calls(lambda: run_train(module), **timing)
        out[f"train_{label}"] = dict(img_s=batch_size / r["median_s"], first_call_s=first_s, repeats=r["repeats"])
      except Exception as e:
        out[f"train_{label}"] = dict(img_s=None, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
      del module, model, opt
      gc.collect()
  del base
  gc.collect()
  if args.compile:
    torch._dynamo.reset()
  return out


def torch_matmul_peak(dtype: str, size: int = 1024, seconds: float = 0.5) -> float:
  import torch

  t = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
  g = torch.Generator().manual_seed(0)
  a, b = torch.randn(size, size, generator=g, dtype=t), torch.randn(size, size, generator=g, dtype=t)
  c = torch.empty(size, size, dtype=t)
  torch.mm(a, b, out=c)
  n, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds or n < 3:
    torch.mm(a, b, out=c)
    n += 1
  return 2.0 * size**3 * n / (time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------- report


def _fmt(value, spec: str, none: str = "n/a") -> str:
  return none if value is None else format(value, spec)


def rows(results: list[dict], peak: float | None) -> list[dict]:
  table = []
  for res in results:
    gmacs, estimated = PUBLISHED_GMACS.get(res["model"]), False
    if gmacs is None and res["jax"]["infer"].get("xla_flops"):
      gmacs, estimated = res["jax"]["infer"]["xla_flops"] / 2 / res["batch"] / 1e9, True
    for mode in ("infer", "train"):
      if mode not in res["jax"]:
        continue
      jx = res["jax"][mode]
      torch_res = res.get("torch", {})
      eager = torch_res.get(f"{mode}_eager", {}).get("img_s")
      compiled = torch_res.get(f"{mode}_compile", {}).get("img_s")
      flops = None if gmacs is None else gmacs * 1e9 * 2 * (TRAIN_FLOPS_FACTOR if mode == "train" else 1.0)
      achieved = None if flops is None else flops * jx["img_s"]
      table.append(
        dict(
          model=res["model"],
          mode=mode,
          batch=res["batch"],
          dtype=res["dtype"],
          img_s=jx["img_s"],
          torch_eager_img_s=eager,
          torch_compile_img_s=compiled,
          ratio_eager=None if not eager else jx["img_s"] / eager,
          ratio_compile=None if not compiled else jx["img_s"] / compiled,
          gflop_s=None if achieved is None else achieved / 1e9,
          gmacs_per_image=gmacs,
          gmacs_estimated=estimated,
          mfu=None if achieved is None or not peak else achieved / peak,
          compile_s=jx["compile_s"],
          torch_compile_first_call_s=torch_res.get(f"{mode}_compile", {}).get("first_call_s"),
          torch_ran={k: f"{mode}_{k}" in torch_res for k in ("eager", "compile")},
          torch_errors={k: v["error"] for k, v in torch_res.items() if k.startswith(mode) and "error" in v},
        )
      )
  return table


HEADER = (
  "model",
  "mode",
  "lvm_jax img/s",
  "torch eager",
  "torch.compile",
  "vs eager",
  "vs compile",
  "GFLOP/s",
  "MFU",
  "compile s",
  "torch.compile 1st call s",
)


def markdown(table: list[dict]) -> str:
  lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
  for r in table:
    gflops = _fmt(r["gflop_s"], ".1f") + ("*" if r["gmacs_estimated"] else "")
    eager = "n/a" if r["torch_ran"]["eager"] else "-"  # n/a: it failed; -: not run
    compiled = "n/a" if r["torch_ran"]["compile"] else "-"
    cells = (
      r["model"],
      r["mode"],
      _fmt(r["img_s"], ".2f"),
      _fmt(r["torch_eager_img_s"], ".2f", eager),
      _fmt(r["torch_compile_img_s"], ".2f", compiled),
      _fmt(r["ratio_eager"], ".2f", eager),
      _fmt(r["ratio_compile"], ".2f", compiled),
      gflops,
      _fmt(r["mfu"], ".1%"),
      _fmt(r["compile_s"], ".1f"),
      _fmt(r["torch_compile_first_call_s"], ".1f", compiled),
    )
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", default="vit_b16,resnet50,swin_t", help="comma-separated registered names")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--seconds", type=float, default=10.0, help="time per measurement (after warmup)")
  parser.add_argument("--steps", type=int, default=None, help="a fixed number of timed calls instead of --seconds")
  parser.add_argument("--min-repeats", type=int, default=2, help="at least this many timed calls (median)")
  parser.add_argument("--no-torch", dest="torch", action="store_false", help="skip the PyTorch reference")
  parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile")
  parser.add_argument(
    "--compile-train",
    action="store_true",
    help="also torch.compile the torch train step (off by default: on CPU it compiles for minutes a model)",
  )
  parser.add_argument(
    "--train",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="also time the train step (--no-train: inference only)",
  )
  parser.add_argument(
    "--attention-impl",
    choices=("auto", "xla", "cudnn"),
    default="auto",
    help="attention kernel of the models that choose one (ViT): auto = cuDNN flash attention on "
    "NVIDIA GPUs in bfloat16, else XLA",
  )
  parser.add_argument(
    "--profile",
    type=pathlib.Path,
    default=None,
    help=f"trace {PROFILE_STEPS} lvm_jax train steps a model into PROFILE/<model> (jax.profiler)",
  )
  parser.add_argument(
    "--out",
    type=pathlib.Path,
    action="append",
    default=[],
    help="write the results (.json, else markdown); may be given more than once",
  )
  args = parser.parse_args(argv)
  host_memory.keep_large_buffers()  # as the trainer does: XLA's CPU buffers reused, not zero-filled every call
  names = [n.strip() for n in args.models.split(",") if n.strip()]
  for name in names:
    lvm_jax.create_model(name)  # unknown names fail now, with suggestions, not after minutes of work

  run_start = time.perf_counter()
  threads = cpu_threads()
  device = jax.devices()[0]
  torch_info = "not run"
  torch_peak = None
  if args.torch:
    import torch

    if device.platform == "cpu":
      torch.set_num_threads(threads)
    torch_info = f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
    torch_peak = torch_matmul_peak(args.dtype) if device.platform == "cpu" else None
  peak = throughput.total_peak_flops(args.dtype, jax.devices()[:1])
  peak_how = "measured matmul" if device.platform == "cpu" else "published"
  peaks = []
  if device.platform == "cpu":
    # In this run, not a cached one; again at the end, keeping the best, so a burst of other load on the host
    # during one short measurement does not deflate the peak (and inflate the MFU).
    peaks.append(throughput.measured_matmul_peak(args.dtype, seconds=1.0))
    peak = peaks[0]

  results = []
  for name in names:
    size = getattr(lvm_jax.create_model(name), "image_size", 224)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((args.batch, size, size, 3), dtype=np.float32)  # already "normalized"
    labels = rng.integers(0, NUM_CLASSES, args.batch).astype(np.int32)
    print(f"[{time.perf_counter() - run_start:6.0f}s] {name}: lvm_jax ...", file=sys.stderr, flush=True)
    res = dict(
      model=name,
      batch=args.batch,
      dtype=args.dtype,
      attention_impl=args.attention_impl,
      jax=jax_benchmarks(name, images, labels, args),
    )
    if args.torch:
      print(f"[{time.perf_counter() - run_start:6.0f}s] {name}: torch ...", file=sys.stderr, flush=True)
      res["torch"] = torch_benchmarks(name, images, labels, args)
    results.append(res)

  if peaks:
    peaks.append(throughput.measured_matmul_peak(args.dtype, seconds=1.0))
    peak = max(peaks)
    peak_how += " (best of start " + ", end ".join(f"{p / 1e9:.1f}" for p in peaks) + " GFLOP/s)"
  table = rows(results, peak)
  load = os.getloadavg() if hasattr(os, "getloadavg") else None
  print(
    f"machine: {device.platform} ({device.device_kind}), {cpu_model()}, {threads} CPU threads; jax {jax.__version__}; "
    f"{torch_info}" + (f"; load average at the end {load[0]:.2f} (1 min)" if load else "")
  )
  print(
    f"batch {args.batch}, {args.dtype}, attention {args.attention_impl}; median of >= {args.min_repeats} calls over "
    f"{args.steps and f'{args.steps} steps' or f'{args.seconds:g} s'} after warmup; "
    f"run took {time.perf_counter() - run_start:.0f} s"
  )
  print(
    f"peak ({peak_how}, {args.dtype}): jax {_fmt(peak and peak / 1e9, '.1f')} GFLOP/s; "
    f"torch matmul {_fmt(torch_peak and torch_peak / 1e9, '.1f')} GFLOP/s"
  )
  print(
    "FLOPs: published MACs x2 per image (train x3)"
    + ("; * = XLA cost analysis (no published number)" if any(r["gmacs_estimated"] for r in table) else "")
  )
  print(markdown(table))
  for r in table:
    for key, error in r["torch_errors"].items():
      print(f"torch {r['model']} {key}: {error}")
  for path in args.out:
    if path.suffix == ".json":
      path.write_text(
        json.dumps(
          dict(peak_flops=peak, torch_peak_flops=torch_peak, threads=threads, rows=table, raw=results),
          indent=1,
          default=str,
        )
      )
    else:
      path.write_text(markdown(table) + "\n")


if __name__ == "__main__":
  main()
