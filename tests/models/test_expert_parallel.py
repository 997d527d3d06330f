"""Expert parallelism (models.moe): a Qwen3-MoE with a dense layer mixed in, experts split over expert=4 of 8
fake CPU devices (fsdp=2), equals the same model on one device in float32: logits and every SFT gradient,
the GRPO update (SGD, so the new params compare the gradients), and the paged engine's greedy tokens and
logprobs; with and without norm_topk_prob. The compiled step exchanges tokens by all-to-all, and an
expert axis that does not divide the experts is refused while tracing, before compile."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from polaris_jax.models.config import ModelConfig
from tests.fake_devices import run_on_8_devices

VOCAB, ROWS, LENGTH = 32, 8, 32
FAST_COMPILE = {"xla_backend_optimization_level": 0}
_REFERENCES = {}  # one-device SFT results per config (in the worker)


def moe_config(norm_topk_prob: bool = True, **overrides) -> ModelConfig:
    shape = dict(vocab_size=VOCAB, num_layers=3, mlp_only_layers=(1,), num_experts=8, num_experts_per_tok=2)
    return ModelConfig.tiny("qwen3_moe", **{**shape, "norm_topk_prob": norm_topk_prob, **overrides})


def sft_batch(seed: int = 0, rows: int = ROWS) -> dict:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, VOCAB, (rows, LENGTH)).astype(np.int32)
    lengths = rng.integers(LENGTH // 2, LENGTH + 1, rows)
    segments = (np.arange(LENGTH)[None] < lengths[:, None]).astype(np.int32)
    positions = np.maximum(np.cumsum(segments, axis=1) - 1, 0).astype(np.int32)
    targets = np.roll(tokens, -1, axis=1)
    loss_mask = segments * (np.arange(LENGTH)[None] < lengths[:, None] - 1)
    return dict(
        tokens_bt=tokens, positions_bt=positions, segment_ids_bt=segments, targets_bt=targets, loss_mask_bt=loss_mask
    )


def _max_error(a, b) -> float:
    import jax

    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def _sft(config, mesh, split_config=None, rows: int = ROWS) -> dict:
    """SFT logits, loss and grads of `split_config` (default: `config`) under the mesh against `config` on one
    device, plus the split run's routing metrics."""
    import jax

    from polaris_jax.models import forward, init_params, moe, param_shardings
    from polaris_jax.models.sharding import DEFAULT_RULES, activation_sharding
    from polaris_jax.train import losses, partitioning

    batch = sft_batch(rows=rows)
    params = init_params(config, jax.random.key(0), std=0.1)
    if config.lora_rank:  # B factors start at zero; give them values so every factor has a gradient
        params = jax.tree_util.tree_map_with_path(
            lambda path, x: x + 0.1 if "lora_b" in jax.tree_util.keystr(path) else x, params
        )

    def run(config, p, b):
        logits, _, aux = forward(
            config, p, b["tokens_bt"], b["positions_bt"], segment_ids_bt=b["segment_ids_bt"], return_aux=True
        )
        loss, grads = jax.value_and_grad(lambda q: losses.sft_loss(config, q, b)[0])(p)
        return logits, loss, grads, moe.routing_metrics(aux["router"])

    def split(p, b):
        with activation_sharding(mesh, DEFAULT_RULES):
            return run(split_config or config, p, b)

    if (config, rows) not in _REFERENCES:
        reference_fn = jax.jit(functools.partial(run, config), compiler_options=FAST_COMPILE)
        _REFERENCES[config, rows] = reference_fn(params, batch)
    reference = _REFERENCES[config, rows]
    sharded_params = jax.device_put(params, param_shardings(config, mesh))
    shardings = partitioning.batch_shardings(mesh, DEFAULT_RULES, (rows, LENGTH))
    sharded_batch = {k: jax.device_put(v, shardings[k]) for k, v in batch.items()}
    compiled = jax.jit(split, compiler_options=FAST_COMPILE).lower(sharded_params, sharded_batch).compile()
    logits, loss, grads, routing = compiled(sharded_params, sharded_batch)
    valid = batch["segment_ids_bt"].astype(bool)
    return dict(
        logits_error=float(np.max(np.abs(np.asarray(logits)[valid] - np.asarray(reference[0])[valid]))),
        loss=float(loss),
        reference_loss=float(reference[1]),
        grad_error=_max_error(grads, reference[2]),
        grad_scale=max(float(np.max(np.abs(np.asarray(g)))) for g in jax.tree.leaves(reference[2])),
        expert_grad_spec=str(grads["moe_layers"]["gate"].sharding.spec),
        all_to_all="all-to-all" in compiled.as_text(),
        routing={k: float(v) for k, v in routing.items()},
        reference_routing={k: float(v) for k, v in reference[3].items()},
    )


