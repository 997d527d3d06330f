"""Router replay: the engine records the experts of every token it feeds, and the GRPO forward routed through
them gives the engine's own behaviour logprobs, on an MoE model whose router has near-ties (two experts'
router columns 1e-7 apart, so float rounding decides between them). Re-routing in the training forward
flips some of those choices and moves the logprobs by whole nats; on a router without ties both agree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polaris_jax.models import ModelConfig, init_params
from polaris_jax.rollout import _routed_experts
from polaris_jax.sampling.engine import Engine
from polaris_jax.sampling.engine_settings import EngineSettings
from polaris_jax.sampling.requests import Request, to_sample_output
from polaris_jax.train.grpo import step as grpo_step
from polaris_jax.train.grpo.packing import pack_update_batch, to_responses
from tests.train.grpo import grpo_helpers

NEW = 24
CONFIG = ModelConfig.tiny(
    "qwen3_moe", vocab_size=32, num_layers=3, mlp_only_layers=(1,), num_experts=2, num_experts_per_tok=1
)
SETTINGS = EngineSettings(
    max_slots=8, num_pages=96, page_size=8, max_seq_len=64, prefill_chunk=16, decode_block=4, record_experts=True
)
PROMPTS = [
    [3, 7, 1, 9, 4],
    [2, 8, 8, 5, 1, 6, 3, 2, 9],
    [11, 4, 6, 1, 2, 7, 5, 3, 10, 12, 8, 2, 6],
    [5, 5, 9, 2, 7, 1, 4],
]


def _params(router_gap: float):
    """Expert 1's router column is expert 0's plus `router_gap` times noise: a near-tie when the gap is tiny."""
    params = init_params(CONFIG, jax.random.key(1), std=0.3)
    router = params["moe_layers"]["router"]
    noise = jax.random.normal(jax.random.key(9), router[..., 0].shape)
    params["moe_layers"]["router"] = router.at[..., 1].set(router[..., 0] + router_gap * noise)
    return params


def _rollout(params):
    """The engine's samples as the update's batch (2 samples per prompt), with the recorded experts."""
    requests = [Request(p, max_new_tokens=NEW, temperature=1.0, n=2, seed=i, id=i) for i, p in enumerate(PROMPTS)]
    out = to_sample_output(Engine(CONFIG, params, SETTINGS).run(requests), NEW)
    width = max(map(len, PROMPTS))
    prompt_len_b = np.repeat([len(p) for p in PROMPTS], 2).astype(np.int32)
    prompt_bt = np.zeros((len(prompt_len_b), width), np.int32)
    for b, p in enumerate(np.repeat(np.arange(len(PROMPTS)), 2)):
        prompt_bt[b, width - len(PROMPTS[p]) :] = PROMPTS[p]
    rollouts = grpo_helpers.random_rollout(0, rows=len(prompt_len_b), prompt=width, response=NEW).replace(
        prompt_bt=prompt_bt,
        prompt_len_b=prompt_len_b,
        response_br=out.tokens_br,
        response_len_b=out.lengths_b,
        sampler_logprobs_br=out.logprobs_br,
        routed_experts_btlk=_routed_experts([out], prompt_len_b, width),
    )
    batch = grpo_step.update_batch(rollouts, np.zeros(rollouts.rows, np.float32), np.ones_like(out.logprobs_br))
    return rollouts, batch


def _logprob_gaps(params, batch, packed: bool = False) -> dict:
    """Max |training logprob - engine logprob| over response tokens, with and without replay; `packed`:
    through a packed update's forward (several sequences per row, the experts moved with their tokens, the
    logprobs gathered back to the response layout)."""
    settings = grpo_helpers.settings(pack_tokens=2 * batch.tokens_bt.shape[1] if packed else 0)
    mask = batch.mask_br > 0
    gaps = {}
    for name, b in (("replay", batch), ("reroute", batch.replace(routed_experts_btlk=None))):
        if packed:
            b = pack_update_batch(b, row_tokens=settings.pack_tokens, minibatches=1, microbatches=1)
            assert b.tokens_mkl.shape[1] < batch.tokens_bt.shape[0], "no two sequences share a row"
            assert (b.routed_experts_mklk is None) == (name == "reroute")
        logprobs_br = jax.jit(lambda p, b: _logprobs(p, b, settings, packed))(params, jax.tree.map(jnp.asarray, b))
        gaps[name] = float(np.max(np.abs(np.asarray(logprobs_br) - batch.sampler_logprobs_br)[mask]))
    return gaps


def _logprobs(params, batch, settings, packed: bool):
    if not packed:
        return grpo_step.response_stats(CONFIG, params, batch, settings)["logprobs"]
    _, rows = grpo_step._packed_inputs(batch, settings)
    rows = jax.tree.map(lambda x: x[0], rows)
    lp_kl = grpo_step._packed_stats(CONFIG, params, rows, settings)["logprobs"]
    return to_responses(lp_kl, rows["row_ids"], batch.flat_index_br, 1)[0]


@pytest.fixture(scope="module")
def near_tie():
    params = _params(1e-7)
    return params, *_rollout(params)


def test_replay_gives_the_engines_logprobs_where_rerouting_does_not(near_tie):
    params, _, batch = near_tie
    gaps = _logprob_gaps(params, batch)
    assert gaps["replay"] < 1e-4, gaps
    assert gaps["reroute"] > 0.5, gaps  # flipped near-ties: the mismatch replay exists to remove


def test_packed_replay_gives_the_engines_logprobs(near_tie):
    params, _, batch = near_tie
    gaps = _logprob_gaps(params, batch, packed=True)
    assert gaps["replay"] < 1e-4, gaps
    assert gaps["reroute"] > 0.5, gaps


def test_without_ties_rerouting_agrees_with_the_engine():
    params = _params(0.3)
    gaps = _logprob_gaps(params, _rollout(params)[1])
    assert gaps["replay"] < 1e-4 and gaps["reroute"] < 1e-4, gaps


def test_recorded_experts_cover_every_fed_token_and_nothing_else(near_tie):
    _, rollouts, batch = near_tie
    routed = rollouts.routed_experts_btlk
    width = rollouts.prompt_bt.shape[1]
    assert routed.shape == (rollouts.rows, width + NEW, CONFIG.num_layers_of("moe"), 1), routed.shape
    for b in range(rollouts.rows):
        fed = np.zeros(width + NEW, bool)
        # every prompt token, then every response token but the last (it is never fed back)
        fed[width - rollouts.prompt_len_b[b] : width + rollouts.response_len_b[b] - 1] = True
        assert np.all(routed[b][fed] >= 0) and np.all(routed[b][~fed] == -1), b
        assert set(np.unique(routed[b][fed])) <= {0, 1}
    assert batch.routed_experts_btlk is routed
