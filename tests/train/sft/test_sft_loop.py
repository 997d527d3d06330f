"""The SFT loop end to end on a tiny jsonl with bad rows; configs; refused keys; missing checkpoints."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from polaris_jax.data import synthetic_arith
from polaris_jax.data.tokenizer import Tokenizer
from polaris_jax.models import load_hf
from polaris_jax.train.sft import loop as sft_loop
from tests.config_files import config_module
from tests.train.step_guard import guarded_train_steps

ROOT = pathlib.Path(__file__).resolve().parents[3]
SFT_CONFIGS = ["sft_tiny", "sft_r1_distill_qwen3_8b", "sft_fathom_r1_14b"]


def _load_config(name: str, arg: str | None = None):
    module = config_module(name)
    return module.get_config(arg), module.__doc__


def _write_rows(path: pathlib.Path) -> None:
    rows = [
        {"prompt": f"{a}+{b}", "response": f"<think>\n{a}+{b}={a + b}\n</think>\n\n\\boxed{{{a + b}}}"}
        for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4), (6, 1), (8, 3)]
    ]
    rows.insert(3, {"messages": [{"role": "user", "content": "1+1"}]})  # no assistant turn
    rows.insert(6, {"unexpected": "layout"})  # neither messages nor prompt
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft_loop")
    synthetic_arith.build_tokenizer(tmp / "tokenizer")
    _write_rows(tmp / "rows.jsonl")
    config, _ = _load_config("sft_tiny")
    config.synthetic.task = ""
    config.tokenizer_dir = str(tmp / "tokenizer")
    config.data.sources = (str(tmp / "rows.jsonl"),)
    config.data.num_epochs = 1
    config.data.batch_size, config.data.seq_len = 2, 64
    config.train.steps, config.train.log_every, config.checkpoint.every = 50, 1, 2
    workdir = tmp / "work"
    with guarded_train_steps():  # every step's inputs are placed explicitly
        return config, workdir, sft_loop.run(config, str(workdir))


def test_rows_without_an_assistant_turn_are_skipped_and_counted(finished_run):
    _, _, final = finished_run
    assert final["data/skipped_no_assistant_turn"] == 1
    assert final["data/skipped_malformed"] == 1
    assert final["data/examples"] == 8
    assert final["step"] < 50  # one epoch of 8 short examples runs out early


def test_run_writes_metrics_checkpoints_and_a_loadable_export(finished_run):
    config, workdir, final = finished_run
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in lines] == list(range(1, final["step"] + 1))
    for key in ("loss", "learning_rate", "grad_norm", "tokens_per_s", "ce_loss"):
        assert all(key in row for row in lines), key
    assert all(row["tokens_per_s"] > 0 for row in lines)
    assert any(p.name.startswith("events.out.tfevents") for p in workdir.iterdir())
    assert final["step"] in [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    model_config, params = load_hf(final["export_dir"])
    assert model_config.vocab_size == synthetic_arith.padded_vocab_size(Tokenizer.from_dir(config.tokenizer_dir))
    assert (pathlib.Path(final["export_dir"]) / "tokenizer.json").exists()
    assert json.loads((workdir / "config.json").read_text())["job"] == "sft"


def test_missing_resume_directory_is_a_clear_error(finished_run, tmp_path):
    config, _, _ = finished_run
    config.checkpoint.resume_from = str(tmp_path / "no_such_run" / "checkpoints")
    try:
        with pytest.raises(FileNotFoundError, match="checkpoint directory .*no_such_run.* does not exist"):
            sft_loop.run(config, str(tmp_path / "fresh"))
    finally:
        config.checkpoint.resume_from = ""


@pytest.mark.parametrize("name", SFT_CONFIGS)
def test_configs_are_locked_sft_configs_with_mesh_rules_and_command(name):
    for arg in (None, "tiny"):
        if name == "sft_tiny" and arg == "tiny":
            arg = "lora"
        config, doc = _load_config(name, arg)
        assert config.job == "sft"
        assert set(config.mesh.keys()) <= {"data", "fsdp", "tensor", "expert", "sequence"}
        assert tuple(dict(config.sharding_rules)["embed"]) == ("fsdp", "sequence")  # FSDP over both
        assert f"python -m polaris_jax.main --config=configs/{name}.py" in doc
        with pytest.raises(AttributeError):
            config.no_such_key = 1  # locked
    with pytest.raises(ValueError, match="variant"):
        _load_config(name, "no_such_variant")


def test_recipe_numbers_of_the_r1_distillation_config():
    config, doc = _load_config("sft_r1_distill_qwen3_8b")
    o = config.optimizer
    assert (o.peak_lr, o.min_lr_ratio, o.warmup_ratio, o.grad_clip_norm) == (4e-5, 0.1, 0.03, 0.2)
    assert config.data.seq_len == 32768
    lora, _ = _load_config("sft_r1_distill_qwen3_8b", "lora")
    assert lora.optimizer.peak_lr == pytest.approx(10 * o.peak_lr)  # the LoRA ~10x rule
    fathom, _ = _load_config("sft_fathom_r1_14b")
    assert (fathom.data.seq_len, fathom.data.order, fathom.model.preset) == (16384, "curriculum", "r1_distill_qwen_14b")


def test_unknown_config_key_is_refused_on_the_command_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "polaris_jax.main",
            "--config=configs/sft_tiny.py",
            f"--workdir={tmp_path}",
            "--config.train.no_such_key=3",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "no_such_key" in result.stderr
    assert not (tmp_path / "config.json").exists()  # refused before anything ran
