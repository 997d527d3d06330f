"""Finish reasons, stop sequences, shared prefill, logprobs and per-row randomness of `generate`.

Expected token sequences come from transformers' greedy generate() (golden files) or from a full
forward pass of the model, never from the sampler itself.
"""

import numpy as np
import pytest

from polaris_jax.models import logits
from polaris_jax.sampling import generate


def _first_end(tokens: list[int], is_end) -> int | None:
    """Index of the first token at which `is_end(tokens[:i + 1])` holds."""
    return next((i for i in range(len(tokens)) if is_end(tokens[: i + 1])), None)


def _expected(reference: list[list[int]], max_new: int, eos=(), stops=()):
    tokens, reasons = [], []
    for row in reference:
        row = row[:max_new]
        at_eos = _first_end(row, lambda seq: seq[-1] in eos)
        at_stop = _first_end(row, lambda seq: any(len(seq) >= len(s) and seq[-len(s) :] == list(s) for s in stops))
        ends = [(i, r) for i, r in ((at_eos, "eos"), (at_stop, "stop")) if i is not None]
        if ends:
            end, reason = min(ends, key=lambda e: (e[0], e[1] != "eos"))
            tokens.append(row[: end + 1])
            reasons.append(reason)
        else:
            tokens.append(row)
            reasons.append("length")
    return tokens, reasons


def test_growing_cache_matches_golden(tied):
    # Prompt bucket 16, cache buckets 64 -> 128: the loop exits, grows the cache and resumes.
    out = generate(tied.config, tied.params, tied.prompts, max_new_tokens=64, temperature=0.0)
    assert out.tokens == tied.new_ids
    assert out.finish_reasons == ["length"] * 3


def test_eos_and_length(tied):
    eos = (tied.new_ids[0][9], tied.new_ids[2][30])
    out = generate(tied.config, tied.params, tied.prompts, max_new_tokens=40, temperature=0.0, eos_token_ids=eos)
    tokens, reasons = _expected(tied.new_ids, 40, eos=eos)
    assert "eos" in reasons
    assert out.tokens == tokens
    assert out.finish_reasons == reasons
    assert [len(lp) for lp in out.logprobs] == [len(t) for t in out.tokens]


def test_stop_sequences(tied):
    stops = (tied.new_ids[1][12:15], tied.new_ids[0][40:42], [255, 254, 253, 252, 251, 250, 249, 248])
    out = generate(
        tied.config,
        tied.params,
        tied.prompts,
        max_new_tokens=64,
        temperature=0.0,
        stop_sequences=stops,
        eos_token_ids=(tied.new_ids[2][50],),
    )
    tokens, reasons = _expected(tied.new_ids, 64, eos=(tied.new_ids[2][50],), stops=stops)
    assert reasons.count("stop") >= 2
    assert out.tokens == tokens
    assert out.finish_reasons == reasons


def test_max_new_tokens_one(tied):
    out = generate(tied.config, tied.params, tied.prompts, max_new_tokens=1, temperature=0.0)
    assert out.tokens == [row[:1] for row in tied.new_ids]
    assert out.finish_reasons == ["length"] * 3


def test_shared_prefill_equals_repeated_prompts(tied):
    prompts = tied.prompts[:2]
    shared = generate(tied.config, tied.params, prompts, max_new_tokens=24, temperature=0.0, n=2)
    repeated = generate(
        tied.config, tied.params, [p for p in prompts for _ in range(2)], max_new_tokens=24, temperature=0.0
    )
    assert shared.tokens == repeated.tokens
    assert shared.tokens[0] == tied.new_ids[0][:24] and shared.tokens[3] == tied.new_ids[1][:24]
    np.testing.assert_allclose(np.array(shared.logprobs), np.array(repeated.logprobs), atol=1e-5)


SAMPLING = dict(temperature=0.7, top_k=20, top_p=0.9)


