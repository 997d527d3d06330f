"""Benchmark loaders on the real files, a tfds array_record directory, and math prompts."""

import fnmatch
import json
import pathlib
import re
import tomllib

import pytest

from polaris_jax.data.benchmarks import (
    R1_MATH_INSTRUCTION,
    benchmark_file,
    benchmark_names,
    build_math_prompt,
    load_benchmark,
)

REPO = pathlib.Path(__file__).resolve().parents[2]
# Row counts from polaris_jax/data/benchmark_files/README.md.
EXPECTED_ROWS = {
    "aime_2024": 30,
    "aime_2025": 30,
    "hmmt_2025": 30,
    "math500": 500,
    "amc23": 40,
    "gsm8k_test": 1319,
    "minerva_math": 272,
    "polaris_aime24": 30,
    "polaris_aime25": 30,
}


@pytest.fixture(scope="module")
def loaded():
    return {name: load_benchmark(name) for name in EXPECTED_ROWS}


def test_every_benchmark_loads_by_name_with_string_fields_and_unique_ids(loaded):
    assert benchmark_names() == sorted(EXPECTED_ROWS)
    for name, rows in loaded.items():
        assert len(rows) == EXPECTED_ROWS[name], name
        assert len({r["id"] for r in rows}) == len(rows), name
        for row in rows:
            assert set(row) == {"id", "problem", "answer"}
            assert all(isinstance(row[k], str) and row[k].strip() for k in row), (name, row["id"])


def test_name_and_path_give_the_same_rows(loaded):
    for name, rows in loaded.items():
        path = benchmark_file(name)
        assert path.name.startswith(name + ".")
        assert load_benchmark(path) == rows, name
        assert load_benchmark(str(path)) == rows, name


def test_unknown_name_lists_the_shipped_benchmarks(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown benchmark 'aime_2099'") as error:
        load_benchmark("aime_2099")
    assert all(name in str(error.value) for name in EXPECTED_ROWS)
    # A path that exists wins over a shipped name.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "math500").mkdir()
    (tmp_path / "math500" / "dataset_info.json").write_text(json.dumps({"splits": [{"name": "a"}, {"name": "b"}]}))
    with pytest.raises(ValueError, match="pass split="):
        load_benchmark("math500")


def test_the_wheel_ships_every_benchmark_file():
    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["polaris_jax"]
    folder = REPO / "polaris_jax" / "data" / "benchmark_files"
    for path in folder.iterdir():
        relative = path.relative_to(REPO / "polaris_jax").as_posix()
        assert any(fnmatch.fnmatch(relative, g) for g in globs), f"{relative} is not in package-data"


# What a fresh clone lacks: the folder beside the repository that the benchmark files came from.
# The patterns are written so that this file does not match them itself.
_SIBLING_FOLDER = re.compile(r"""\.\./shared\b|shared[/]data|["']shared["']\s*/|/\s*["']shared["']""")
_SCANNED_DIRS = ("polaris_jax", "tests", "configs", "colabs", "benchmarks", "experiments")
_SCANNED_SUFFIXES = (".py", ".ipynb", ".md", ".toml", ".sh", ".cfg", ".yaml", ".yml", ".txt")


def sibling_folder_reads(root: pathlib.Path) -> list[str]:
    """`file:line: text` for every line under root's code folders that reaches outside the clone."""
    hits = []
    for folder in _SCANNED_DIRS:
        for path in sorted((root / folder).rglob("*")):
            if path.suffix not in _SCANNED_SUFFIXES or "__pycache__" in path.parts or not path.is_file():
                continue
            for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
                if _SIBLING_FOLDER.search(line):
                    hits.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    return hits


def test_scan_catches_a_read_of_the_sibling_folder(tmp_path):
    (tmp_path / "tests").mkdir()
    folder = "sh" + "ared"  # spelled apart so that this file passes its own scan
    (tmp_path / "tests" / "a.py").write_text(f"DATA = REPO.parent / '{folder}' / 'data'\n")
    (tmp_path / "tests" / "b.py").write_text(f"DATA = '../{folder}/data/math500.jsonl'\n")
    (tmp_path / "tests" / "c.py").write_text("pool = make_pool(shared=True)\n")
    assert [hit.split(":")[0] for hit in sibling_folder_reads(tmp_path)] == ["tests/a.py", "tests/b.py"]


def test_a_fresh_clone_needs_nothing_beside_the_repository():
    assert not sibling_folder_reads(REPO)


def raw_rows(name):
    return [json.loads(line) for line in benchmark_file(name).read_text().splitlines() if line.strip()]


def test_answer_types_are_normalised(loaded):
    aime25 = raw_rows("aime_2025")
    assert isinstance(aime25[0]["answer"], int)
    assert loaded["aime_2025"][0]["answer"] == str(aime25[0]["answer"])
    amc = raw_rows("amc23")
    assert amc[0]["answer"] == 27.0 and loaded["amc23"][0]["answer"] == "27"
    assert loaded["amc23"][15]["answer"] == str(int(amc[15]["answer"]))  # -1.0 -> "-1"


def test_gsm8k_gold_is_the_hash_number_without_separators(loaded):
    raw = raw_rows("gsm8k_test")
    for source, row in zip(raw, loaded["gsm8k_test"]):
        tail = source["answer"].split("####")[-1].strip()
        assert row["answer"] == tail.replace(",", "")
        assert row["problem"] == source["question"].strip()
    assert "1450000" in {r["answer"] for r in loaded["gsm8k_test"]}


def test_minerva_gold_is_the_last_box_of_the_solution(loaded):
    raw = raw_rows("minerva_math")
    assert "answer" not in raw[0]
    assert loaded["minerva_math"][0]["answer"] == "1.6"  # "...=\boxed{1.6} \mathrm{~cm}"


def test_polaris_parquet_matches_the_fathom_jsonl_and_drops_its_instruction(loaded):
    polaris, fathom = loaded["polaris_aime24"], loaded["aime_2024"]
    # same 30 problems in another order; Polaris writes AIME answers as given, e.g. "025"
    assert sorted(int(r["answer"]) for r in polaris) == sorted(int(r["answer"]) for r in fathom)
    assert all("\\boxed{}" not in r["problem"] for r in polaris)
    assert polaris[0]["problem"].endswith("including the $t$ minutes spent in the coffee shop.")


def test_bad_files_raise_errors_naming_the_row(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_benchmark(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"problem": "p", "answer": "1"}) + "\n" + json.dumps({"problem": "q"}) + "\n")
    with pytest.raises(ValueError, match="row 1: no gold answer"):
        load_benchmark(bad)
    dup = tmp_path / "dup.jsonl"
    dup.write_text("".join(json.dumps({"id": 1, "problem": "p", "answer": 2}) + "\n" for _ in range(2)))
    with pytest.raises(ValueError, match="share id"):
        load_benchmark(dup)


