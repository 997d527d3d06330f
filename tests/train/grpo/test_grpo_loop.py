"""The GRPO loop end to end on a tiny model: metrics, no recompiles, exact resume after SIGKILL,
non-finite loss, reward functions that raise, and schedules refused at start-up."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from polaris_jax import main
from polaris_jax.train.grpo import loop as grpo_loop
from polaris_jax.train.grpo import step as grpo_step
from polaris_jax.train.grpo.config import ConfigError, validate_config
from tests.config_files import config_module
from tests.train.step_guard import guarded_train_steps

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
CONFIG = os.path.join(ROOT, "configs", "polaris_qwen3_4b.py")
# The Polaris recipe's CPU variant (3 stages x 2 steps), checkpointed every 2 steps, with an HF export.
OVERRIDES = {"checkpoint.every": 2, "checkpoint.keep": 5, "export.hf": True, "train.log_every": 1}
REQUIRED_METRICS = (
    "reward_mean",
    "accuracy",
    "frac_all_correct_groups",
    "frac_all_wrong_groups",
    "response_len_mean",
    "response_len_max",
    "truncation_rate",
    "clip_fraction",
    "approx_kl",
    "entropy",
    "rollout_tokens_per_s",
    "train_tokens_per_s",
    "time_rollout",
    "time_reward",
    "time_update",
    "distinct_4",
)


def polaris_tiny(**overrides):
    config = config_module("polaris_qwen3_4b").get_config("tiny")
    for key, value in {**OVERRIDES, **overrides}.items():
        node = config
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


def _rows(workdir):
    rows = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for row in map(json.loads, f):  # the final evaluation is its own row at the last step
            rows.setdefault(row["step"], {}).update(row)
    return rows


_COMPILES = []
jax.monitoring.register_event_duration_secs_listener(
    lambda name, *a, **k: _COMPILES.append(name) if name.endswith("backend_compile_duration") else None
)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One uninterrupted run, with the number of XLA compiles seen inside each training step."""
    workdir = str(tmp_path_factory.mktemp("grpo_run"))
    compiles, original = {}, grpo_loop.train_step

    def counting(run, step):
        before = len(_COMPILES)
        out = original(run, step)
        compiles[step + 1] = len(_COMPILES) - before
        return out

    mp = pytest.MonkeyPatch()
    mp.setattr(grpo_loop, "train_step", counting)
    try:
        with guarded_train_steps():  # every update's inputs are placed explicitly
            result = main.run_job(polaris_tiny(), workdir)  # the job, then curves.png
    finally:
        mp.undo()
    return workdir, result, compiles


def test_run_logs_every_metric_and_writes_curves(finished_run):
    workdir, result, _ = finished_run
    rows = _rows(workdir)
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    for step, row in rows.items():
        missing = [k for k in REQUIRED_METRICS if k not in row]
        assert not missing, f"step {step} lacks {missing}"
    assert [row["temperature"] for row in rows.values()] == [1.4, 1.4, 1.45, 1.45, 1.5, 1.5]
    assert {"accuracy_before", "accuracy_after"} <= set(result)
    assert os.path.getsize(os.path.join(workdir, "curves.png")) > 10_000
    assert rows[6]["sampler_logprob_gap"] < 1e-3  # the trainer re-scores what the sampler drew


def test_no_recompiles_within_a_stage(finished_run):
    _, _, compiles = finished_run
    # Steps 1, 3, 5 open a stage (new response length: one compile each); 2, 4, 6 must compile nothing.
    assert [compiles[s] for s in (2, 4, 6)] == [0, 0, 0], compiles


