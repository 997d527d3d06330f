"""After a warm-up over the buckets, calls inside them compile nothing (counted by jax.monitoring)."""

import jax
import jax.monitoring

from polaris_jax.sampling import Buckets, generate

BUCKETS = Buckets(prompt_lengths=(8, 16), batch_sizes=(2,), cache_lengths=(32, 64))
_EVENTS = ("/jax/core/compile/backend_compile_duration", "/jax/core/compile/jaxpr_trace_duration")
_counter = {"on": False, "events": []}


def _listen(name, duration, **kwargs):
    if _counter["on"] and name in _EVENTS:
        _counter["events"].append((name, kwargs.get("fun_name")))


jax.monitoring.register_event_duration_secs_listener(_listen)


def test_no_compilation_after_warmup(tied):
    config, params = tied.config, tied.params
    run = lambda prompts, params=params, **kw: generate(config, params, prompts, buckets=BUCKETS, **kw)
    # Warm-up: both prompt buckets, the one batch bucket, both cache buckets (each call grows 32 -> 64).
    run([[1, 2, 3, 4, 5]], max_new_tokens=40, temperature=1.0)
    run([list(range(1, 14))], max_new_tokens=40, temperature=1.0)
    new_params = jax.tree.map(lambda p: p * 1.01, params)  # new weight values, same shapes

    _counter["on"] = True
    try:
        outs = [
            run([[7, 8, 9], [4] * 8], max_new_tokens=35, temperature=0.8, seed=5),
            run(
                [list(range(20, 36))],
                max_new_tokens=33,
                temperature=1.3,
                n=2,
                seed=9,
                eos_token_ids=(3, 4),
                stop_sequences=([5, 6], [7, 8, 9]),
            ),
            run(
                [[11], [12, 13, 14, 15, 16, 17, 18, 19, 20, 21]],
                params=new_params,
                max_new_tokens=12,
                temperature=0.6,
                eos_token_ids=(1,),
            ),
        ]
    finally:
        _counter["on"] = False
    assert _counter["events"] == [], f"recompiled after warm-up: {_counter['events']}"
    assert [len(o.tokens) for o in outs] == [2, 2, 2]


def test_compaction_compiles_nothing_after_warmup(tied, decode_batches):
    """Dropping finished rows at a cache growth uses one more program per (batch bucket, smaller batch bucket,
    cache bucket); once a call has compacted 4 -> 2 rows at 32 -> 64 slots, later ones compile nothing."""
    buckets = Buckets(prompt_lengths=(16,), batch_sizes=(2, 4), cache_lengths=(32, 64))
    prompts = [tied.prompts[0], tied.prompts[2]]  # with EOS = new_ids[0][4], prompt 0 ends after 5 tokens
    eos = (tied.new_ids[0][4],)
    batches = decode_batches
    run = lambda **kw: generate(tied.config, tied.params, prompts, n=2, temperature=0.0, buckets=buckets, **kw)
    run(max_new_tokens=40, eos_token_ids=eos)
    assert batches == [4, 2]
    _counter["on"] = True
    try:
        out = run(max_new_tokens=36, eos_token_ids=eos + (255,))
    finally:
        _counter["on"] = False
    assert batches == [4, 2, 4, 2]
    assert _counter["events"] == [], f"recompiled after warm-up: {_counter['events']}"
    assert out.tokens[2] == out.tokens[3] == tied.new_ids[2][:36]
