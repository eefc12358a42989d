"""Memory traffic of the compiled train step, read from its optimised HLO: where a memory-bound step goes.

  python benchmarks/hlo_traffic.py [--models resnet50,vit_b16,swin_t] [--batch 8] [--top 15]

On a CPU whose matrix units outrun its memory (2 cores: 200-475 GFLOP/s of float32 matmul against ~14 GB/s),
a train step's elementwise passes cost as much as its matrix products, and XLA decides how many there are: each
top-level instruction of the compiled program (a fusion, a library call, a copy) reads its operands and writes
its result once. This sums those bytes over the entry computation and the bodies of its loops, and prints
the totals beside XLA's own cost analysis ("bytes accessed"), the bytes by pass (forward, backward, the rest:
loss, optimizer) and operation (the last name in the op's JAX path), and the instructions that read most, with
how many large (> 1 MB) operands each reads: an elementwise fusion reading several large operands to write one
result is recomputing a chain of cheap ops from its inputs. The step is compiled, not run.
"""

import argparse
import collections
import dataclasses
import importlib.util
import os
import pathlib
import re

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import lvm_jax  # noqa: E402
from lvm_jax.train import throughput  # noqa: E402

# benchmarks/models.py, loaded by path (benchmarks/ is not a package): the train step it times.
_spec = importlib.util.spec_from_file_location("models_benchmark", pathlib.Path(__file__).with_name("models.py"))
model_benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(model_benchmark)

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
# Instructions that name or regroup buffers without reading them.
_NO_TRAFFIC = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all", "while"}
LARGE_BYTES = 1 << 20


@dataclasses.dataclass
class Instruction:
  name: str
  opcode: str
  out_bytes: int
  operands: list[str]
  op_name: str


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape: "f32[8,56,56,256]{3,2,1,0}", a tuple of them, "token[]" (0). Types of under a
  byte (s4, f8...) count one byte an element."""
  total = 0
  for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", shape):
    if dtype == "token":
      continue
    total += _DTYPE_BYTES.get(dtype, 1) * int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64))
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
  match = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*", line)
  if not match:
    return None
  rest = line[match.end():]
  shape_end = _balanced(rest, 0) if rest.startswith("(") else rest.index(" ")
  shape, rest = rest[:shape_end], rest[shape_end:].lstrip()
  opcode = rest[:rest.index("(")]
  operands = rest[len(opcode):_balanced(rest, len(opcode))]
  op_name = re.search(r'op_name="([^"]*)"', rest)
  return Instruction(match.group(1), opcode, shape_bytes(shape), re.findall(r"%([\w.\-]+)", operands),
                     op_name.group(1) if op_name else "")


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
  """The entry computation's instructions and, recursively, those of the loops it runs (bodies and
  conditions, counted once: a loop's trip count is not in the text)."""
  entry, comps = computations(hlo)
  out, pending, seen = [], [entry], set()
  while pending:
    name = pending.pop()
    if name in seen:
      continue
    seen.add(name)
    for line in comps[name]:
      instruction = parse_instruction(line)
      if instruction is None:
        continue
      out.append(instruction)
      if instruction.opcode == "while":
        pending += re.findall(r"(?:body|condition)=%?([\w.\-]+)", line)
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
  """Bytes each instruction reads (its distinct operands) and writes (its result)."""
  sizes = {i.name: i.out_bytes for i in instructions}
  rows = []
  for i in instructions:
    if i.opcode in _NO_TRAFFIC:
      continue
    operand_bytes = [sizes.get(o, 0) for o in dict.fromkeys(i.operands)]
    step_pass = "backward" if "transpose(jvp(" in i.op_name else "forward" if "jvp(" in i.op_name else "other"
    operation = re.sub(r"\[.*", "", i.op_name.rsplit("/", 1)[-1]) if i.op_name else i.opcode
    rows.append(Traffic(i.name, sum(operand_bytes), i.out_bytes, sum(b > LARGE_BYTES for b in operand_bytes),
                        step_pass, operation, i.op_name))
  return rows


def report(name: str, rows: list[Traffic], xla_bytes: float | None, top: int) -> str:
  read, written = sum(r.read for r in rows), sum(r.written for r in rows)
  xla = f"{xla_bytes / 1e9:.2f} GB" if xla_bytes is not None else "n/a"
  lines = [f"{name}: instructions read {read / 1e9:.2f} GB and write {written / 1e9:.2f} GB a step "
           f"(XLA's cost analysis: {xla} accessed); {len(rows)} instructions", "",
           "| pass | operation | read GB | written GB | instructions |", "|---|---|---|---|---|"]
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


def compiled_train_step(name: str, batch: int, image_size: int = 224):
  model = lvm_jax.create_model(name, num_classes=model_benchmark.NUM_CLASSES)
  rng = np.random.default_rng(0)
  images = rng.standard_normal((batch, image_size, image_size, 3), dtype=np.float32)
  labels = rng.integers(0, model_benchmark.NUM_CLASSES, batch)
  train, state, device_batch, _, _ = model_benchmark.train_setup(model, images, labels)
  return train.lower(state, device_batch).compile()


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", default="resnet50,vit_b16,swin_t", help="comma-separated registered names")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--image-size", type=int, default=224)
  parser.add_argument("--top", type=int, default=15, help="rows in each table")
  args = parser.parse_args(argv)
  for name in [n.strip() for n in args.models.split(",") if n.strip()]:
    compiled = compiled_train_step(name, args.batch, args.image_size)
    rows = traffic(top_level_instructions(compiled.as_text()))
    print(report(f"{name} train step, batch {args.batch}", rows, throughput.compiled_cost(compiled, "bytes accessed"), args.top))
    print()


if __name__ == "__main__":
  main()