def _reference_logprobs(tied, prompts, completions, temperature):
    """log_softmax(logits / T) at every completion position, from one right-padded full forward."""
    width = max(len(p) + len(c) for p, c in zip(prompts, completions))
    ids = np.zeros((len(prompts), width), np.int32)
    mask = np.zeros_like(ids)
    for row, (p, c) in enumerate(zip(prompts, completions)):
        ids[row, : len(p) + len(c)] = p + c
        mask[row, : len(p) + len(c)] = 1
    logits_btv = np.asarray(logits(tied.config, tied.params, ids, mask), np.float64) / temperature
    logits_btv -= logits_btv.max(-1, keepdims=True)
    logprob_btv = logits_btv - np.log(np.exp(logits_btv).sum(-1, keepdims=True))
    return [logprob_btv[row, len(p) - 1 : len(p) + len(c) - 1] for row, (p, c) in enumerate(zip(prompts, completions))]


def test_logprobs_are_temperature_scaled_before_truncation(tied):
    out = generate(tied.config, tied.params, tied.prompts, max_new_tokens=20, seed=3, **SAMPLING)
    references = _reference_logprobs(tied, tied.prompts, out.tokens, SAMPLING["temperature"])
    for tokens, logprobs, logprob_tv in zip(out.tokens, out.logprobs, references):
        np.testing.assert_allclose(logprobs, logprob_tv[np.arange(len(tokens)), tokens], atol=2e-4)
        for t, token in enumerate(tokens):  # every drawn token survives top-k then top-p
            order = np.argsort(-logprob_tv[t])[: SAMPLING["top_k"]]
            probs = np.exp(logprob_tv[t][order])
            probs /= probs.sum()
            kept = order[np.concatenate([[0.0], np.cumsum(probs)[:-1]]) < SAMPLING["top_p"]]
            assert token in kept


def test_rows_depend_on_seed_and_index_only(tied):
    base = generate(tied.config, tied.params, tied.prompts, max_new_tokens=20, seed=11, **SAMPLING)
    again = generate(tied.config, tied.params, tied.prompts, max_new_tokens=20, seed=11, **SAMPLING)
    assert base.tokens == again.tokens
    # Other rows around row 0: row 0 still draws the same tokens.
    batch = [tied.prompts[0], [5, 6, 7], tied.prompts[1][:2]]
    others = generate(tied.config, tied.params, batch, max_new_tokens=20, seed=11, **SAMPLING)
    assert others.tokens[0] == base.tokens[0]
    reseeded = generate(tied.config, tied.params, tied.prompts, max_new_tokens=20, seed=12, **SAMPLING)
    assert reseeded.tokens != base.tokens


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompts=[]), "prompts is empty"),
        (dict(prompts=[[]]), r"prompts\[0\] is empty"),
        (dict(prompts=[[1, 999]]), "outside the vocabulary"),
        (dict(prompts=[[1, 2.5]]), "not an integer"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(min_p=1.0), "min_p"),
        (dict(n=0), "n=0"),
        (dict(eos_token_ids=(300,)), "eos_token_ids"),
        (dict(stop_sequences=([],)), r"stop_sequences\[0\] is empty"),
        (dict(prefill_chunk=-8), "prefill_chunk=-8"),
    ],
)
def test_bad_input_is_named(tied, kwargs, message):
    args = dict(prompts=[[1, 2]], max_new_tokens=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        generate(tied.config, tied.params, args.pop("prompts"), **args)


def test_bfloat16_model_decodes_like_its_full_forward(tied):
    """bf16 weights and compute (on CPU with a float32 KV cache): every greedy token is the argmax of a
    teacher-forced bf16 full forward up to bf16 rounding, and logprobs agree with it."""
    import jax
    import jax.numpy as jnp

    config = tied.config.replace(param_dtype="bfloat16", compute_dtype="bfloat16")
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), tied.params)
    bf16 = type(tied).__new__(type(tied))
    bf16.config, bf16.params = config, params
    out = generate(config, params, tied.prompts, max_new_tokens=24, temperature=0.0)
    references = _reference_logprobs(bf16, tied.prompts, out.tokens, 1.0)
    for tokens, logprobs, logprob_tv in zip(out.tokens, out.logprobs, references):
        chosen_t = logprob_tv[np.arange(len(tokens)), tokens]
        assert np.all(chosen_t >= logprob_tv.max(-1) - 0.1), (chosen_t, logprob_tv.max(-1))
        np.testing.assert_allclose(logprobs, chosen_t, atol=0.1)


