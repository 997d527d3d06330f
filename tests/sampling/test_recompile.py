"""After a warm-up over the buckets, calls inside them compile nothing (counted by jax.monitoring)."""

import jax

from polaris_jax.sampling import Buckets, generate
from tests.sampling.conftest import compilations

BUCKETS = Buckets(prompt_lengths=(8, 16), batch_sizes=(2,), cache_lengths=(32, 64))


def test_no_compilation_after_warmup(tied):
    config, params = tied.config, tied.params
    run = lambda prompts, params=params, **kw: generate(config, params, prompts, buckets=BUCKETS, **kw)
    # Warm-up: both prompt buckets, the one batch bucket, both cache buckets (each call grows 32 -> 64).
    run([[1, 2, 3, 4, 5]], max_new_tokens=40, temperature=1.0)
    run([list(range(1, 14))], max_new_tokens=40, temperature=1.0)
    new_params = jax.tree.map(lambda p: p * 1.01, params)  # new weight values, same shapes

    with compilations() as compiled:
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
    assert compiled == [], f"recompiled after warm-up: {compiled}"
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
    with compilations() as compiled:
        out = run(max_new_tokens=36, eos_token_ids=eos + (255,))
    assert batches == [4, 2, 4, 2]
    assert compiled == [], f"recompiled after warm-up: {compiled}"
    assert out.tokens[2] == out.tokens[3] == tied.new_ids[2][:36]
