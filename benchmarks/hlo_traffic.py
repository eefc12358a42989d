"""Memory traffic of the compiled train step, read from its optimised HLO: where a memory-bound step goes.

  python benchmarks/hlo_traffic.py [--models resnet50,vit_b16,swin_t] [--batch 8] [--top 15]

On a CPU whose matrix units outrun its memory (2 cores of an AVX-512 EPYC: ~475 GFLOP/s of float32 matmul
against ~14 GB/s), a train step's elementwise passes cost as much as its matrix products, and XLA decides how
many there are: each top-level instruction of the compiled program (a fusion, a library call, a copy) reads its
operands and writes its result once. This sums those bytes over the entry computation, the computations it
calls and the bodies of its loops (times their known trip counts), and prints the totals beside XLA's own cost
analysis ("bytes accessed"), the bytes by pass and operation (the last name in the op's JAX path), and the
instructions that read most, with how many large (> 1 MiB) operands each reads: an elementwise fusion reading
several large operands to write one result is recomputing a chain of cheap ops from its inputs. The passes:
"forward" (under jvp, the loss included), "backward" (its transpose), "other" (input cast and one-hot, the
optimizer update, metrics, and copies XLA adds without a JAX op). Dynamic slices and in-place dynamic updates
(a scanned model's stacked layers) move only their slice. XLA's cost analysis counts a loop's body once, so
for `scan_layers` models the two totals differ; without loops they agree within ~1%. The branches of a
conditional are not entered (its operands and result are counted). The step is the trainer's, as
benchmarks/scaling.py builds it, compiled from abstract inputs: nothing is allocated or run.
"""

import argparse
import collections
import dataclasses
import os
import re

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import jax  # noqa: E402

import lvm_jax  # noqa: E402
from lvm_jax.parallel import create_mesh, partitioning  # noqa: E402
from lvm_jax.tasks.classification import Classification  # noqa: E402
from lvm_jax.train import throughput  # noqa: E402
from lvm_jax.train.program import TrainProgram  # noqa: E402

NUM_CLASSES = 1000
OPTIMIZER = {
  "name": "adamw",
  "lr": 1e-3,
  "weight_decay": 0.05,
  "schedule": {"warmup_steps": 100, "total_steps": 10_000, "decay": "cosine"},
}

_DTYPE_BYTES = {
  "pred": 1,
  "s8": 1,
  "u8": 1,
  "s16": 2,
  "u16": 2,
  "f16": 2,
  "bf16": 2,
  "s32": 4,
  "u32": 4,
  "f32": 4,
  "s64": 8,
  "u64": 8,
  "f64": 8,
  "c64": 8,
  "c128": 16,
}
# Instructions that name or regroup buffers without reading them.
_NO_TRAFFIC = {
  "parameter",
  "get-tuple-element",
  "tuple",
  "bitcast",
  "constant",
  "after-all",
  "while",
  "call",
  "opt-barrier",
  "add-dependency",
  "domain",
}
LARGE_BYTES = 1 << 20