def _grpo(config, mesh) -> dict:
    import jax

    from polaris_jax.models import make_mesh
    from tests.train.grpo import grpo_helpers

    settings = grpo_helpers.settings()
    batch = grpo_helpers.host_update_batch(3, rows=ROWS)
    out = {}
    for name, m in (("one", make_mesh({"fsdp": 1}, jax.devices()[:1])), ("ep", mesh)):
        update, state, shardings, _ = grpo_helpers.make_update(
            settings, mesh=m, rows=ROWS, model_config=config, sgd=True
        )
        from polaris_jax.train.grpo import step as grpo_step

        state, metrics = update(state, grpo_step.put_update_batch(batch, shardings), jax.random.key(0), None)
        out[name] = (jax.device_get(state["params"]), float(metrics["loss"]))
    return dict(param_error=_max_error(out["one"][0], out["ep"][0]), loss=out["ep"][1], reference_loss=out["one"][1])


def _engine(config, mesh) -> dict:
    import jax

    from polaris_jax.models import init_params, param_shardings
    from polaris_jax.models.sharding import shard_params
    from polaris_jax.sampling.engine import Engine
    from polaris_jax.sampling.engine_settings import EngineSettings
    from polaris_jax.sampling.requests import Request

    settings = EngineSettings(max_slots=8, num_pages=64, page_size=8, max_seq_len=64, prefill_chunk=16, decode_block=4)
    params = init_params(config, jax.random.key(1), std=0.1)
    rng = np.random.default_rng(5)
    requests = lambda: [
        Request(rng_prompt.tolist(), max_new_tokens=12, temperature=0.0, id=i) for i, rng_prompt in enumerate(prompts)
    ]
    prompts = [rng.integers(1, VOCAB, n) for n in (3, 9, 17, 5, 11)]
    one = Engine(config, params, settings).run(requests())
    ep = Engine(config, shard_params(params, param_shardings(config, mesh)), settings, mesh=mesh).run(requests())
    flat = lambda runs: [c for per_request in runs for c in per_request]
    return dict(
        tokens_equal=[a.tokens == b.tokens for a, b in zip(flat(one), flat(ep))],
        logprob_error=max(
            float(np.max(np.abs(np.subtract(a.logprobs, b.logprobs)))) for a, b in zip(flat(one), flat(ep))
        ),
    )


def _bad_split() -> str:
    import jax

    from polaris_jax.models import init_params, make_mesh
    from polaris_jax.models.sharding import DEFAULT_RULES, activation_sharding
    from polaris_jax.train import losses

    config = moe_config(num_experts=6)
    params = init_params(config, jax.random.key(0), std=0.1)

    def split(p, b):
        with activation_sharding(make_mesh({"fsdp": 2, "expert": 4}), DEFAULT_RULES):
            return losses.sft_loss(config, p, b)[0]

    try:
        jax.jit(split).trace(params, sft_batch())
    except Exception as error:  # noqa: BLE001 - the message is what the test checks
        return f"{type(error).__name__}: {error}"
    return "no error"


def worker(part: str) -> dict:
    """`default`: SFT, GRPO and the engine with norm_topk_prob, capacity, a bad split; `slow`: the same three
    without norm_topk_prob, expert LoRA, and rows every EP device holds."""
    import jax

    from polaris_jax.models import make_mesh

    jax.config.update("jax_default_matmul_precision", "highest")
    mesh = make_mesh({"fsdp": 2, "expert": 4})
    config = moe_config(True)
    if part == "slow":
        no_norm = moe_config(False)
        return {
            "norm=False": dict(sft=_sft(no_norm, mesh), grpo=_grpo(no_norm, mesh), engine=_engine(no_norm, mesh)),
            # LoRA on attention, MLP and the experts (Tinker's layout: the hidden-size factor shared by experts).
            "lora": _sft(config.replace(lora_rank=4, lora_alpha=8.0), mesh),
            # 2 rows do not split over the 8 batch shards: every EP device holds them and dispatches 1/EP.
            "unsplit_rows": _sft(config, mesh, rows=2),
        }
    return {
        "norm=True": dict(sft=_sft(config, mesh), grpo=_grpo(config, mesh), engine=_engine(config, mesh)),
        # E/k = 4: every expert can take every token of its source device, so nothing is dropped.
        "capacity=4": _sft(config, mesh, config.replace(moe_capacity_factor=4.0)),
        "capacity=0.5": _sft(config, mesh, config.replace(moe_capacity_factor=0.5)),
        # 32 tokens per device dispatched in runs of 24: two runs, the second half padding.
        "dispatch_runs": _sft(config, mesh, config.replace(moe_dispatch_tokens=24)),
        "bad_split": _bad_split(),
    }


