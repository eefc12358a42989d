"""benchmarks/models.py end to end on a small model: flags reach the model, results and the trace are written."""

import importlib.util
import json
import pathlib

_PATH = pathlib.Path(__file__).parents[2] / "benchmarks" / "models.py"
_spec = importlib.util.spec_from_file_location("models_benchmark", _PATH)
models_benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(models_benchmark)


def test_attention_flag_reaches_only_models_that_choose_one():
  args = models_benchmark.argparse.Namespace(dtype="bfloat16", attention_impl="xla")
  assert models_benchmark.model_overrides("vit_ti16", args)["attention_impl"] == "xla"
  assert "attention_impl" not in models_benchmark.model_overrides("resnet18", args)
  args.attention_impl = "auto"
  assert "attention_impl" not in models_benchmark.model_overrides("vit_ti16", args)


def test_run_writes_the_table_and_a_profile(tmp_path):
  models_benchmark.main(
    [
      "--models",
      "vit_ti16",
      "--batch",
      "2",
      "--steps",
      "1",
      "--no-torch",
      "--attention-impl",
      "xla",
      "--profile",
      str(tmp_path / "profile"),
      "--out",
      str(tmp_path / "r.json"),
      "--out",
      str(tmp_path / "r.md"),
    ]
  )
  result = json.loads((tmp_path / "r.json").read_text())
  assert result["raw"][0]["attention_impl"] == "xla"
  rows = {r["mode"]: r for r in result["rows"]}
  assert set(rows) == {"infer", "train"} and all(r["img_s"] > 0 for r in rows.values())
  assert rows["train"]["gmacs_estimated"]  # no published MACs for ViT-Ti: XLA's count, marked
  assert "| vit_ti16 | train |" in (tmp_path / "r.md").read_text()
  assert list((tmp_path / "profile" / "vit_ti16").rglob("perfetto_trace.json.gz"))
