"""The continuous-batching engine: transformers' greedy tokens with requests arriving in waves, the same samples
alone or among 63 others, agreement with `generate`, the memory bound, preemption, abort and partial rollouts,
live weights, streaming, back-pressure and bad requests. Every test ends with the page pool full again."""

import jax
import numpy as np
import pytest

from polaris_jax.sampling import generate
from polaris_jax.sampling.engine import Engine
from polaris_jax.sampling.engine_settings import EngineSettings
from polaris_jax.sampling.requests import QueueFull, Request, RequestError
from tests.sampling.conftest import golden

# Small pages, a short chunk and few slots so prompts prefill over several steps, requests queue, and forks
# copy partly filled pages. One settings object: every test reuses the same compiled programs.
SMALL = EngineSettings(max_slots=8, num_pages=96, page_size=8, max_seq_len=128, prefill_chunk=16, decode_block=4)


def engine_for(model, settings=SMALL, params=None) -> Engine:
    return Engine(model.config, model.params if params is None else params, settings)


def finish(engine: Engine, check_memory: bool = False) -> list:
    """Steps until idle; with check_memory, asserts after every step that the pages held stay within the live
    tokens rounded up to pages plus one page per slot. Returns every step's deltas."""
    deltas = []
    while engine.busy:
        deltas += engine.step()
        if check_memory:
            pool = engine.pool
            live = [pool.pages_for(pool.length(seq)) for seq in pool.sequences]
            assert pool.num_used <= sum(live) + len(live), engine.last_metrics
    engine.pool.check_full()
    return deltas


@pytest.mark.parametrize("name", ["qwen2", "qwen3_tied", "qwen3_moe"])
def test_greedy_matches_transformers_in_waves(name):
    """18 requests (the golden prompts, some with n=2) arrive in three waves while others decode."""
    model = golden(name)
    engine = engine_for(model)
    max_new = len(model.new_ids[0])
    waves, expected = [], {}
    for wave in range(3):
        requests = []
        for i in range(6):
            p = (wave * 6 + i) % len(model.prompts)
            request = Request(
                model.prompts[p], max_new_tokens=max_new, temperature=0.0, n=1 + (i % 3 == 0), id=(wave, i)
            )
            requests.append(request)
            expected[request.id] = model.new_ids[p]
        waves.append(requests)
    for wave in waves:
        for request in wave:
            engine.submit(request)
        for _ in range(5):
            engine.step()
    finish(engine)
    assert len(expected) >= 16
    for request_id, tokens in expected.items():
        for completion in engine.pop_finished(request_id):
            assert completion.tokens == tokens, f"{name} request {request_id} sample {completion.sample}"
            assert completion.finish_reason == "length"


def _crowd(rng, vocab: int, count: int) -> list[Request]:
    """Requests of ragged prompts and lengths with mixed settings."""
    out = []
    for i in range(count):
        out.append(
            Request(
                rng.randint(1, vocab, size=rng.randint(1, 40)).tolist(),
                max_new_tokens=int(rng.randint(1, 60)),
                temperature=float(rng.choice([0.0, 0.7, 1.0])),
                top_p=float(rng.choice([1.0, 0.9])),
                top_k=int(rng.choice([0, 5])),
                n=int(rng.randint(1, 4)),
                seed=i,
                id=f"crowd-{i}",
            )
        )
    return out


def test_sampled_alone_equals_among_63_others(tied):
    target = Request(tied.prompts[1], max_new_tokens=48, temperature=1.0, top_p=0.9, top_k=20, n=3, seed=11, id="me")
    alone = engine_for(tied).run([target])[0]
    crowd = _crowd(np.random.RandomState(0), tied.config.vocab_size, 63)
    engine = engine_for(tied)
    for request in crowd[:40] + [target] + crowd[40:]:
        engine.submit(request)
    finish(engine, check_memory=True)
    among = engine.pop_finished("me")
    assert len({tuple(c.tokens) for c in alone}) == 3  # three different samples: this is not greedy
    for a, b in zip(alone, among):
        assert a.tokens == b.tokens
        np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-5, atol=1e-5)
    assert engine.totals["max_pages_used"] > 0


