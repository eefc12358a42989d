"""The README's benchmark block is rewritten between its markers and nowhere else."""

import importlib.util
import pathlib

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "readme_table.py"
_spec = importlib.util.spec_from_file_location("readme_table", _PATH)
readme_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(readme_table)


def test_replace_block_rewrites_only_between_the_markers():
  readme = f"intro\n{readme_table.START}\nold figures\n{readme_table.END}\nafter\n"
  out = readme_table.replace_block(readme, "new figures")
  assert out == f"intro\n{readme_table.START}\nnew figures\n{readme_table.END}\nafter\n"
  assert readme_table.replace_block(out, "newer").count("new figures") == 0
  with pytest.raises(SystemExit, match="add the markers"):
    readme_table.replace_block("no markers here", "x")


def test_printed_lines_become_bullets_and_tables_stay_tables():
  printed = "machine: 2 cores\n| a | b |\n|---|---|\n| 1 | 2 |\ndecode only     2500 img/s\n"
  assert readme_table.as_markdown(printed) == (
      "- machine: 2 cores\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n- `decode only     2500 img/s`")


def test_only_the_sections_run_are_replaced():
  titles = [title for title, _ in readme_table.BENCHMARKS.values()]
  block = f"\n#### {titles[0]}\n\nold input figures\n\n#### {titles[1]}\n\nold model figures\n"
  merged = readme_table.merge_sections(block, {titles[0]: f"#### {titles[0]}\n\nnew input figures\n"})
  assert merged == f"#### {titles[0]}\n\nnew input figures\n\n#### {titles[1]}\n\nold model figures"
  added = readme_table.merge_sections(block, {titles[2]: f"#### {titles[2]}\n\nscaling figures\n"})
  assert added.index("old model figures") < added.index("scaling figures")  # in BENCHMARKS order
  assert "old input figures" in added


def test_cpu_name_names_the_vector_unit():
  cpuinfo = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
             "model name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f avx512bw\n\nprocessor\t: 1\nmodel name\t: other\n")
  assert readme_table.cpu_name(cpuinfo) == "AMD EPYC, family 26 model 2, AVX-512"
  assert readme_table.cpu_name(cpuinfo.replace(" avx512f avx512bw", "")) == "AMD EPYC, family 26 model 2, AVX2"
