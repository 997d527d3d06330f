"""One engine replica per process (`train/grpo/replicas.py`): the streaming loop on several processes.

The real thing runs 2 CPU processes x 2 devices (jax.distributed over gloo) through the demo's CI variant
with max_staleness=1 and TIS: both processes must end on the same metrics (they shaped the same batches),
each must have sampled its own share of the stream, and the run must learn as the one-process run does.
Also, in one process: where a replica resumes its share of the stream, the host state's round trip, and
the start-up refusals that name the key.
"""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import ml_collections
import pytest

from polaris_jax.models.config import ConfigError
from polaris_jax.train.grpo import rollout_mesh
from polaris_jax.train.grpo.host_state import HostState
from polaris_jax.train.grpo.replicas import replica_position
from tests.experiments.test_multihost import REPO_ROOT, _env, _free_port, _wait


def test_each_replica_resumes_its_own_share_of_the_stream():
    host = HostState()
    host.position = 10  # a run saved by one process (or before any take): the first positions of each share
    assert [replica_position(host, i, 4) for i in range(4)] == [12, 13, 10, 11]
    host.positions = [14, 9]  # saved by 2 replicas: each one's own next position
    restored = HostState()
    restored.set_state(host.snapshot().get_state())
    assert restored.positions == [14, 9] and restored.position == 10
    assert [replica_position(restored, i, 2) for i in range(2)] == [14, 9]
    assert [replica_position(restored, i, 3) for i in range(3)] == [12, 10, 11]  # another process count
    restored.start_stage(1)
    assert (restored.stage, restored.position, restored.positions) == (1, 0, [])


def _streaming(**rollout) -> ml_collections.ConfigDict:
    section = dict(
        backend="engine",
        max_staleness=1,
        mesh={},
        devices="shared",
        prompts_per_step=4,
        max_prompts_in_flight=4,
        max_steps_per_response=1,
        length_spread=0.0,
    )
    return ml_collections.ConfigDict(dict(mesh=dict(fsdp=-1), rollout={**section, **rollout}))


@pytest.mark.parametrize(
    "rollout, message",
    [
        (dict(prompts_per_step=3, max_prompts_in_flight=3), r"rollout.prompts_per_step=3 must split evenly over the 2"),
        (dict(mesh=dict(tensor=4)), r"rollout.mesh \{'tensor': 4\} does not divide the 2 devices of each process"),
        (dict(devices="disjoint", mesh=dict(data=1)), "rollout.devices='disjoint' is for one process"),
        (dict(backend="static"), r"rollout.backend='static' with rollout.max_staleness >= 1 samples on the training"),
    ],
)
def test_replica_settings_that_cannot_work_are_refused(monkeypatch, rollout, message):
    devices = [jax.devices()[0]] * 2  # two devices per process, as 2 processes of 4 devices would hold
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(rollout_mesh, "process_devices", lambda index: devices)
    assert rollout_mesh.engine_replicas(_streaming()) and not rollout_mesh.engine_replicas(_streaming(backend="static"))
    with pytest.raises(ConfigError, match=message):
        rollout_mesh.check_rollout_section(_streaming(**rollout), device_count=4)
    rollout_mesh.check_rollout_section(_streaming(mesh=dict(tensor=2)), device_count=4)  # fits each process


def _demo(workdir, process: int, port: int):
    command = [
        sys.executable,
        "-m",
        "polaris_jax.main",
        "--config=configs/grpo_tiny.py:ci",
        f"--workdir={workdir}",
        "--config.rollout.max_staleness=1",
        "--config.algo.off_policy=tis",
    ]
    env = _env(
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu",
        POLARIS_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        POLARIS_NUM_PROCESSES="2",
        POLARIS_PROCESS_ID=str(process),
    )
    return subprocess.Popen(
        command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )


@pytest.mark.slow  # about 4 min on 2 cores: `make test-slow`, which .ci/run also runs
def test_two_processes_stream_rollouts_from_their_own_engines_and_learn(tmp_path):
    port = _free_port()
    procs = [_demo(tmp_path / "run", i, port) for i in range(2)]
    finals = [json.loads(_wait(proc, timeout=1200).strip().splitlines()[-1]) for proc in procs]
    first, second = finals
    for key in ("accuracy_before", "accuracy_after", "grpo_final_reward_mean", "grpo_steps"):
        assert first[key] == second[key], key  # the last reward_mean: both shaped the same gathered batches
    assert first["accuracy_after"] - first["accuracy_before"] >= 0.10, first  # test_grpo_learning's margin
    with open(tmp_path / "run" / "grpo" / "metrics.jsonl") as f:
        rows = [row for row in map(json.loads, f) if "rollout/replicas" in row]
    assert len(rows) == 3  # logged every 10 of the 30 steps
    assert all(row["rollout/replicas"] == 2 for row in rows)  # each process sampled its share
    assert all(row["rollout/admitted"] >= 16 and row["rollout/staleness_mean"] > 0 for row in rows)
    with open(tmp_path / "run" / "grpo" / "checkpoints" / "30" / "data" / "process_1-of-2.json") as f:
        saved = json.load(f)
    assert len(saved["positions"]) == 2 and {p % 2 for p in saved["positions"]} == {0, 1}, saved
