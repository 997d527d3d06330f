r"""Server settings for `python -m polaris_jax.serve --config=configs/serve.py[:VARIANT]`.

    python -m polaris_jax.serve --model=/ckpt/Qwen3-4B --config=configs/serve.py:h100 --api_key=tml-KEY

Variants (the text after `:`):
    cpu (default)  a laptop or this repository's 2-core CI box: 8 decode slots, 2K context.
    h100           one 80 GB GPU and a 4-8B model: 64 decode slots, 16K context, 32 adapter engines.
    tiny           the tests' tiny random checkpoints: 8 slots, 128 tokens.

Every key is a command-line flag of the same name; a flag given on the command line wins.
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    variant = arg or "cpu"
    sizes = {
        "cpu": dict(max_slots=8, max_seq_len=2048, page_size=16, prefill_chunk=256, max_loras=4),
        "h100": dict(max_slots=64, max_seq_len=16384, page_size=16, prefill_chunk=1024, max_loras=32),
        "tiny": dict(max_slots=8, max_seq_len=128, page_size=16, prefill_chunk=64, max_loras=2),
    }
    if variant not in sizes:
        raise ValueError(f"configs/serve.py: unknown variant {variant!r}; choose one of {sorted(sizes)}")
    return ml_collections.ConfigDict(sizes[variant])
