"""Reading chat SFT rows from jsonl, parquet and a tfds array_record data source."""

import json

import numpy as np
import pytest

from polaris_jax.data import sources

ROWS = [
    {"prompt": "What is 1+1?", "response": "<think>\n1+1=2\n</think>\n\n2", "difficulty": 0.5},
    {
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "3*3?"},
            {"role": "assistant", "content": "9"},
        ],
        "difficulty": 2.0,
    },
    {"prompt": "unanswered", "difficulty": 1.0},
]
EXPECTED = [
    {
        "messages": [
            {"role": "user", "content": "What is 1+1?"},
            {"role": "assistant", "content": "<think>\n1+1=2\n</think>\n\n2"},
        ],
        "difficulty": 0.5,
    },
    {"messages": ROWS[1]["messages"], "difficulty": 2.0},
    {"messages": [{"role": "user", "content": "unanswered"}], "difficulty": 1.0},
]


def write_jsonl(path, rows, raw_lines=()):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        for line in raw_lines:
            f.write(line + "\n")
    return path


def parsed_rows(src):
    parsed = sources.ParsedSource(src)
    return [parsed[i] for i in range(len(parsed))]


def test_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    with open(path, "w") as f:
        f.write(json.dumps(ROWS[0]) + "\n\n   \n" + json.dumps(ROWS[1]) + "\n" + json.dumps(ROWS[2]))  # blank lines
    src = sources.open_source(str(path))
    assert len(src) == 3
    assert parsed_rows(src) == EXPECTED


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "d.parquet"
    table = pa.Table.from_pylist(
        [
            {
                "prompt": r.get("prompt"),
                "response": r.get("response"),
                "messages": r.get("messages"),
                "difficulty": r["difficulty"],
            }
            for r in ROWS
        ]
    )
    pq.write_table(table, path)
    src = sources.open_source(str(path))
    assert parsed_rows(src) == EXPECTED


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    tfds = pytest.importorskip("tensorflow_datasets")

    class TinyChatSft(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = tfds.features.FeaturesDict(
                {
                    "messages": tfds.features.Sequence({"role": tfds.features.Text(), "content": tfds.features.Text()}),
                    "difficulty": np.float32,
                }
            )
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, row in enumerate(EXPECTED):
                yield i, {"messages": row["messages"], "difficulty": row["difficulty"]}

    root = tmp_path_factory.mktemp("tfds")
    builder = TinyChatSft(data_dir=str(root), file_format="array_record")
    builder.download_and_prepare()
    return builder.data_dir


def test_tfds_data_source(tfds_dir):
    src = sources.open_source(str(tfds_dir))
    assert len(src) == 3
    got = sorted(parsed_rows(src), key=lambda r: r["difficulty"])
    assert got == sorted(EXPECTED, key=lambda r: r["difficulty"])


def test_concat_names_original_source(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", ROWS)
    b = write_jsonl(tmp_path / "b.jsonl", ROWS[:1], raw_lines=["[1, 2]"])
    parsed = sources.ParsedSource(sources.open_sources([str(a), str(b)]))
    assert len(parsed) == 5
    assert parsed[3] == EXPECTED[0]
    with pytest.raises(sources.MalformedRowError, match=r"b\.jsonl: row 1: line 2 is a JSON list"):
        parsed[4]


@pytest.mark.parametrize(
    "line, reason",
    [
        ('{"prompt": "x", ', "row 1: line 2 is not valid JSON"),
        ('"just a string"', "row 1: line 2 is a JSON str, not an object"),
        ('{"question": "x"}', "row 1: row has neither 'messages' nor 'prompt'"),
        ('{"messages": [{"content": "x"}]}', "row 1: message 0 needs 'role' and 'content'"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "row 1: message 0 has unknown role 'robot'"),
        ('{"messages": [{"role": "user", "content": 5}]}', "row 1: message 0 content must be a string"),
        ('{"messages": "hello"}', "row 1: 'messages' must be a list"),
        ('{"prompt": "x", "response": ["a"]}', "row 1: 'response' must be a string"),
        ('{"prompt": "x", "difficulty": "hard"}', "row 1: difficulty 'hard' is not a number"),
        ('{"prompt": "x", "difficulty": NaN}', "row 1: difficulty nan is not finite"),
    ],
)
def test_malformed_rows_name_the_row(tmp_path, line, reason):
    path = write_jsonl(tmp_path / "bad.jsonl", ROWS[:1], raw_lines=[line])
    parsed = sources.ParsedSource(sources.open_source(str(path)))
    assert parsed[0] == EXPECTED[0]
    with pytest.raises(sources.MalformedRowError) as info:
        parsed[1]
    assert reason in str(info.value)
    assert info.value.row == 1


def test_named_difficulty_levels_and_system_prompt():
    row = {"prompt": "p", "response": "r", "level": "medium"}
    out = sources.parse_row(
        row, difficulty_key="level", difficulty_levels=("easy", "medium", "hard"), system_prompt="Reason step by step."
    )
    assert out["difficulty"] == 1.0
    assert [m["role"] for m in out["messages"]] == ["system", "user", "assistant"]


def test_difficulties_marks_missing_and_malformed(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS + [{"prompt": "no difficulty"}], raw_lines=["oops"])
    values = sources.ParsedSource(sources.open_source(str(path))).difficulties()
    np.testing.assert_array_equal(values, [0.5, 2.0, 1.0, np.nan, np.nan])


def test_unknown_format_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="cannot tell the format"):
        sources.open_source(str(tmp_path / "data.csv"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sources.open_source(str(tmp_path / "missing.jsonl"))
    with pytest.raises(IndexError, match="row 7 out of range"):
        sources.open_source(str(write_jsonl(tmp_path / "d.jsonl", ROWS)))[7]