@pytest.fixture(scope="module")
def results() -> dict:
    return run_on_8_devices("tests.models.test_expert_parallel", "worker('default')")


@pytest.fixture(scope="module")
def slow_results() -> dict:
    return run_on_8_devices("tests.models.test_expert_parallel", "worker('slow')")


def _check_sft(sft):
    assert sft["all_to_all"], "the compiled step has no all-to-all: tokens did not move to their experts"
    assert "expert" in sft["expert_grad_spec"], sft["expert_grad_spec"]
    assert sft["logits_error"] < 1e-4, sft
    assert abs(sft["loss"] - sft["reference_loss"]) < 1e-5, sft
    assert sft["grad_error"] < 1e-5 * max(sft["grad_scale"], 1.0), sft


def _check_grpo(grpo):
    assert abs(grpo["loss"] - grpo["reference_loss"]) < 1e-5, grpo
    assert grpo["param_error"] < 1e-6, grpo


def _check_engine(engine):
    assert all(engine["tokens_equal"]), engine
    assert engine["logprob_error"] < 1e-4, engine


@pytest.mark.slow  # one ~80 s 8-device subprocess for all four; CI's slow tier runs it
def test_ep4_equals_one_device_on_logits_sft_gradients_the_grpo_update_and_in_the_engine(results):
    _check_sft(results["norm=True"]["sft"])
    _check_grpo(results["norm=True"]["grpo"])
    _check_engine(results["norm=True"]["engine"])


@pytest.mark.slow
def test_the_same_without_norm_topk_prob(slow_results):
    _check_sft(slow_results["norm=False"]["sft"])
    _check_grpo(slow_results["norm=False"]["grpo"])
    _check_engine(slow_results["norm=False"]["engine"])


@pytest.mark.slow
def test_routing_metrics_are_the_one_device_metrics_and_nothing_is_dropped(results):
    sft = results["norm=True"]["sft"]
    for name, value in sft["reference_routing"].items():
        assert abs(sft["routing"][name] - value) < 1e-6, (name, sft["routing"], sft["reference_routing"])
    routing = sft["routing"]
    assert routing["moe_dropped"] == 0.0
    assert 0.0 < routing["moe_min_load"] <= 1.0 <= routing["moe_max_load"], routing
    assert 0.0 < routing["moe_experts_used"] <= 1.0 and 0.0 <= routing["moe_oversubscription"] < 1.0, routing


@pytest.mark.slow
def test_a_capacity_factor_holding_every_pair_equals_dropless_and_a_small_one_drops(results):
    full, small = results["capacity=4"], results["capacity=0.5"]
    assert full["all_to_all"] and full["routing"]["moe_dropped"] == 0.0, full
    assert full["logits_error"] < 1e-4 and full["grad_error"] < 1e-5 * max(full["grad_scale"], 1.0), full
    # Half the even share per expert and source: at least half of the pairs cannot fit.
    assert small["routing"]["moe_dropped"] >= 0.5, small["routing"]
    assert small["logits_error"] > 1e-3, small


@pytest.mark.slow
def test_dropless_dispatch_in_runs_of_tokens_equals_one_device(results):
    _check_sft(results["dispatch_runs"])
    assert results["dispatch_runs"]["routing"]["moe_dropped"] == 0.0


@pytest.mark.slow
def test_expert_lora_in_tinkers_layout_under_ep4_equals_one_device(slow_results):
    lora = slow_results["lora"]
    assert lora["logits_error"] < 1e-4, lora
    assert lora["grad_error"] < 1e-5 * max(lora["grad_scale"], 1.0), lora


@pytest.mark.slow
def test_rows_every_ep_device_holds_are_split_between_them_and_still_equal_one_device(slow_results):
    unsplit = slow_results["unsplit_rows"]
    assert unsplit["all_to_all"] and unsplit["routing"]["moe_dropped"] == 0.0, unsplit
    assert unsplit["logits_error"] < 1e-4, unsplit
    assert unsplit["grad_error"] < 1e-5 * max(unsplit["grad_scale"], 1.0), unsplit


@pytest.mark.slow
def test_an_expert_axis_not_dividing_the_experts_is_refused_before_compile(results):
    message = results["bad_split"]
    assert message.startswith("ConfigError"), message
    assert "num_experts=6" in message and "4 devices" in message, message
