"""Benchmark loaders on the real files, a tfds array_record directory, and math prompts."""

import json
import pathlib

import pytest

from polaris_jax.data.benchmarks import R1_MATH_INSTRUCTION, build_math_prompt, load_benchmark

DATA_DIR = pathlib.Path(__file__).resolve().parents[3] / "shared" / "data"
# Row counts from shared/data/README.md.
EXPECTED_ROWS = {
    "aime_2024.jsonl": 30, "aime_2025.jsonl": 30, "amc23.jsonl": 40, "gsm8k_test.jsonl": 1319,
    "hmmt_2025.jsonl": 30, "math500.jsonl": 500, "minerva_math.jsonl": 272,
    "polaris_aime24.parquet": 30, "polaris_aime25.parquet": 30,
}


@pytest.fixture(scope="module")
def loaded():
    return {name: load_benchmark(DATA_DIR / name) for name in EXPECTED_ROWS}


def test_every_file_loads_with_string_fields_and_unique_ids(loaded):
    assert sorted(p.name for p in DATA_DIR.iterdir() if p.suffix in (".jsonl", ".parquet")) == sorted(EXPECTED_ROWS)
    for name, rows in loaded.items():
        assert len(rows) == EXPECTED_ROWS[name], name
        assert len({r["id"] for r in rows}) == len(rows), name
        for row in rows:
            assert set(row) == {"id", "problem", "answer"}
            assert all(isinstance(row[k], str) and row[k].strip() for k in row), (name, row["id"])


def raw_rows(name):
    return [json.loads(line) for line in (DATA_DIR / name).read_text().splitlines() if line.strip()]


def test_answer_types_are_normalised(loaded):
    aime25 = raw_rows("aime_2025.jsonl")
    assert isinstance(aime25[0]["answer"], int)
    assert loaded["aime_2025.jsonl"][0]["answer"] == str(aime25[0]["answer"])
    amc = raw_rows("amc23.jsonl")
    assert amc[0]["answer"] == 27.0 and loaded["amc23.jsonl"][0]["answer"] == "27"
    assert loaded["amc23.jsonl"][15]["answer"] == str(int(amc[15]["answer"]))  # -1.0 -> "-1"


def test_gsm8k_gold_is_the_hash_number_without_separators(loaded):
    raw = raw_rows("gsm8k_test.jsonl")
    for source, row in zip(raw, loaded["gsm8k_test.jsonl"]):
        tail = source["answer"].split("####")[-1].strip()
        assert row["answer"] == tail.replace(",", "")
        assert row["problem"] == source["question"].strip()
    assert "1450000" in {r["answer"] for r in loaded["gsm8k_test.jsonl"]}


def test_minerva_gold_is_the_last_box_of_the_solution(loaded):
    raw = raw_rows("minerva_math.jsonl")
    assert "answer" not in raw[0]
    assert loaded["minerva_math.jsonl"][0]["answer"] == "1.6"  # "...=\boxed{1.6} \mathrm{~cm}"


def test_polaris_parquet_matches_the_fathom_jsonl_and_drops_its_instruction(loaded):
    polaris, fathom = loaded["polaris_aime24.parquet"], loaded["aime_2024.jsonl"]
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
