"""Multi-host: 2 CPU processes on localhost (jax.distributed, gloo) run the sharded SFT step as one mesh.

The 2-process run must give the losses, parameters, Hugging Face export and sampled tokens of the same
4-device mesh in one process.
Also: how `polaris_jax.distributed` resolves its settings from flags, config and environment.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import safetensors.numpy

from polaris_jax import distributed

WORKER = pathlib.Path(__file__).with_name("multihost_worker.py")
REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("POLARIS_", "JAX_COORDINATOR", "JAX_NUM_PROC", "JAX_PROCESS_ID", "XLA_FLAGS"))
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    return {**env, **extra}


def _start(out, local_devices, **env):
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(out), str(local_devices)],
        env=_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait(proc, timeout=240) -> str:
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        pytest.fail(f"worker timed out:\n{output[-3000:]}")
    assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{output[-3000:]}"
    return output


@pytest.mark.slow  # about 1.5 min on 2 cores: `make test-slow`, which .ci/run also runs
def test_two_processes_match_one_process(tmp_path):
    address = f"127.0.0.1:{_free_port()}"
    reference = _start(tmp_path / "single.npz", 4)
    workers = [
        _start(
            tmp_path / "multi.npz",
            2,
            POLARIS_COORDINATOR_ADDRESS=address,
            POLARIS_NUM_PROCESSES="2",
            POLARIS_PROCESS_ID=str(i),
        )
        for i in range(2)
    ]
    for proc in [reference] + workers:
        _wait(proc)
    single, multi = np.load(tmp_path / "single.npz"), np.load(tmp_path / "multi.npz")
    assert int(single["process_count"]) == 1 and int(multi["process_count"]) == 2
    np.testing.assert_allclose(multi["losses"], single["losses"], rtol=1e-6)
    assert single["losses"][-1] != single["losses"][0]  # the steps really updated the params
    names = [k for k in single.files if k.startswith("[")]
    assert names and sorted(names) == sorted(k for k in multi.files if k.startswith("["))
    for name in names:
        np.testing.assert_allclose(multi[name], single[name], rtol=1e-5, atol=1e-6, err_msg=name)
    # Sampling on the 2-process mesh gives the one-process tokens.
    for key in ("greedy_tokens", "sampled_tokens", "sampled_reasons"):
        np.testing.assert_array_equal(multi[key], single[key], err_msg=key)
    assert single["greedy_tokens"].shape == (3, 12) and single["sampled_tokens"].shape[0] == 6
    # The HF export of params spread over both processes equals the one-process export.
    single_hf, multi_hf = (
        safetensors.numpy.load_file(tmp_path / f"{n}.npz.hf" / "model.safetensors") for n in ("single", "multi")
    )
    assert sorted(multi_hf) == sorted(single_hf) and len(single_hf) > 10
    for name, want in single_hf.items():
        np.testing.assert_allclose(multi_hf[name], want, rtol=1e-5, atol=1e-6, err_msg=name)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_settings_come_from_env_config_and_flags_in_that_order():
    env = {"POLARIS_COORDINATOR_ADDRESS": "10.0.0.1:1234", "POLARIS_NUM_PROCESSES": "4", "POLARIS_PROCESS_ID": "3"}
    settings = distributed.resolve_settings(None, env)
    assert (settings.coordinator_address, settings.num_processes, settings.process_id) == ("10.0.0.1:1234", 4, 3)
    assert settings.enabled
    config = ml_collections.ConfigDict(
        {"distributed": {"coordinator_address": "host:99", "num_processes": 2, "process_id": 1, "auto": False}}
    )
    settings = distributed.resolve_settings(config, env)
    assert (settings.coordinator_address, settings.num_processes, settings.process_id) == ("host:99", 2, 1)
    jax_env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}
    assert distributed.resolve_settings(None, jax_env).coordinator_address == "h:1"
    assert not distributed.resolve_settings(None, {}).enabled
    assert distributed.resolve_settings(None, {"POLARIS_DISTRIBUTED": "auto"}).enabled


@pytest.mark.parametrize(
    "env, message",
    [
        ({"POLARIS_COORDINATOR_ADDRESS": "h:1"}, "num_processes and process_id are needed"),
        (
            {"POLARIS_COORDINATOR_ADDRESS": "nohostport", "POLARIS_NUM_PROCESSES": "2", "POLARIS_PROCESS_ID": "0"},
            "host:port",
        ),
        (
            {"POLARIS_COORDINATOR_ADDRESS": "h:1", "POLARIS_NUM_PROCESSES": "2", "POLARIS_PROCESS_ID": "2"},
            r"process_id=2 must be in \[0, num_processes=2\)",
        ),
        ({"POLARIS_NUM_PROCESSES": "two"}, "not an integer"),
        ({"POLARIS_DISTRIBUTED": "yes"}, "is not '', 'auto' or 'off'"),
    ],
)
def test_bad_settings_are_refused(env, message):
    with pytest.raises(ValueError, match=message):
        distributed.resolve_settings(None, env)


def test_off_disables_initialisation():
    env = {"POLARIS_DISTRIBUTED": "off", "POLARIS_COORDINATOR_ADDRESS": "h:1"}
    assert not distributed.maybe_initialize_distributed(None, env)


def _grpo(workdir, local_devices, **env):
    command = [
        sys.executable,
        "-m",
        "polaris_jax.main",
        "--config=configs/polaris_qwen3_4b.py:tiny",
        f"--workdir={workdir}",
    ]
    return subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(XLA_FLAGS=f"--xla_force_host_platform_device_count={local_devices}", JAX_PLATFORMS="cpu", **env),
    )


@pytest.mark.slow  # about 2 min on 2 cores: `make test-slow`, which .ci/run also runs
def test_grpo_recipe_on_two_processes_matches_one_process(tmp_path):
    """The Polaris recipe's CPU variant (rollouts, verifier rewards, updates, evaluations) on a
    4-device mesh spread over 2 processes ends with the one-process run's metrics."""
    address = f"127.0.0.1:{_free_port()}"
    procs = [_grpo(tmp_path / "single", 4)] + [
        _grpo(
            tmp_path / "multi",
            2,
            POLARIS_COORDINATOR_ADDRESS=address,
            POLARIS_NUM_PROCESSES="2",
            POLARIS_PROCESS_ID=str(i),
        )
        for i in range(2)
    ]
    finals = [json.loads(_wait(proc, timeout=600).strip().splitlines()[-1]) for proc in procs]
    single, multi0, multi1 = finals
    for key in ("loss", "grad_norm", "reward_mean", "response_len_mean", "accuracy_after", "step"):
        assert multi0[key] == pytest.approx(single[key], rel=1e-5), key
        assert multi1[key] == multi0[key], key
    assert multi0["param_norm"] == pytest.approx(single["param_norm"], rel=1e-5)
