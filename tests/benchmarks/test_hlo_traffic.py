"""benchmarks/hlo_traffic.py: the bytes it counts on a hand-written HLO module, and a real compiled train step."""

import importlib.util
import pathlib

import pytest

_PATH = pathlib.Path(__file__).parents[2] / "benchmarks" / "hlo_traffic.py"
_spec = importlib.util.spec_from_file_location("hlo_traffic", _PATH)
hlo_traffic = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hlo_traffic)

_MODULE = """HloModule m, entry_computation_layout={(f32[4,8]{1,0}, bf16[4,8]{1,0})->f32[4,8]{1,0}}

%fused_computation (param_0: f32[4,8]) -> f32[4,8] {
  %param_0 = f32[4,8]{1,0} parameter(0)
  ROOT %neg = f32[4,8]{1,0} negate(%param_0)
}

%body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %p = (s32[], f32[4,8]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[4,8]{1,0} get-tuple-element(%p), index=1
  %y = f32[4,8]{1,0} fusion(%x), kind=kLoop, calls=%fused_computation, metadata={op_name="jit(f)/transpose(jvp(M))/neg"}
  ROOT %t = (s32[], f32[4,8]{1,0}) tuple(%i, %y)
}

%cond (pc: (s32[], f32[4,8])) -> pred[] {
  %pc = (s32[], f32[4,8]{1,0}) parameter(0)
  %ic = s32[] get-tuple-element(%pc), index=0
  %c = s32[] constant(3)
  ROOT %lt = pred[] compare(%ic, %c), direction=LT
}

ENTRY %main (a: f32[4,8], b: bf16[4,8]) -> f32[4,8] {
  %a = f32[4,8]{1,0} parameter(0)
  %b = bf16[4,8]{1,0} parameter(1)
  %sum = f32[4,8]{1,0} fusion(%a, %b, %a), kind=kLoop, calls=%fused_computation, metadata={op_name="jit(f)/jvp(M)/add"}
  %z = s32[] constant(0)
  %init = (s32[], f32[4,8]{1,0}) tuple(%z, %sum)
  %w = (s32[], f32[4,8]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %out = f32[4,8]{1,0} get-tuple-element(%w), index=1
}
"""


def test_shape_bytes():
  assert hlo_traffic.shape_bytes("f32[8,56,56,256]{3,2,1,0}") == 4 * 8 * 56 * 56 * 256
  assert hlo_traffic.shape_bytes("(s32[], f32[4,8]{1,0}, bf16[3])") == 4 + 128 + 6
  assert hlo_traffic.shape_bytes("token[]") == 0
  assert hlo_traffic.shape_bytes("f32[<=8,4]") == 4 * 8 * 4  # a dynamic dimension at its bound


def test_counts_the_entry_and_its_loops_not_fused_computations():
  rows = {r.name: r for r in hlo_traffic.traffic(hlo_traffic.top_level_instructions(_MODULE))}
  assert set(rows) == {"sum", "y", "lt"}  # parameters, tuples, constants, the fusion's insides: no traffic
  assert (rows["sum"].read, rows["sum"].written) == (128 + 64, 128)  # %a counted once
  assert (rows["sum"].step_pass, rows["sum"].operation) == ("forward", "add")
  # The loop runs 3 times: its body's and condition's bytes count 3 times.
  assert (rows["y"].read, rows["y"].written, rows["y"].step_pass) == (3 * 128, 3 * 128, "backward")
  assert (rows["lt"].read, rows["lt"].written, rows["lt"].step_pass) == (3 * 8, 3 * 1, "other")
  text = hlo_traffic.report("m", list(rows.values()), None, top=5)
  assert text.startswith("m: instructions read 0.00 GB") and "| forward | add | 0.00 | 0.00 | 1 |" in text


def test_real_train_step_agrees_with_xla_cost_analysis():
  compiled = hlo_traffic.compiled_train_step("resnet18", batch=2)
  rows = hlo_traffic.traffic(hlo_traffic.top_level_instructions(compiled.as_text()))
  moved = sum(r.read + r.written for r in rows)
  xla = hlo_traffic.throughput.compiled_cost(compiled, "bytes accessed")
  # The same program counted two ways: within 20% of each other (XLA counts some operands partially).
  assert xla is not None and 0.8 < moved / xla < 1.25, (moved, xla)
  passes = {r.step_pass for r in rows}
  assert passes == {"forward", "backward", "other"}
  # AdamW's update reads resnet18's 11.7 M float32 parameters, their gradients and both moments.
  assert sum(r.read for r in rows if r.step_pass == "other") > 4 * 4 * 11.6e6


def test_an_operand_nobody_defines_is_an_error():
  broken = _MODULE.replace("fusion(%a, %b, %a)", "fusion(%a, %missing)")
  with pytest.raises(ValueError, match="sum reads .*missing"):
    hlo_traffic.traffic(hlo_traffic.top_level_instructions(broken))


_STACKED = """HloModule s, entry_computation_layout={(f32[12,4,8]{2,1,0}, s32[])->f32[12,4,8]{2,1,0}}

%ds_computation (stack: f32[12,4,8], i: s32[]) -> f32[4,8] {
  %stack = f32[12,4,8]{2,1,0} parameter(0)
  %i = s32[] parameter(1)
  %z = s32[] constant(0)
  %slice = f32[1,4,8]{2,1,0} dynamic-slice(%stack, %i, %z, %z), dynamic_slice_sizes={1,4,8}
  ROOT %r = f32[4,8]{1,0} bitcast(%slice)
}

%dus_computation (buf: f32[12,4,8], upd: f32[4,8], j: s32[]) -> f32[12,4,8] {
  %buf = f32[12,4,8]{2,1,0} parameter(0)
  %upd = f32[4,8]{1,0} parameter(1)
  %j = s32[] parameter(2)
  %zz = s32[] constant(0)
  %u3 = f32[1,4,8]{2,1,0} bitcast(%upd)
  ROOT %dus = f32[12,4,8]{2,1,0} dynamic-update-slice(%buf, %u3, %j, %zz, %zz)
}

ENTRY %main (st: f32[12,4,8], k: s32[]) -> f32[12,4,8] {
  %st = f32[12,4,8]{2,1,0} parameter(0)
  %k = s32[] parameter(1)
  %sl = f32[4,8]{1,0} fusion(%st, %k), kind=kLoop, calls=%ds_computation
  ROOT %up = f32[12,4,8]{2,1,0} fusion(%st, %sl, %k), kind=kLoop, calls=%dus_computation
}
"""


def test_dynamic_slices_and_updates_move_only_the_slice():
  rows = {r.name: r for r in hlo_traffic.traffic(hlo_traffic.top_level_instructions(_STACKED))}
  assert (rows["sl"].read, rows["sl"].written) == (128 + 4, 128)  # one [4, 8] layer of the [12, 4, 8] stack
  assert (rows["up"].read, rows["up"].written) == (128 + 4, 128)  # written in place: the buffer is not read