@pytest.mark.slow  # about 45 s on 2 cores: `make test-slow` (CI runs it)
def test_resume_after_sigkill_continues_exactly(finished_run, tmp_path):
    reference_dir, _, _ = finished_run
    workdir = str(tmp_path / "killed")
    args = [sys.executable, "-m", "polaris_jax.main", f"--config={CONFIG}:tiny", f"--workdir={workdir}"]
    args += [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
    proc = subprocess.Popen(
        args,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    deadline = time.monotonic() + 300
    while not os.path.isdir(os.path.join(workdir, "checkpoints", "2")):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 5 minutes"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert saved and saved[-1] < 6, f"the run finished before the kill: {saved}"

    grpo_loop.run(polaris_tiny(), workdir)  # the same command again resumes
    want, got = _rows(reference_dir), _rows(workdir)
    for step in range(saved[-1] + 1, 7):
        for key in ("loss", "reward_mean", "param_norm", "grad_norm", "response_len_mean", "entropy"):
            np.testing.assert_allclose(got[step][key], want[step][key], rtol=1e-6, err_msg=f"step {step} {key}")
    final_want = load_file(os.path.join(reference_dir, "export", "hf", "model.safetensors"))
    final_got = load_file(os.path.join(workdir, "export", "hf", "model.safetensors"))
    for name, value in final_want.items():
        np.testing.assert_allclose(final_got[name], value, rtol=1e-6, atol=1e-7, err_msg=name)


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    original, calls = grpo_step.update_batch, []

    def poisoned(rollout, advantages_b, mask_br):
        calls.append(1)
        advantages_b = np.array(advantages_b)
        if len(calls) == 3:
            advantages_b[:] = np.nan
        return original(rollout, advantages_b, mask_br)

    monkeypatch.setattr(grpo_step, "update_batch", poisoned)
    config = polaris_tiny(
        **{
            "checkpoint.every": 1,
            "checkpoint.async_save": False,
            "export.hf": False,
            "plots": False,
            "eval.dataset": "",
        }
    )
    with config.unlocked():
        config.schedule.max_response_len, config.schedule.temperature = (32,), (1.4,)
        config.schedule.steps, config.schedule.datasets = (4,), (config.schedule.datasets[0],)
        config.shaping.polaris_substitution = False  # every step updates
    with pytest.raises(grpo_loop.NonFiniteLossError, match=r"at step 3, update 0 .*last good checkpoint is step 2"):
        grpo_loop.run(config, str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]
    assert (tmp_path / "nonfinite_batch_step3.npz").exists()


_BAD = {
    "unequal": lambda c: c.schedule.update(dict(temperature=(1.4, 1.45))),
    "shrinking": lambda c: c.schedule.update(dict(max_response_len=(48, 40, 56))),
    "missing": lambda c: c.schedule.update(
        dict(datasets=("synthetic_arith:train:8", "/nonexistent.jsonl", "synthetic_arith:train:8"))
    ),
    "no_steps": lambda c: c.schedule.update(dict(steps=(2, 0, 2))),
    "loss_name": lambda c: c.algo.update(dict(policy_loss="ppo_clipp")),
    "kl_without_reference": lambda c: c.algo.update(dict(kl_coef=0.1)),
    "indivisible": lambda c: c.algo.update(dict(minibatches=3)),
    "backend": lambda c: c.rollout.update(dict(backend="vllm")),
    "decode_block": lambda c: c.rollout.engine.update(dict(decode_block=32)),
    "staleness": lambda c: c.rollout.update(dict(max_staleness=-1)),
    "off_policy": lambda c: c.algo.update(dict(off_policy="is")),
    "off_policy_cap": lambda c: c.algo.update(dict(off_policy="tis", off_policy_cap=0.0)),
    "in_flight": lambda c: c.rollout.update(dict(backend="engine", max_staleness=1, max_prompts_in_flight=1)),
    "cap": lambda c: c.rollout.update(dict(backend="engine", max_staleness=1, max_steps_per_response=0)),
    "cap_over_staleness": lambda c: c.rollout.update(dict(backend="engine", max_staleness=1, max_steps_per_response=3)),
    "streaming_sync": lambda c: c.rollout.update(dict(backend="engine", max_prompts_in_flight=64)),
    "streaming_static": lambda c: c.rollout.update(dict(backend="static", max_staleness=1, max_prompts_in_flight=64)),
    "rollout_mesh": lambda c: c.rollout.update(dict(backend="engine", mesh=dict(data=2, tensor=3))),
    "rollout_axis": lambda c: c.rollout.update(dict(backend="engine", mesh=dict(tensr=1))),
    "disjoint": lambda c: c.rollout.update(dict(backend="engine", devices="disjoint", mesh=dict(tensor=1))),
    "devices": lambda c: c.rollout.update(dict(backend="engine", devices="split")),
    "replay_static": lambda c: c.rollout.update(dict(backend="static", router_replay=True)),
    "replay_rescue": lambda c: (
        c.rollout.update(dict(backend="engine", router_replay=True)),
        c.shaping.update(dict(rollout_rescue=True)),
    ),
}
_MESSAGES = {
    "unequal": "one entry per stage",
    "shrinking": "stage 1: max_response_len 40 is shorter",
    "missing": "stage 1: dataset '/nonexistent.jsonl' does not exist",
    "no_steps": "stage 1: steps=0",
    "loss_name": "unknown policy loss 'ppo_clipp'",
    "kl_without_reference": "use_reference",
    "indivisible": "minibatches=3",
    "backend": "rollout.backend='vllm' must be one of",
    "decode_block": "rollout.engine.decode_block=32 must be <= page_size=16",
    "staleness": "rollout.max_staleness=-1 must be an integer >= 0",
    "off_policy": "algo.off_policy='is' is not one of",
    "off_policy_cap": "algo.off_policy_cap=0.0 must be > 0",
    "in_flight": r"rollout.max_prompts_in_flight=1 must be an integer >= rollout.prompts_per_step=4",
    "cap": "rollout.max_steps_per_response=0 must be an integer >= 1",
    "cap_over_staleness": "rollout.max_steps_per_response=3 .* rollout.max_staleness=1 must be >= 2",
    "streaming_sync": "need rollout.max_staleness >= 1",
    "streaming_static": "need rollout.backend='engine'",
    "rollout_mesh": r"rollout.mesh \{'data': 2, 'tensor': 3\} does not divide the 1 devices",
    "rollout_axis": "rollout.mesh: axis 'tensr' is not one of",
    "disjoint": "takes 1 of 1 devices, leaving none for training",
    "devices": "rollout.devices='split' must be one of",
    "replay_static": "rollout.router_replay .* needs rollout.backend='engine' \\(now 'static'\\)",
    "replay_rescue": "rollout.router_replay .* shaping.rollout_rescue=False \\(now True\\)",
}


@pytest.mark.parametrize("name", sorted(_BAD))
def test_bad_configs_are_refused_at_start_up(name):
    config = polaris_tiny()
    with config.unlocked():
        _BAD[name](config)
    with pytest.raises(ConfigError, match=_MESSAGES[name]):
        validate_config(config)


GRPO_RECIPES = ("openr1_grpo", "polaris_qwen3_4b", "polaris_r1_distill_7b", "lora_rl_qwen3_8b")


@pytest.mark.parametrize("name", GRPO_RECIPES)
def test_every_grpo_recipe_has_a_tiny_cpu_variant_and_its_command(name):
    module = config_module(name)
    assert f"--config=configs/{name}.py:tiny" in module.__doc__
    tiny = module.get_config("tiny")
    validate_config(tiny)  # its files exist (synthetic data) and every name is known
    assert tiny.model.preset == "tiny" and tiny.tokenizer_dir == "synthetic_arith"
    full = module.get_config("")
    devices = int(np.prod([size for size in full.mesh.values() if size > 0]))  # the hardware it names
    validate_config(full, check_files=False, device_count=devices)


def test_rescue_buffer_survives_the_checkpoint_round_trip():
    from polaris_jax.train.grpo.host_state import HostState, PersistentRescueBuffer

    rows = {
        "response_br": np.arange(12, dtype=np.int32).reshape(4, 3),
        "correct_b": np.array([0.0, 1.0, 0.0, 0.0], np.float32),
        "sampler_logprobs_br": np.linspace(-1, 0, 12, dtype=np.float32).reshape(4, 3),
    }
    host = HostState(PersistentRescueBuffer(2, rewards_key="correct_b"))
    host.position, host.stage = 17, 1
    host.rescue.update(rows, ["a", "b"])  # group "a" has a correct answer (row 1), "b" has none
    restored = HostState(PersistentRescueBuffer(2, rewards_key="correct_b"))
    restored.set_state(host.snapshot().get_state())
    assert (restored.position, restored.stage) == (17, 1)
    all_wrong = {k: v.copy() for k, v in rows.items()}
    all_wrong["correct_b"][:] = 0.0
    want, _ = host.rescue.rescue(all_wrong, ["a", "b"], np.random.default_rng(0))
    got, info = restored.rescue.rescue(all_wrong, ["a", "b"], np.random.default_rng(0))
    assert info["rescued_groups"] == 1
    for key in rows:
        np.testing.assert_array_equal(got[key], want[key])
        assert got[key].dtype == rows[key].dtype


def test_a_rescue_row_saved_before_the_typed_batch_loads_in_todays_fields():
    from polaris_jax.sampling import FINISH_EOS, FINISH_LENGTH
    from polaris_jax.train.grpo.host_state import PersistentRescueBuffer

    old_row = {"response_br": ["<i4", [5, 6, 0]], "truncated_b": ["|b1", True], "rewards": ["<f4", 1.0]}
    buffer = PersistentRescueBuffer(2, rewards_key="correct_b")
    buffer.load_json([["a", old_row], ["b", {**old_row, "truncated_b": ["|b1", False]}]])
    stored = buffer.to_json()
    assert sorted(stored[0][1]) == ["finish_b", "response_br", "rewards_b"]
    assert stored[0][1]["finish_b"][1] == FINISH_LENGTH and stored[1][1]["finish_b"][1] == FINISH_EOS
    assert stored[0][1]["rewards_b"][1] == 1.0