def test_new_params_are_never_served_from_the_per_layer_copy(tied):
    """generate keeps the per-layer copy of the last params (CPU): new weights must bypass it, and the
    copy must go away with the params it came from."""
    import gc

    import jax

    from polaris_jax.sampling import sampler

    perturbed = jax.tree.map(lambda x: x * 1.5, tied.params)
    kwargs = dict(max_new_tokens=8, temperature=0.0)
    assert generate(tied.config, tied.params, tied.prompts, **kwargs).tokens == [r[:8] for r in tied.new_ids]
    expected = generate(tied.config, perturbed, tied.prompts, unstack_params=False, **kwargs).tokens
    assert expected != [r[:8] for r in tied.new_ids]  # the perturbation changes the greedy tokens
    assert generate(tied.config, perturbed, tied.prompts, **kwargs).tokens == expected
    copy = sampler._last_unstacked["entry"][1]
    assert generate(tied.config, perturbed, tied.prompts, **kwargs).tokens == expected
    assert sampler._last_unstacked["entry"][1] is copy  # same params: the copy is reused
    assert generate(tied.config, tied.params, tied.prompts, **kwargs).tokens == [r[:8] for r in tied.new_ids]
    del perturbed, copy
    generate(tied.config, jax.tree.map(lambda x: x + 0, tied.params), tied.prompts, **kwargs)
    gc.collect()
    assert not sampler._last_unstacked  # those params are gone, so is their copy


def test_finished_rows_are_compacted_away_when_the_cache_grows(tied, decode_batches):
    """12 rows (batch bucket 16): rows of prompts 0 and 1 end early, so when the cache grows 64 -> 128 the
    4 rows of prompt 2 go on alone in a batch of 4. Outputs must equal the golden reference and the
    uncompacted run, greedy and sampled."""
    eos = (tied.new_ids[0][4], tied.new_ids[1][6])
    tokens, reasons = _expected(tied.new_ids, 64, eos=eos)
    assert len(tokens[0]) < 40 and len(tokens[1]) < 40 and len(tokens[2]) > 52, "pick other EOS ids"
    batches = decode_batches
    out = generate(tied.config, tied.params, tied.prompts, max_new_tokens=64, temperature=0.0, n=4, eos_token_ids=eos)
    assert batches == [16, 4]
    assert out.tokens == [t for t in tokens for _ in range(4)]
    assert out.finish_reasons == [r for r in reasons for _ in range(4)]

    kwargs = dict(max_new_tokens=96, temperature=1.0, n=4, seed=3, eos_token_ids=tuple(range(100, 108)))
    batches.clear()
    compact = generate(tied.config, tied.params, tied.prompts, **kwargs)
    assert batches[0] == 16 and min(batches) < 16, batches
    full = generate(tied.config, tied.params, tied.prompts, compact_rows=False, **kwargs)
    assert compact.tokens == full.tokens and compact.finish_reasons == full.finish_reasons
    for got, want in zip(compact.logprobs, full.logprobs):
        np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("name", ["qwen3_tied", "qwen3_moe"])
def test_chunked_prefill_matches_golden(name):
    """Prompt bucket 16 prefilled in 4 passes of 4 tokens (each attending to the cache written so far)."""
    from tests.sampling.conftest import golden

    model = golden(name)
    whole = generate(model.config, model.params, model.prompts, max_new_tokens=64, temperature=0.0, prefill_chunk=0)
    chunked = generate(model.config, model.params, model.prompts, max_new_tokens=64, temperature=0.0, prefill_chunk=4)
    assert chunked.tokens == model.new_ids
    for got, want in zip(chunked.logprobs, whole.logprobs):
        np.testing.assert_allclose(got, want, atol=1e-4)