@dataclasses.dataclass
class Instruction:
  name: str
  opcode: str
  out_bytes: int
  operands: list[str]
  op_name: str
  is_root: bool = False
  parameter_number: int | None = None
  runs: int = 1  # times the instruction runs a step: the trip counts of the loops around it
  fused: list["Instruction"] | None = None  # a fusion's computation


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape: "f32[8,56,56,256]{3,2,1,0}", a tuple of them, "token[]" (0). Types of under a
  byte (s4, f8...) count one byte an element."""
  total = 0
  for dtype, dims in re.findall(r"(\w+)\[([\d,<=]*)\]", shape):
    if dtype == "token":
      continue
    # A dynamic dimension "<=8" counts at its bound.
    sizes = [int(d.removeprefix("<=")) for d in dims.split(",") if d]
    total += _DTYPE_BYTES.get(dtype, 1) * int(np.prod(sizes, dtype=np.int64))
  return total


def _balanced(text: str, start: int) -> int:
  """Index just past the parenthesis that closes the one at text[start]."""
  depth = 0
  for i in range(start, len(text)):
    depth += {"(": 1, ")": -1}.get(text[i], 0)
    if depth == 0:
      return i + 1
  raise ValueError(f"unbalanced parentheses in HLO line: {text[:200]}")


def parse_instruction(line: str) -> Instruction | None:
  match = re.match(r"\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*", line)
  if not match:
    return None
  rest = line[match.end() :]
  shape_end = _balanced(rest, 0) if rest.startswith("(") else rest.index(" ")
  shape, rest = rest[:shape_end], rest[shape_end:].lstrip()
  opcode = rest[: rest.index("(")]
  operands = rest[len(opcode) : _balanced(rest, len(opcode))]
  op_name = re.search(r'op_name="([^"]*)"', rest)
  number = re.fullmatch(r"\((\d+)\)", operands) if opcode == "parameter" else None
  return Instruction(
    match.group(2),
    opcode,
    shape_bytes(shape),
    re.findall(r"%([\w.\-]+)", operands),
    op_name.group(1) if op_name else "",
    is_root=bool(match.group(1)),
    parameter_number=int(number.group(1)) if number else None,
  )


def computations(hlo: str) -> tuple[str, dict[str, list[str]]]:
  """(the entry computation's name, {computation name: its instruction lines})."""
  comps, entry, current = {}, None, None
  for line in hlo.splitlines():
    header = re.match(r"(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
    if header and not line.startswith(" "):
      current = header.group(2)
      comps[current] = []
      entry = current if header.group(1) else entry
    elif line.startswith("}"):
      current = None
    elif current is not None and line.strip():
      comps[current].append(line)
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  return entry, comps


def top_level_instructions(hlo: str) -> list[Instruction]:
  """The entry computation's instructions and, recursively, those of the computations it calls and the loops
  it runs (body and condition), each with the number of times it runs: the product of the enclosing loops'
  known trip counts (XLA's backend_config "known_trip_count"; 1 where unknown)."""
  entry, comps = computations(hlo)
  out, pending, seen = [], [(entry, 1)], set()
  while pending:
    name, runs = pending.pop()
    if name in seen:
      continue
    seen.add(name)
    for line in comps[name]:
      instruction = parse_instruction(line)
      if instruction is None:
        continue
      instruction.runs = runs
      out.append(instruction)
      if instruction.opcode == "while":
        trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
        inner = runs * (int(trips.group(1)) if trips else 1)
        pending += [(c, inner) for c in re.findall(r"(?:body|condition)=%?([\w.\-]+)", line)]
      elif instruction.opcode == "call":
        pending += [(c, runs) for c in re.findall(r"to_apply=%?([\w.\-]+)", line)]
      elif instruction.opcode == "fusion":
        called = re.search(r"calls=%?([\w.\-]+)", line)
        if called:
          instruction.fused = [f for f in map(parse_instruction, comps[called.group(1)]) if f is not None]
  return out


@dataclasses.dataclass
class Traffic:
  name: str
  read: int
  written: int
  large_operands: int
  step_pass: str
  operation: str
  op_name: str


def traffic(instructions: list[Instruction]) -> list[Traffic]:
  """Bytes each instruction reads (its distinct operands) and writes (its result) a step, times its runs."""
  sizes = {i.name: i.out_bytes for i in instructions}
  rows = []
  for i in instructions:
    if i.opcode in _NO_TRAFFIC:
      continue
    unknown = [o for o in i.operands if o not in sizes]
    if unknown:
      raise ValueError(f"instruction {i.name} reads {unknown}, which no parsed instruction defines")
    reads, written = _bytes_moved(i, [sizes[o] for o in i.operands])
    operand_bytes = [reads[i.operands.index(o)] for o in dict.fromkeys(i.operands)]
    step_pass = "backward" if "transpose(jvp(" in i.op_name else "forward" if "jvp(" in i.op_name else "other"
    operation = re.sub(r"\[.*", "", i.op_name.rsplit("/", 1)[-1]) if i.op_name else i.opcode
    rows.append(
      Traffic(
        i.name,
        i.runs * sum(operand_bytes),
        i.runs * written,
        sum(b > LARGE_BYTES for b in operand_bytes),
        step_pass,
        operation,
        i.op_name,
      )
    )
  return rows


def _bytes_moved(i: Instruction, operand_sizes: list[int]) -> tuple[list[int], int]:
  """(bytes read from each operand, bytes written). A dynamic slice reads only its slice of the operand and a
  dynamic update writes only the update, in place, also inside fusions: a scanned model's loop body slices its
  layer's parameters out of the stacked ones and writes its activations into stacked buffers."""
  reads, written = list(operand_sizes), i.out_bytes
  if i.opcode == "dynamic-slice":
    reads[0] = i.out_bytes
  elif i.opcode == "dynamic-update-slice":
    reads[0], written = 0, operand_sizes[1]
  elif i.fused:
    inner = {f.name: f for f in i.fused}
    users = collections.defaultdict(list)
    for f in i.fused:
      for position, operand in enumerate(f.operands):
        users[operand].append((f, position))
    for f in i.fused:
      uses = users[f.name]
      if f.parameter_number is None or f.parameter_number >= len(reads) or not uses:
        continue
      if all(u.opcode == "dynamic-slice" and position == 0 for u, position in uses):
        reads[f.parameter_number] = sum(u.out_bytes for u, _ in uses)
      elif all(u.opcode == "dynamic-update-slice" and position == 0 for u, position in uses):
        reads[f.parameter_number] = 0
    root = next(f for f in i.fused if f.is_root)
    outputs = [inner[o] for o in root.operands] if root.opcode == "tuple" else [root]
    if all(o.opcode == "dynamic-update-slice" for o in outputs):
      written = sum(inner[o.operands[1]].out_bytes for o in outputs)
  return reads, written


def report(name: str, rows: list[Traffic], xla_bytes: float | None, top: int) -> str:
  read, written = sum(r.read for r in rows), sum(r.written for r in rows)
  xla = f"{xla_bytes / 1e9:.2f} GB" if xla_bytes is not None else "n/a"
  lines = [
    f"{name}: instructions read {read / 1e9:.2f} GB and write {written / 1e9:.2f} GB a step "
    f"(XLA's cost analysis: {xla} accessed); {len(rows)} instructions",
    "",
    "| pass | operation | read GB | written GB | instructions |",
    "|---|---|---|---|---|",
  ]
  groups = collections.defaultdict(lambda: [0, 0, 0])
  for r in rows:
    group = groups[(r.step_pass, r.operation)]
    group[0] += r.read
    group[1] += r.written
    group[2] += 1
  for (step_pass, operation), (r_, w_, n) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]:
    lines.append(f"| {step_pass} | {operation} | {r_ / 1e9:.2f} | {w_ / 1e9:.2f} | {n} |")
  lines += ["", "| read MB | written MB | large operands | instruction | op |", "|---|---|---|---|---|"]
  for r in sorted(rows, key=lambda r: -r.read)[:top]:
    op = r.op_name.replace("jit(train_step)/", "")
    lines.append(f"| {r.read / 1e6:.1f} | {r.written / 1e6:.1f} | {r.large_operands} | {r.name} | {op} |")
  return "\n".join(lines)


def compiled_train_step(name: str, batch: int):
  """The trainer's step (lvm_jax.train.program) for `name` at its own image size on one device, compiled from
  abstract inputs: nothing is allocated."""
  model = lvm_jax.create_model(name, num_classes=NUM_CLASSES)
  size = getattr(model, "image_size", 224)
  mesh = create_mesh(devices=jax.devices()[:1])
  program = TrainProgram.create(
    task=Classification(NUM_CLASSES),
    model=model,
    optimizer=OPTIMIZER,
    mesh=mesh,
    strategy=partitioning.get_strategy("dp"),
    input_shape=(1, size, size, 3),
  )
  sharding = program.batch_sharding
  batch = {
    "image": jax.ShapeDtypeStruct((batch, size, size, 3), np.float32, sharding=sharding),
    "label": jax.ShapeDtypeStruct((batch,), np.int32, sharding=sharding),
  }
  return program.train_step().lower(program.abstract_state, batch).compile()


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", default="resnet50,vit_b16,swin_t", help="comma-separated registered names")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--top", type=int, default=15, help="rows in each table")
  args = parser.parse_args(argv)
  for name in [n.strip() for n in args.models.split(",") if n.strip()]:
    compiled = compiled_train_step(name, args.batch)
    rows = traffic(top_level_instructions(compiled.as_text()))
    print(
      report(
        f"{name} train step, batch {args.batch}", rows, throughput.compiled_cost(compiled, "bytes accessed"), args.top
      )
    )
    print()


if __name__ == "__main__":
  main()
