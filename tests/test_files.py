"""`files.write_atomic`: a reader sees the old file or the new one, and a failed write loses nothing."""

import json

import pytest

from polaris_jax.files import jsonl, write_atomic


def test_writes_text_bytes_and_jsonl_lines(tmp_path):
    write_atomic(tmp_path / "a" / "b.txt", "héllo\n")
    assert (tmp_path / "a" / "b.txt").read_text(encoding="utf-8") == "héllo\n"
    write_atomic(tmp_path / "c.bin", b"\x00\x01")
    assert (tmp_path / "c.bin").read_bytes() == b"\x00\x01"
    write_atomic(tmp_path / "d.jsonl", jsonl([{"x": 1}, {"y": "ü"}]))
    assert [json.loads(line) for line in (tmp_path / "d.jsonl").read_text().splitlines()] == [{"x": 1}, {"y": "ü"}]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "samples.jsonl"
    write_atomic(path, "old\n")

    def lines():
        yield "new 1\n"
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomic(path, lines())
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.jsonl"]
