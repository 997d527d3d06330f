"""The engine on a mesh of its own (`rollout.mesh`, `rollout.devices`), on 8 fake CPU devices (in a subprocess:
the suite runs on 1). Training shards over (fsdp=4, tensor=2); the engine runs on (data=2, tensor=4) over
the same devices, and on a disjoint 4 + 4 split. The one resharding transfer gives the training params
exactly, laid out on the engine's mesh; the engine's rollouts equal the single-device run; and new
weights compile nothing after warm-up."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
import pytest

from polaris_jax.sampling.engine import Engine
from polaris_jax.sampling.engine_settings import EngineSettings
from polaris_jax.sampling.requests import Request
from tests.fake_devices import run_on_8_devices

SETTINGS = EngineSettings(max_slots=8, num_pages=64, page_size=8, max_seq_len=96, prefill_chunk=16, decode_block=4)
LAYOUTS = {
    "shared": (dict(fsdp=4, tensor=2), dict(data=2, tensor=4)),
    "disjoint": (dict(fsdp=2, tensor=2), dict(data=2, tensor=2)),
}


def _config(devices: str) -> ml_collections.ConfigDict:
    train, rollout = LAYOUTS[devices]
    rollout = dict(mesh=rollout, devices=devices, backend="engine", length_spread=0.0)
    return ml_collections.ConfigDict(dict(mesh=train, rollout=rollout))


def _requests(model) -> list[Request]:
    greedy = [Request(p, max_new_tokens=24, temperature=0.0, id=i) for i, p in enumerate(model.prompts)]
    return greedy + [Request(model.prompts[0], max_new_tokens=16, temperature=1.0, top_p=0.95, n=2, seed=4, id="s")]


def _tokens(completions) -> list[list[int]]:
    return [c.tokens for per_request in completions for c in per_request]


def mesh_run(devices: str) -> dict:
    """Runs inside the subprocess."""

    from polaris_jax.models import param_shardings
    from polaris_jax.models.sharding import DEFAULT_RULES, shard_params
    from polaris_jax.train.grpo.rollout_mesh import ParamsMover, check_rollout_section, meshes
    from tests.sampling.conftest import compilations, golden

    model = golden("qwen3_tied")
    config = _config(devices)
    with config.unlocked():
        config.rollout.update(max_prompts_in_flight=1, prompts_per_step=1, max_steps_per_response=1, max_staleness=0)
    check_rollout_section(config)
    train_mesh, engine_mesh = meshes(config)
    train_params = shard_params(model.params, param_shardings(model.config, train_mesh))
    mover = ParamsMover(model.config, engine_mesh, DEFAULT_RULES)
    moved = mover(train_params)
    same = jax.tree.leaves(
        jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))), moved, model.params)
    )
    on_engine = {x.sharding.mesh == engine_mesh for x in jax.tree.leaves(moved)}
    engine = Engine(model.config, moved, SETTINGS, mesh=engine_mesh)
    engine.warmup()
    first = engine.run(_requests(model))
    scaled = jax.jit(lambda p: jax.tree.map(lambda x: x * 1.01, p))(train_params)  # built before counting
    with compilations() as compiled:
        engine.update_params(mover(scaled), version=1)
        second = engine.run(_requests(model))
    engine.pool.check_full()
    return dict(
        devices=jax.device_count(),
        train_devices=sorted(d.id for d in train_mesh.devices.flat),
        engine_devices=sorted(d.id for d in engine_mesh.devices.flat),
        equal_params=all(same),
        on_engine_mesh=sorted(on_engine),
        first=_tokens(first),
        logprobs=[c.logprobs for per_request in first for c in per_request],
        second=_tokens(second),
        second_versions=sorted({v for per in second for c in per for v in c.versions}),
        compiled=compiled,
    )


def _subprocess(devices: str) -> dict:
    return run_on_8_devices("tests.train.grpo.test_rollout_mesh", f"mesh_run({devices!r})", timeout=600)


@pytest.mark.slow  # ~30 s on 8 fake devices; CI's slow tier runs it
def test_the_engine_on_its_own_mesh_equals_one_device():
    from tests.sampling.conftest import golden

    model = golden("qwen3_tied")
    single = Engine(model.config, model.params, SETTINGS).run(_requests(model))
    scaled = Engine(model.config, jax.tree.map(lambda x: x * 1.01, model.params), SETTINGS).run(_requests(model))
    for devices in LAYOUTS:
        result = _subprocess(devices)
        assert result["devices"] == 8
        if devices == "shared":
            assert result["train_devices"] == result["engine_devices"] == list(range(8))
        else:
            assert result["train_devices"] == [0, 1, 2, 3] and result["engine_devices"] == [4, 5, 6, 7]
        assert result["equal_params"] and result["on_engine_mesh"] == [True], devices
        assert result["first"] == _tokens(single), devices
        for row, c in zip(result["logprobs"], [c for per in single for c in per]):
            np.testing.assert_allclose(row, c.logprobs, rtol=1e-4, atol=1e-4)
        assert result["second"] == _tokens(scaled) and result["second_versions"] == [1], devices
        assert result["compiled"] == [], f"{devices}: compiled after warm-up on new weights: {result['compiled']}"


def moe_sync_run() -> dict:
    """Runs inside the subprocess: LoRA on a tiny MoE, learner on fsdp=4 (devices 0-3), engine on expert=4
    (devices 4-7). The first push moves everything, each expert weight a quarter per engine device; the next
    moves only the adapters, and the engine's params equal the learner's both times."""
    from polaris_jax.models import ModelConfig, init_params, lora, param_shardings
    from polaris_jax.models.sharding import DEFAULT_RULES, make_mesh, shard_params
    from polaris_jax.train.grpo.rollout_mesh import ParamsMover

    devices = jax.devices()
    config = ModelConfig.tiny("qwen3_moe", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)
    lora_config, params = lora.add_lora(config, init_params(config, jax.random.key(0)), jax.random.key(1), rank=4)
    mask = lora.lora_mask(params)
    train_mesh, engine_mesh = make_mesh({"fsdp": 4}, devices[:4]), make_mesh({"expert": 4}, devices[4:])
    train_params = shard_params(params, param_shardings(lora_config, train_mesh))
    mover = ParamsMover(lora_config, engine_mesh, DEFAULT_RULES, trainable_mask=mask)

    def equal(moved, want):
        return all(
            bool(np.array_equal(np.asarray(a), np.asarray(b)))
            for a, b in zip(jax.tree.leaves(moved), jax.tree.leaves(want))
        )

    first = mover(train_params)
    first_sync = dict(mover.last)
    experts = first["moe_layers"]["gate"]
    per_device = {s.device.id: s.data.nbytes for s in experts.addressable_shards}
    stepped = jax.tree.map(lambda x, m: x * 1.5 if m else x, train_params, mask)
    second = mover(stepped)
    nbytes = lambda tree, keep: float(
        sum(x.nbytes for x, m in zip(jax.tree.leaves(tree), jax.tree.leaves(mask)) if keep(m))
    )
    return dict(
        first_equal=equal(first, train_params),
        second_equal=equal(second, stepped),
        first_sync=first_sync,
        second_sync=dict(mover.last),
        all_bytes=nbytes(params, lambda m: True),
        adapter_bytes=nbytes(params, lambda m: m),
        expert_bytes=float(experts.nbytes),
        expert_bytes_per_device=sorted(set(per_device.values())),
        expert_devices=sorted(per_device),
    )


def test_moe_weight_sync_moves_expert_shards_and_then_only_the_adapters():
    r = run_on_8_devices("tests.train.grpo.test_rollout_mesh", "moe_sync_run()", timeout=300)
    assert r["first_equal"] and r["second_equal"]
    assert r["expert_devices"] == [4, 5, 6, 7]
    assert r["expert_bytes_per_device"] == [r["expert_bytes"] / 4]  # split, never whole on one device
    assert r["first_sync"]["engine/weight_sync_bytes"] == r["all_bytes"]
    assert r["second_sync"]["engine/weight_sync_bytes"] == r["adapter_bytes"] < r["all_bytes"] / 4
    assert 0 < r["second_sync"]["engine/weight_sync_device_bytes_max"] <= r["adapter_bytes"]
    assert r["first_sync"]["engine/weight_sync_device_bytes_max"] < r["all_bytes"]
    assert r["first_sync"]["engine/weight_sync_s"] > 0
