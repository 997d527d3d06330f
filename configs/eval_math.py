r"""Math benchmark evaluation: avg@n, pass@k, cons@n with the training verifier.

    python -m polaris_jax.main --config=configs/eval_math.py --workdir=DIR

Variants (the text after `:`):
    polaris (default)  Polaris' protocol: n=32, T=1.4, top_k=20, top_p=1.0.
    r1                 DeepSeek-R1's protocol: T=0.6, top_p=0.95; n=16 (R1 used 4 to 64 by set size).
    tiny               CPU smoke run: a random tiny model with the offline Qwen tokenizer,
                       4 MATH-500 problems, n=2, 16 new tokens.

Point it at a checkpoint and benchmark on the command line, e.g.

    python -m polaris_jax.main --config=configs/eval_math.py:r1 --workdir=runs/eval \
        --config.checkpoint=/ckpt/DeepSeek-R1-Distill-Qwen-1.5B \
        --config.benchmark=aime_2024

`benchmark` is a shipped benchmark's name (`polaris_jax.data.benchmark_names()`: aime_2024, aime_2025,
hmmt_2025, math500, amc23, gsm8k_test, minerva_math, polaris_aime24, polaris_aime25) or a file path.

Outputs: DIR/eval/<benchmark>/samples.jsonl and summary.json.

Mesh: data-parallel by default (`data=-1`): every device holds the whole model and decodes its share
of the n x problems_per_batch rows. A model too big for one device takes `tensor` (e.g.
`--config.mesh.data=-1 --config.mesh.tensor=4`); `fsdp` also works but gathers the weights at every
decode step.
"""

import ml_collections

from polaris_jax.data.benchmarks import R1_MATH_INSTRUCTION
from polaris_jax.models.sharding import DEFAULT_RULES
from polaris_jax.sampling.engine_settings import engine_section


def get_config(arg: str = "polaris") -> ml_collections.ConfigDict:
    variant = arg or "polaris"
    if variant not in ("polaris", "r1", "tiny"):
        raise ValueError(f"unknown eval_math variant {variant!r}; use polaris, r1 or tiny")
    config = ml_collections.ConfigDict()
    config.job = "eval"
    config.checkpoint = ""  # Hugging Face layout directory (config.json, safetensors, tokenizer), or "tiny"
    config.tokenizer = ""  # defaults to the checkpoint directory ("tiny": an offline flavor, qwen3)
    config.dtype = "bfloat16"
    config.benchmark = "aime_2024"  # a shipped benchmark name, or a .jsonl / .parquet path
    config.num_problems = 0  # 0 = all
    config.n = 32
    config.temperature = 1.4
    config.top_p = 1.0
    config.top_k = 20
    config.max_new_tokens = 32768
    config.seed = 0
    config.force_think = False  # end the prompt with "<think>\n"
    # Appended to every problem on its own line ("" for none, e.g. a model trained on bare problems).
    config.instruction = R1_MATH_INSTRUCTION
    # Where the answer may be: "auto" = "require" a </think> when the prompt opens the think
    # block (R1 template, force_think), else "strip"; the GRPO configs resolve it the same way
    # (rewards.extraction.resolve_think_policy), so training and evaluation score alike.
    config.verifier = ml_collections.ConfigDict(dict(think_policy="auto"))
    config.problems_per_batch = 8  # sampled together; verified while the next batch samples
    config.backend = "static"  # static (sampling.generate) | engine (continuous batching, paged KV cache)
    config.engine = engine_section()  # the engine's sizes
    config.verifier_workers = 0  # 0 = one per CPU core
    config.verifier_timeout_s = 5.0
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    config.sharding_rules = tuple(DEFAULT_RULES)

    if variant == "r1":
        config.n = 16
        config.temperature = 0.6
        config.top_p = 0.95
        config.top_k = 0
    elif variant == "tiny":
        config.checkpoint = "tiny"
        config.dtype = "float32"
        config.benchmark = "math500"
        config.num_problems = 4
        config.n = 2
        config.max_new_tokens = 16
        config.problems_per_batch = 2
        config.verifier_workers = 1
    config.lock()
    return config