@pytest.mark.parametrize(
    "sampling",
    [dict(temperature=0.0), dict(temperature=0.8), dict(temperature=1.0, top_p=0.9), dict(temperature=1.0, min_p=0.1)],
    ids=["greedy", "temperature", "top_p", "min_p"],
)
def test_agrees_with_generate(tied, sampling):
    """Request i with sample_offset i·n draws generate's keys for prompt i: same tokens, same logprobs."""
    n, max_new = 2, 24
    out = generate(tied.config, tied.params, tied.prompts, max_new_tokens=max_new, n=n, seed=3, **sampling)
    requests = [
        Request(p, max_new_tokens=max_new, n=n, seed=3, sample_offset=i * n, id=i, **sampling)
        for i, p in enumerate(tied.prompts)
    ]
    engine = engine_for(tied)
    completions = [c for per_request in engine.run(requests) for c in per_request]
    engine.pool.check_full()
    assert [c.tokens for c in completions] == out.tokens
    for c, expected in zip(completions, out.logprobs):
        np.testing.assert_allclose(c.logprobs, expected, rtol=1e-5, atol=1e-5)
    assert [c.finish_reason for c in completions] == out.finish_reasons


def test_all_greedy_calls_take_the_fused_argmax_kernel_with_generates_tokens_and_logprobs(tied, monkeypatch):
    """On CPU the engine's lm_head is packed, and a decode call whose rows are all greedy reduces each row's
    logits inside `cpu_gemm.greedy_logprob` (never writing them): generate's tokens and logprobs again. Rows
    that want no logprobs (a serving client's default) take its argmax-only variant: the same tokens."""
    from polaris_jax.models import cpu_gemm

    if not cpu_gemm.available():
        pytest.skip("needs the CPU backend and a C++ compiler")
    traced = []
    fused = cpu_gemm.greedy_logprob
    monkeypatch.setattr(cpu_gemm, "greedy_logprob", lambda *args: traced.append(args) or fused(*args))
    # Another (equivalent) config: the decode program is traced afresh, so the spy sees it.
    config = tied.config.replace(max_position_embeddings=tied.config.max_position_embeddings + 1)
    out = generate(config, tied.params, tied.prompts, max_new_tokens=16, temperature=0.0)
    engine = Engine(config, tied.params, SMALL)
    completions = [
        c for per in engine.run([Request(p, max_new_tokens=16, temperature=0.0) for p in tied.prompts]) for c in per
    ]
    engine.pool.check_full()
    assert traced, "the greedy decode never took the fused kernel"
    assert [c.tokens for c in completions] == out.tokens
    for c, expected in zip(completions, out.logprobs):
        np.testing.assert_allclose(c.logprobs, expected, rtol=1e-5, atol=1e-5)
    quiet = [Request(p, max_new_tokens=16, temperature=0.0, logprobs=False) for p in tied.prompts]
    quiet_completions = [c for per in engine.run(quiet) for c in per]
    engine.pool.check_full()
    assert [c.tokens for c in quiet_completions] == out.tokens
    # The decode calls' logprobs were skipped (the prefill's first token still has one).
    assert all(np.isnan(c.logprobs[1:]).all() for c in quiet_completions)


def test_eos_and_stop_sequences_match_generate(tied):
    eos, stop = (tied.new_ids[0][4],), ([tied.new_ids[1][5], tied.new_ids[1][6]],)
    kwargs = dict(max_new_tokens=40, temperature=0.0, eos_token_ids=eos, stop_sequences=stop)
    out = generate(tied.config, tied.params, tied.prompts, **kwargs)
    engine = engine_for(tied)
    completions = engine.run([Request(p, id=i, **kwargs) for i, p in enumerate(tied.prompts)])
    engine.pool.check_full()
    assert [c[0].tokens for c in completions] == out.tokens
    assert [c[0].finish_reason for c in completions] == out.finish_reasons
    assert {"eos", "stop"} <= set(out.finish_reasons)


def test_preemption_keeps_outputs(tied):
    """A pool too small for every admitted sample preempts the newest and re-prefills them later: the
    outputs equal a roomy engine's, and the pool ends full."""
    requests = _crowd(np.random.RandomState(1), tied.config.vocab_size, 12)
    roomy = engine_for(tied).run(requests)
    tight = engine_for(tied, EngineSettings(**{**SMALL.__dict__, "num_pages": 24}))
    for request in requests:
        tight.submit(request)
    finish(tight, check_memory=True)
    assert tight.totals["preemptions"] > 0
    for request, expected in zip(requests, roomy):
        assert [c.tokens for c in tight.pop_finished(request.id)] == [c.tokens for c in expected]


