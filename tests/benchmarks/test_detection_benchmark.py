"""benchmarks/detection.py end to end at a toy size (its torchvision side needs another environment: the report's
ratios are checked on given numbers)."""

import importlib.util
import json
import pathlib

import pytest

_PATH = pathlib.Path(__file__).parents[2] / "benchmarks" / "detection.py"
_spec = importlib.util.spec_from_file_location("detection_benchmark", _PATH)
detection_benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(detection_benchmark)


def test_run_writes_the_table(tmp_path):
  # Inference and NMS only: the train step is the trainer's own (tests/train), and compiling it here costs 10 s.
  flags = [
    "--sizes",
    "64",
    "--batch",
    "1",
    "--backbone",
    "resnet18",
    "--steps",
    "1",
    "--min-repeats",
    "1",
    "--no-train",
  ]
  detection_benchmark.main(flags + ["--out", str(tmp_path / "r.json"), "--out", str(tmp_path / "r.md")])
  result = json.loads((tmp_path / "r.json").read_text())
  rows = {r["what"]: r for r in result["rows"]}
  assert set(rows) == {"infer 64x64", "nms 5000 -> 300"}
  assert all(r["lvm_jax"] > 0 and r["torchvision"] is None for r in rows.values())
  kept = result["raw"]["lvm_jax"]["nms"]["kept"]
  assert 0 < len(kept) <= detection_benchmark.NMS_KEEP and len(set(kept)) == len(kept)
  assert "| infer 64x64 (img/s) |" in (tmp_path / "r.md").read_text()


def test_ratios_are_lvm_jax_over_torchvision_speed():
  results = {
    "lvm_jax": {"infer_64": {"img_s": 3.0, "compile_s": 1.0}, "nms": {"ms": 2.0}},
    "torchvision": {"infer_64": {"img_s": 2.0}, "nms": {"ms": 8.0}},
  }
  rows = {r["what"]: r for r in detection_benchmark.rows(results, [64])}
  assert rows["infer 64x64"]["ratio"] == 1.5 and rows["nms 5000 -> 300"]["ratio"] == 4.0  # faster: above 1


def test_sizes_must_be_canvases():
  with pytest.raises(SystemExit):
    detection_benchmark.parse_args(["--sizes", "500"])