def test_tfds_array_record_directory(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")

    class TinyMath(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = tfds.features.FeaturesDict(
                {"id": tfds.features.Text(), "problem": tfds.features.Text(), "answer": tfds.features.Text()}
            )
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {"test": self._generate_examples()}

        def _generate_examples(self):
            for i in range(5):
                yield i, {"id": f"q{i}", "problem": f"What is {i}+{i}?", "answer": str(2 * i)}

    builder = TinyMath(data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare()
    rows = load_benchmark(builder.data_dir)
    assert sorted((r["id"], r["problem"], r["answer"]) for r in rows) == [
        (f"q{i}", f"What is {i}+{i}?", str(2 * i)) for i in range(5)
    ]


def test_r1_template_prompt_opens_the_think_block():
    prompt = build_math_prompt("What is 1+1?", "r1_distill_qwen")
    assert f"What is 1+1?\n{R1_MATH_INSTRUCTION}" in prompt
    assert prompt.endswith("<think>\n")
    assert build_math_prompt("What is 1+1?", "r1_distill_qwen", force_think=True) == prompt


def test_force_think_on_a_template_that_does_not_open_it(qwen3_tok):
    plain = build_math_prompt("What is 1+1?", qwen3_tok)
    assert plain.endswith("<|im_start|>assistant\n")
    assert build_math_prompt("What is 1+1?", qwen3_tok, force_think=True) == plain + "<think>\n"


def test_duck_typed_tokenizer_and_bad_input():
    class Recorder:
        def apply_chat_template(self, messages, add_generation_prompt=True):
            assert add_generation_prompt
            return "|".join(m["content"] for m in messages)

    assert build_math_prompt("2+2?", Recorder(), instruction="Box it.") == "2+2?\nBox it."
    with pytest.raises(TypeError, match="apply_chat_template"):
        build_math_prompt("2+2?", 42)
    with pytest.raises(ValueError, match="non-empty"):
        build_math_prompt("  ", "qwen3")
