"""Polaris on DeepSeek-R1-Distill-Qwen-7B: the Polaris recipe with the 7B model's stage schedule.

    python -m polaris_jax.main --config=configs/polaris_r1_distill_7b.py --workdir=/ckpt/polaris_r1_7b
    python -m polaris_jax.main --config=configs/polaris_r1_distill_7b.py:tiny --workdir=/tmp/polaris7b_tiny  # CPU

Published schedule for Polaris-7B-Preview: stage max response lengths 15,360 / 23,552 / 31,744 tokens
at temperatures 0.7 / 1.0 / 1.1 (R1-Distill models collapse at the higher temperatures Qwen3 takes).
Everything else is the shared recipe (`grpo.recipes.polaris_recipe`, as configs/polaris_qwen3_4b.py): lr 1e-6,
128 prompts x 8 samples, clip 0.2 / 0.28,
token-mean, no KL, no entropy bonus, top_p 1.0, in-batch substitution, rollout rescue. The
R1-Distill chat template opens `<think>\\n` in the generation prompt (polaris_jax/data/templates).
Hardware: one node of 8 x 80 GB GPUs, as configs/polaris_qwen3_4b.py (the engine on data=2 x tensor=4).
MODEL_DIR is the Hugging Face deepseek-ai/DeepSeek-R1-Distill-Qwen-7B download; the per-stage step
split is ours.
"""

from polaris_jax.train.grpo.config import default_config
from polaris_jax.train.grpo.recipes import make_tiny, polaris_recipe

MODEL_DIR = "checkpoints/DeepSeek-R1-Distill-Qwen-7B"
DATA = "data/polaris/polaris-data-53K.jsonl"
EVAL = "data/aime_2024.jsonl"


def get_config(arg: str | None = None):
    variant = arg or ""
    if variant not in ("", "tiny"):
        raise ValueError(f"unknown polaris_r1_distill_7b variant {variant!r}; choose '' or 'tiny'")
    c = polaris_recipe(
        default_config(),
        model_dir=MODEL_DIR,
        dataset=DATA,
        eval_dataset=EVAL,
        response_lens=(15_360, 23_552, 31_744),
        temperatures=(0.7, 1.0, 1.1),
        rollout_mesh=dict(data=2, tensor=4),  # 4 kv heads: the pool splits 4 ways
    )
    if variant == "tiny":
        make_tiny(c)
    return c.lock()
