"""Polaris on DeepSeek-R1-Distill-Qwen-7B: the Polaris recipe with the 7B model's stage schedule.

    python -m polaris_jax.main --config=configs/polaris_r1_distill_7b.py --workdir=/ckpt/polaris_r1_7b
    python -m polaris_jax.main --config=configs/polaris_r1_distill_7b.py:tiny --workdir=/tmp/polaris7b_tiny  # CPU

Published schedule for Polaris-7B-Preview: stage max response lengths 15,360 / 23,552 / 31,744 tokens
at temperatures 0.7 / 1.0 / 1.1 (R1-Distill models collapse at the higher temperatures Qwen3 takes).
Everything else as configs/polaris_qwen3_4b.py: lr 1e-6, 128 prompts x 8 samples, clip 0.2 / 0.28,
token-mean, no KL, no entropy bonus, top_p 1.0, in-batch substitution, rollout rescue. The
R1-Distill chat template opens `<think>\\n` in the generation prompt (polaris_jax/data/templates).
MODEL_DIR is the Hugging Face deepseek-ai/DeepSeek-R1-Distill-Qwen-7B download; the per-stage step
split is ours.
"""

import ml_collections

from polaris_jax.train.grpo_config import default_config, make_tiny

MODEL_DIR = "checkpoints/DeepSeek-R1-Distill-Qwen-7B"
DATA = "data/polaris/polaris-data-53K.jsonl"
EVAL = "data/aime_2024.jsonl"
INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."


def get_config(arg: str | None = None):
    variant = arg or ""
    if variant not in ("", "tiny"):
        raise ValueError(f"unknown polaris_r1_distill_7b variant {variant!r}; choose '' or 'tiny'")
    c = default_config()
    c.model.init_from = MODEL_DIR
    c.model.compute_dtype = "bfloat16"
    c.model.remat_policy = "dots_no_batch"
    c.data.instruction = INSTRUCTION
    c.data.max_prompt_len = 1024

    c.schedule.max_response_len = (15_360, 23_552, 31_744)
    c.schedule.temperature = (0.7, 1.0, 1.1)
    c.schedule.steps = (400, 200, 100)
    c.schedule.datasets = (DATA, DATA, DATA)

    c.rollout.prompts_per_step = 128
    c.rollout.samples_per_prompt = 8
    c.rollout.top_p = 1.0
    c.rollout.chunks = 4

    c.algo.advantage = "grpo"
    c.algo.policy_loss = "ppo_clip"
    c.algo.clip_low = 0.2
    c.algo.clip_high = 0.28
    c.algo.loss_agg_mode = "token-mean"
    c.algo.kl_coef = 0.0
    c.algo.entropy_coef = 0.0
    c.algo.microbatches = 16

    c.shaping.polaris_substitution = True
    c.shaping.rollout_rescue = True
    c.rewards = ml_collections.ConfigDict({"accuracy": {"weight": 1.0}})

    c.optimizer.peak_lr = 1e-6
    c.optimizer.min_lr_ratio = 1.0
    c.train.loss_chunk_size = 1024
    c.eval.dataset = EVAL
    c.eval.every = 50
    c.eval.samples_per_problem = 4
    c.eval.temperature = 0.7
    c.checkpoint.every = 25
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))

    if variant == "tiny":
        make_tiny(c)
    return c.lock()
