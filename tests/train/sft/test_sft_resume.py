"""N steps straight == a run SIGKILLed after its first checkpoint, then resumed: same losses, params, opt state.

The runs checkpoint every 10 of 30 steps with async saves; the kill lands as soon as step 10 is on
disk, so the victim dies somewhere in steps 11-30, possibly with a half-written checkpoint (which
orbax keeps under a temporary name and the resume ignores).
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from polaris_jax.models.safetensors_io import CheckpointReader

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
FLAGS = [
    "--config.train.steps=30",
    "--config.checkpoint.every=10",
    "--config.checkpoint.keep=5",
    "--config.train.log_every=1",
    "--config.synthetic.num_examples=400",
    "--config.data.batch_size=4",
    "--config.data.seq_len=128",
]


def _launch(workdir: str, log_name: str) -> subprocess.Popen:
    # The resumed run reuses the executables the first two runs compiled (same program, same bits).
    cache = os.path.join(os.path.dirname(workdir), "jax_cache")
    env = {
        **os.environ,
        "PYTHONPATH": ROOT,
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": cache,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        "XLA_FLAGS": "--xla_backend_optimization_level=0",
    }  # quicker CPU compiles, same in every run
    log = open(os.path.join(os.path.dirname(workdir), log_name), "w")
    cmd = [sys.executable, "-m", "polaris_jax.main", "--config=configs/sft_tiny.py", f"--workdir={workdir}", *FLAGS]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _losses(workdir: str) -> dict[int, float]:
    """step -> loss; a step logged twice (before the kill and after the resume) keeps the later line."""
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            out[record["step"]] = record["loss"]
    return out


def _saved_state(workdir: str, step: int):
    return ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))


def _log_tail(tmp_path, name):
    return open(tmp_path / name).read()[-4000:]


@pytest.mark.slow  # about 30 s on 2 cores: `make test-slow` (CI runs it)
def test_hard_kill_and_resume_is_exact(tmp_path):
    straight_dir, resumed_dir = str(tmp_path / "straight"), str(tmp_path / "resumed")
    straight = _launch(straight_dir, "straight.log")
    victim = _launch(resumed_dir, "killed.log")
    ten = os.path.join(resumed_dir, "checkpoints", "10")
    deadline = time.monotonic() + 400
    while not os.path.isdir(ten):  # orbax renames the step directory into place once it is complete
        assert victim.poll() is None, "run ended before its step-10 checkpoint:\n" + _log_tail(tmp_path, "killed.log")
        assert time.monotonic() < deadline, "no step-10 checkpoint in time"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not os.path.isdir(os.path.join(resumed_dir, "checkpoints", "30")), "the kill came after the last step"
    assert not os.path.isdir(os.path.join(resumed_dir, "export")), "the kill came after the export"

    resumed = _launch(resumed_dir, "resumed.log")
    assert resumed.wait(timeout=400) == 0, _log_tail(tmp_path, "resumed.log")
    assert straight.wait(timeout=400) == 0, _log_tail(tmp_path, "straight.log")

    straight_losses, resumed_losses = _losses(straight_dir), _losses(resumed_dir)
    assert "resumed from" in open(tmp_path / "resumed.log").read()
    assert sorted(straight_losses) == list(range(1, 31))
    assert straight_losses == resumed_losses  # exact float equality, every step
    a, b = _saved_state(straight_dir, 30), _saved_state(resumed_dir, 30)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    assert int(a["step"]) == 30
    exported = [CheckpointReader(os.path.join(d, "export", "hf")) for d in (straight_dir, resumed_dir)]
    for name in exported[0].names():
        np.testing.assert_array_equal(exported[0].get(name), exported[1].get(name))
