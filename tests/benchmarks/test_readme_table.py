"""The benchmark results file is generated whole: fresh sections replace theirs, the rest stay as they are."""

import importlib.util
import pathlib

_ROOT = pathlib.Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("readme_table", _ROOT / "benchmarks" / "readme_table.py")
readme_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(readme_table)

AMD_CPUINFO = (
  "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
  "model name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f avx512bw\n\nprocessor\t: 1\nmodel name\t: other\n"
)


def test_the_results_file_is_what_the_generator_writes():
  """docs/results.md is a fixed point of the generator: regenerating no section leaves it unchanged."""
  results = readme_table.RESULTS.read_text()
  assert results.startswith(readme_table.HEADER + "\n")
  assert readme_table.render(readme_table.merge_sections(readme_table.current_sections(results), {})) == results
  for title, _, _ in readme_table.BENCHMARKS.values():
    assert f"\n{readme_table.SECTION}{title}\n" in results


def test_a_new_file_gets_the_header_and_the_cpu_caveat():
  text = readme_table.render(readme_table.merge_sections(readme_table.current_sections(""), {}))
  assert text.startswith(readme_table.HEADER + "\n# Benchmark results\n")
  assert "ratios against PyTorch depend on it" in text.replace("\n", " ")
  assert readme_table.current_sections(text) == ""


def test_printed_lines_become_bullets_and_tables_stay_tables():
  printed = "machine: 2 cores\n| a | b |\n|---|---|\n| 1 | 2 |\ndecode only     2500 img/s\n"
  assert readme_table.as_markdown(printed) == (
    "- machine: 2 cores\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n- `decode only     2500 img/s`"
  )


def test_a_section_says_what_its_table_means_where_and_how():
  text = readme_table.section("input", "| a |\n|---|\n| 1 |\n", "Measured today on 2 CPU cores.")
  title, meaning, _ = readme_table.BENCHMARKS["input"]
  assert text.startswith(f"{readme_table.SECTION}{title}\n\n")
  assert meaning.split()[:4] == text.split("\n\n")[1].split()[:4]
  assert "Measured today on 2 CPU cores.\n\n`python benchmarks/input_pipeline.py --images 600`\n\n| a |" in text


def test_only_the_sections_run_are_replaced_and_others_kept():
  s = readme_table.SECTION
  titles = [title for title, _, _ in readme_table.BENCHMARKS.values()]
  block = (
    f"\n{s}On one GPU\n\ngpu figures\n\n{s}{titles[0]}\n\nold input figures\n\n{s}{titles[1]}\n\nold model figures\n"
  )
  merged = readme_table.merge_sections(block, {titles[0]: f"{s}{titles[0]}\n\nnew input figures\n"})
  assert merged == (
    f"{s}{titles[0]}\n\nnew input figures\n\n{s}{titles[1]}\n\nold model figures\n\n{s}On one GPU\n\ngpu figures"
  )
  added = readme_table.merge_sections(block, {titles[2]: f"{s}{titles[2]}\n\nscaling figures\n"})
  assert added.index("old model figures") < added.index("scaling figures") < added.index("gpu figures")
  assert "old input figures" in added


def test_sections_survive_a_rewrite_of_the_whole_file():
  s = readme_table.SECTION
  title = readme_table.BENCHMARKS["models"][0]
  first = readme_table.render(readme_table.merge_sections("", {title: f"{s}{title}\n\nmodel figures\n"}))
  again = readme_table.render(readme_table.merge_sections(readme_table.current_sections(first), {}))
  assert again == first and first.count("model figures") == 1


def test_cpu_name_names_the_microarchitecture_and_the_vector_unit():
  assert readme_table.cpu_name(AMD_CPUINFO) == "AMD EPYC, Zen 5 (family 26 model 2), AVX-512"
  assert readme_table.cpu_name(AMD_CPUINFO.replace(" avx512f avx512bw", "")) == (
    "AMD EPYC, Zen 5 (family 26 model 2), AVX2"
  )
  zen4 = AMD_CPUINFO.replace("cpu family\t: 26\nmodel\t\t: 2\n", "cpu family\t: 25\nmodel\t\t: 17\n")
  assert readme_table.cpu_name(zen4) == "AMD EPYC, Zen 4 (family 25 model 17), AVX-512"
  intel = AMD_CPUINFO.replace("AuthenticAMD", "GenuineIntel").replace(
    "cpu family\t: 26\nmodel\t\t: 2\n", "cpu family\t: 6\nmodel\t\t: 143\n"
  )
  assert readme_table.cpu_name(intel) == "AMD EPYC, family 6 model 143, AVX-512"  # Intel: no guess


def test_microarchitecture_from_amd_family_and_model():
  arch = readme_table.microarchitecture
  assert arch("AuthenticAMD", 25, 0x01) == "Zen 3"  # Milan
  assert arch("AuthenticAMD", 25, 0x21) == "Zen 3"  # Vermeer
  assert arch("AuthenticAMD", 25, 0x11) == "Zen 4"  # Genoa
  assert arch("AuthenticAMD", 25, 0x61) == "Zen 4"  # Raphael
  assert arch("AuthenticAMD", 25, 0xA0) == "Zen 4"  # Bergamo
  assert arch("AuthenticAMD", 26, 0x02) == "Zen 5"  # Turin
  assert arch("AuthenticAMD", 26, 0x50) is None  # not Zen 5: no guess
  assert arch("AuthenticAMD", 23, 0x31) == "Zen 2"  # Rome
  assert arch("AuthenticAMD", 27, 0x00) is None
  assert arch("GenuineIntel", 6, 0x8F) is None
