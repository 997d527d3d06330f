"""Open-R1's GRPO recipe (recipes/DeepSeek-R1-Distill-Qwen-1.5B/grpo/config_demo.yaml) on our trainer.

    python -m polaris_jax.main --config=configs/openr1_grpo.py --workdir=/ckpt/openr1_grpo
    python -m polaris_jax.main --config=configs/openr1_grpo.py:tiny --workdir=/tmp/openr1_tiny   # CPU smoke

As in Open-R1: DeepSeek-R1-Distill-Qwen-1.5B on OpenR1-Math-220k, 16 generations per prompt, lr 1e-6
with 10% warmup and cosine decay to 10%, temperature 0.7, at most 512 prompt and 2,048 completion
tokens, rewards accuracy + format + tag_count with weight 1 each. TRL's GRPO loss: one update per
batch, a sequence-mean of token-means, and its clip of 0.2 on both sides. The R1-Distill template
opens `<think>` in the prompt, so format and tag_count look for the closing tag only. MODEL_DIR and
DATA are local copies of the Hugging Face model and dataset.
"""

import ml_collections

from polaris_jax.train.grpo.config import default_config
from polaris_jax.train.grpo.recipes import make_tiny

MODEL_DIR = "checkpoints/DeepSeek-R1-Distill-Qwen-1.5B"
DATA = "data/openr1_math_220k.parquet"
EVAL = "data/math500.jsonl"


def get_config(arg: str | None = None):
    variant = arg or ""
    if variant not in ("", "tiny"):
        raise ValueError(f"unknown openr1_grpo variant {variant!r}; choose '' or 'tiny'")
    c = default_config()
    c.model.init_from = MODEL_DIR
    c.data.max_prompt_len = 512

    c.schedule.max_response_len = (2048,)
    c.schedule.temperature = (0.7,)
    c.schedule.steps = (1000,)
    c.schedule.datasets = (DATA,)

    c.rollout.prompts_per_step = 16
    c.rollout.samples_per_prompt = 16

    c.algo.advantage = "grpo"
    c.algo.policy_loss = "ppo_clip"
    c.algo.clip_low = 0.2
    c.algo.clip_high = 0.2
    c.algo.loss_agg_mode = "seq-mean-token-mean"
    c.algo.num_iterations = 1
    c.algo.microbatches = 4

    c.rewards = ml_collections.ConfigDict(
        {
            "accuracy": {"weight": 1.0},
            "format": {"weight": 1.0, "think_in_prompt": True},
            "tag_count": {"weight": 1.0, "tags": ("\n</think>\n",)},
        }
    )

    c.optimizer.peak_lr = 1e-6
    c.optimizer.warmup_ratio = 0.1
    c.optimizer.min_lr_ratio = 0.1
    c.eval.dataset = EVAL
    c.eval.every = 100
    c.eval.samples_per_problem = 1
    c.checkpoint.every = 100
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))

    if variant == "tiny":
        make_tiny(c, stage_lengths=(48,))
    return c.lock()
