"""Polaris on Qwen3-4B (An et al. 2025, "POLARIS: A Post-training recipe for scaling RL on Advanced
ReasonIng modelS"): three GRPO stages with growing response budgets and rising temperatures.

    python -m polaris_jax.main --config=configs/polaris_qwen3_4b.py --workdir=/ckpt/polaris_qwen3_4b
    python -m polaris_jax.main --config=configs/polaris_qwen3_4b.py:tiny --workdir=/tmp/polaris_tiny   # CPU smoke

Published recipe: stage max response lengths 39,936 / 48,128 / 52,224 tokens, rollout temperatures
1.4 / 1.45 / 1.5 (picked by the Distinct-4 temperature search, polaris_jax/tools/temperature_search.py),
lr 1e-6 constant, 128 prompts x 8 samples, PPO-clip 0.2 / 0.28 (DAPO clip-higher), token-mean loss, no
KL, no entropy bonus, top_p 1.0, in-batch substitution of uninformative groups, rollout rescue, on
Polaris-Dataset-53K. The blog reports about 700 steps in all; the per-stage split below is ours.
Between stages Polaris drops problems the current policy already solves 8/8:
    python -m polaris_jax.main --config=configs/polaris_qwen3_4b.py:filter --workdir=/ckpt/polaris_filter \
        --config.filter.checkpoint=/ckpt/polaris_qwen3_4b/export/hf
and the filtered file becomes the next stage's dataset (--config.schedule.datasets=...).

Paths: MODEL_DIR is the Hugging Face Qwen/Qwen3-4B download, DATA the Polaris-Dataset-53K file.
The recipe itself is `polaris_jax.train.grpo.recipes.polaris_recipe`.

Hardware: one node of 8 x 80 GB GPUs (Polaris's 8 x H800; `hardware`): training on (fsdp=2, sequence=4)
with Ulysses over each row's 4 devices, packed updates of one 53,248-token row per micro pass and FSDP
shard; the engine on the same devices over tensor=8. The planner checks it at the longest stage:
    python -m polaris_jax.plan --config=configs/polaris_qwen3_4b.py --model=qwen3_4b --mesh=fsdp=2,sequence=4
"""

import ml_collections

from polaris_jax.train.grpo.config import default_config
from polaris_jax.train.grpo.recipes import make_tiny, polaris_recipe

MODEL_DIR = "checkpoints/Qwen3-4B"
DATA = "data/polaris/polaris-data-53K.jsonl"
EVAL = "data/aime_2025.jsonl"


def get_config(arg: str | None = None):
    variant = arg or ""
    if variant not in ("", "tiny", "filter"):
        raise ValueError(f"unknown polaris_qwen3_4b variant {variant!r}; choose '', 'tiny' or 'filter'")
    c = polaris_recipe(
        default_config(),
        model_dir=MODEL_DIR,
        dataset=DATA,
        eval_dataset=EVAL,
        response_lens=(39_936, 48_128, 52_224),
        temperatures=(1.4, 1.45, 1.5),
    )
    if variant == "tiny":
        make_tiny(c)
    if variant == "filter":  # the between-stage difficulty filter over this recipe's data
        from polaris_jax.tools.difficulty_filter import filter_config

        return filter_config(
            model_dir=MODEL_DIR,
            dataset=DATA,
            samples=8,
            temperature=1.4,
            max_response_len=39_936,
            instruction=c.data.instruction,
            mesh=ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1)),  # sampling only: no sequence axis
        ).lock()
    return c.lock()
