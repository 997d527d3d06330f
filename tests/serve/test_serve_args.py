"""`python -m polaris_jax.serve` flags: defaults, `--config=FILE[:variant]` (flags given win), bad input."""

from __future__ import annotations

import os

import pytest

from polaris_jax.serve.__main__ import DEFAULT_WORKDIR, parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SERVE_CONFIG = os.path.join(ROOT, "configs", "serve.py")


def test_the_bare_command_line_has_every_default():
    args = parse_args(["--model", "ckpt", "--api_key", "tml-k"])
    assert (args.host, args.port, args.workdir, args.db, args.max_loras) == (
        "127.0.0.1",
        8000,
        DEFAULT_WORKDIR,
        None,
        4,
    )


def test_config_file_sets_defaults_and_flags_win():
    args = parse_args(["--model", "ckpt", f"--config={SERVE_CONFIG}:h100", "--max_slots", "3"])
    assert (args.max_slots, args.max_seq_len, args.max_loras, args.prefill_chunk) == (3, 16384, 32, 1024)


def test_bad_config_names_the_problem(tmp_path):
    with pytest.raises(SystemExit, match="is not a file"):
        parse_args(["--model", "ckpt", "--config", str(tmp_path / "none.py")])
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config(arg=''):\n    return {'max_slot': 4}\n")
    with pytest.raises(SystemExit, match=r"\['max_slot'\] are not flags"):
        parse_args(["--model", "ckpt", "--config", str(bad)])
    with pytest.raises(ValueError, match="unknown variant 'a100'"):
        parse_args(["--model", "ckpt", f"--config={SERVE_CONFIG}:a100"])
