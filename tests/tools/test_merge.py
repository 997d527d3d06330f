"""The Fathom linear merge against a numpy weighted sum, from Python, its CLI and the main `merge` job."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from polaris_jax.models import ModelConfig, init_params, save_hf
from polaris_jax.models.safetensors_io import CheckpointReader
from polaris_jax.tools.merge import merge_checkpoints

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("merge")
    config = ModelConfig.tiny(vocab_size=32, num_layers=1)
    init = jax.jit(lambda k: init_params(config, k))
    paths = [save_hf(config, init(jax.random.PRNGKey(seed)), tmp / f"ckpt{seed}") for seed in range(3)]
    return tmp, paths


def _expected(paths, weights):
    readers = [CheckpointReader(p) for p in paths]
    return {
        name: sum(w * r.get(name).astype(np.float64) for w, r in zip(weights, readers)) for name in readers[0].names()
    }


def _assert_merged(path, expected):
    merged = CheckpointReader(path)
    assert set(merged.names()) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(merged.get(name), value, rtol=1e-6, atol=1e-7, err_msg=name)


def test_weighted_merge_equals_numpy(checkpoints):
    tmp, paths = checkpoints
    out = merge_checkpoints(paths, [0.2, 0.3, 0.5], tmp / "merged")
    _assert_merged(out, _expected(paths, [0.2, 0.3, 0.5]))
    assert json.loads((pathlib.Path(out) / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]
    unnormalised = merge_checkpoints(paths[:2], [1.0, 1.0], tmp / "sum", normalize=False)
    _assert_merged(unnormalised, _expected(paths[:2], [1.0, 1.0]))


def test_merge_refuses_bad_inputs(checkpoints, tmp_path):
    _, paths = checkpoints
    with pytest.raises(FileNotFoundError, match="does not exist"):
        merge_checkpoints([paths[0], str(tmp_path / "missing")], [0.5, 0.5], tmp_path / "out")
    with pytest.raises(ValueError, match="2 checkpoints but 3 weights"):
        merge_checkpoints(paths[:2], [0.2, 0.3, 0.5], tmp_path / "out")
    deeper = ModelConfig.tiny(vocab_size=32, num_layers=2)
    other = save_hf(deeper, jax.jit(lambda k: init_params(deeper, k))(jax.random.PRNGKey(0)), tmp_path / "deeper")
    with pytest.raises(ValueError, match="different architecture"):
        merge_checkpoints([paths[0], other], [0.5, 0.5], tmp_path / "out")
    with pytest.raises(FileExistsError):
        merge_checkpoints(paths[:2], [0.5, 0.5], paths[2])


def _run(args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_command_line_and_main_job(checkpoints, tmp_path):
    _, paths = checkpoints
    out = _run(
        ["polaris_jax.tools.merge", f"--inputs={paths[0]},{paths[1]}", "--weights=1,3", f"--output={tmp_path / 'cli'}"]
    )
    _assert_merged(out["output"], _expected(paths[:2], [0.25, 0.75]))
    out = _run(
        [
            "polaris_jax.main",
            "--config=configs/merge.py",
            f"--workdir={tmp_path / 'job'}",
            f"--config.inputs=('{paths[0]}', '{paths[2]}')",
            "--config.weights=(0.5, 0.5)",
        ]
    )
    assert out["output"] == str(tmp_path / "job" / "merged")
    _assert_merged(out["output"], _expected([paths[0], paths[2]], [0.5, 0.5]))