def test_abort_frees_pages_and_partial_rollouts_resume(tied):
    request = Request(tied.prompts[0], max_new_tokens=40, temperature=1.0, n=2, seed=5, id="r")
    full = engine_for(tied).run([request])[0]
    engine = engine_for(tied)
    engine.submit(request)
    engine.submit(Request(tied.prompts[2], max_new_tokens=30, temperature=0.0, id="other"))
    for _ in range(4):
        engine.step()
    partial = engine.abort("r")
    assert all(c.finish_reason is None and 0 < len(c.tokens) < 40 for c in partial)
    assert not any(seq[0] == "r" for seq in engine.pool.sequences)
    for c in partial:
        engine.submit(c.resume(id=("resumed", c.sample)))
    finish(engine)
    assert engine.pop_finished("other")[0].tokens == tied.new_ids[2][:30]
    for c in partial:
        (rest,) = engine.pop_finished(("resumed", c.sample))
        assert c.tokens + rest.tokens == full[c.sample].tokens
        np.testing.assert_allclose(c.logprobs + rest.logprobs, full[c.sample].logprobs, rtol=1e-5, atol=1e-5)


def test_live_weights_and_token_versions(tied):
    engine = engine_for(tied)
    engine.submit(Request(tied.prompts[0], max_new_tokens=32, temperature=0.0, id="r"))
    for _ in range(3):
        engine.step()
    changed = jax.tree.map(lambda p: p * 1.5, tied.params)
    engine.update_params(changed, version=7)
    finish(engine)
    (c,) = engine.pop_finished("r")
    cut = c.versions.index(7)
    assert 0 < cut < 32 and set(c.versions[:cut]) == {0} and set(c.versions[cut:]) == {7}
    assert c.tokens[:cut] == tied.new_ids[0][:cut]
    # The rest comes from the new weights (over the cache the old ones wrote, as in PipelineRL), so it leaves
    # the old weights' greedy path.
    assert c.tokens[cut:] != tied.new_ids[0][cut:32]


def test_streaming_deltas_add_up(tied):
    engine = engine_for(tied)
    engine.submit(Request(tied.prompts[1], max_new_tokens=21, temperature=0.7, n=2, seed=2, id="s"))
    deltas = finish(engine)
    completions = engine.pop_finished("s")
    for c in completions:
        mine = [d for d in deltas if d.sample == c.sample]
        assert sum((d.tokens for d in mine), []) == c.tokens
        assert [d.finish_reason for d in mine][-1] == "length" and all(d.finish_reason is None for d in mine[:-1])
        assert len(mine) > 3  # tokens arrive over several steps


def test_queue_back_pressure_and_bad_requests(tied):
    engine = engine_for(tied, EngineSettings(**{**SMALL.__dict__, "max_queue": 2}))
    good = Request(tied.prompts[0], max_new_tokens=8, temperature=0.0, id="good")
    engine.submit(good)
    bad = {
        "long": Request([1] * 120, max_new_tokens=16, id="long"),
        "empty": Request([], max_new_tokens=4, id="empty"),
        "vocab": Request([1, tied.config.vocab_size], max_new_tokens=4, id="vocab"),
        "negative": Request([1, 2], max_new_tokens=-1, id="negative"),
    }
    messages = {
        "long": "exceeds the engine's max_seq_len",
        "empty": "prompt is empty",
        "vocab": "outside the vocabulary",
        "negative": "max_new_tokens=-1",
    }
    for key, request in bad.items():
        with pytest.raises(RequestError, match=messages[key]) as error:
            engine.submit(request)
        assert repr(key) in str(error.value)
    engine.submit(Request(tied.prompts[1], max_new_tokens=8, temperature=0.0, id="second"))
    with pytest.raises(QueueFull):
        engine.submit(Request(tied.prompts[2], max_new_tokens=8, id="third"))
    finish(engine)
    assert engine.pop_finished("good")[0].tokens == tied.new_ids[0][:8]
    assert engine.pop_finished("second")[0].tokens == tied.new_ids[1][:8]
    with pytest.raises(ValueError, match="max_seq_len=4096 exceeds"):
        Engine(tied.config, tied.params, EngineSettings(max_seq_len=4096))
