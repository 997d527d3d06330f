"""LoRA RL on Qwen3-8B ("LoRA Without Regret", Schulman et al. 2025; Tinker): GRPO updates only
low-rank adapters on every projection, so the optimizer state and checkpoints are megabytes.

    python -m polaris_jax.main --config=configs/lora_rl_qwen3_8b.py --workdir=/ckpt/lora_rl_8b
    python -m polaris_jax.main --config=configs/lora_rl_qwen3_8b.py:rank1 --workdir=/ckpt/lora_rl_8b_r1
    python -m polaris_jax.main --config=configs/lora_rl_qwen3_8b.py:tiny --workdir=/tmp/lora_rl_tiny   # CPU

Any rank from 1 up works for RL (policy-gradient updates carry about one bit per episode; the paper
finds rank 1 matches full fine-tuning on math RL). Learning-rate rule (models/lora.py): with alpha
fixed at 32, use about 10x the full fine-tuning rate, independent of rank; so 1e-5 here against
Polaris's 1e-6 for full RL. The variant sets the rank: "" = 32, "rankN" = N (e.g. rank1, rank8).
Checkpoints hold adapters only; the frozen base is re-read from MODEL_DIR on resume, and the HF export
merges the adapters. One Polaris-style stage on the Polaris data, token-mean, clip 0.2 / 0.28.
Hardware: one 80 GB GPU (`hardware`, `mesh` fsdp=1); tests/tools/test_recipe_fit.py plans it under 90%.
"""

import ml_collections

from polaris_jax.train.grpo.config import default_config
from polaris_jax.train.grpo.recipes import make_tiny

MODEL_DIR = "checkpoints/Qwen3-8B"
DATA = "data/polaris/polaris-data-53K.jsonl"
EVAL = "data/aime_2025.jsonl"
FULL_FINETUNE_LR = 1e-6
LORA_LR_MULTIPLIER = 10.0  # "LoRA Without Regret": ~10x, roughly rank-independent at fixed alpha


def get_config(arg: str | None = None):
    variant = arg or ""
    if variant not in ("", "tiny") and not (variant.startswith("rank") and variant[4:].isdigit()):
        raise ValueError(f"unknown lora_rl_qwen3_8b variant {variant!r}; choose '', 'rankN' or 'tiny'")
    c = default_config()
    c.model.init_from = MODEL_DIR
    c.model.compute_dtype = "bfloat16"
    c.lora.rank = int(variant[4:]) if variant.startswith("rank") else 32
    c.lora.alpha = 32.0
    if c.lora.rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {c.lora.rank}")
    c.data.instruction = "Let's think step by step and output the final answer within \\boxed{}."

    c.schedule.max_response_len = (16_384,)
    c.schedule.temperature = (1.0,)
    c.schedule.steps = (500,)
    c.schedule.datasets = (DATA,)

    c.rollout.prompts_per_step = 64
    c.rollout.samples_per_prompt = 16
    c.rollout.chunks = 4
    c.algo.clip_low = 0.2
    c.algo.clip_high = 0.28
    c.algo.loss_agg_mode = "token-mean"
    # One 80 GB device: updates packed into rows of the longest sequence, one row per micro pass; every layer
    # recomputed in the backward pass; the engine's pool holds 4,096 pages of 16 tokens (65K tokens, 9.7 GB; the
    # fp32 base weights take 33 GB of the 80).
    c.algo.microbatches = 1
    c.algo.pack_tokens = c.data.max_prompt_len + max(c.schedule.max_response_len)
    c.algo.micro_tokens = c.algo.pack_tokens
    c.model.remat_policy = "full"
    c.rollout.engine.num_pages = 4096
    c.shaping.polaris_substitution = True

    c.optimizer.peak_lr = FULL_FINETUNE_LR * LORA_LR_MULTIPLIER
    c.optimizer.min_lr_ratio = 1.0
    c.train.loss_chunk_size = 1024
    c.eval.dataset = EVAL
    c.eval.every = 50
    c.checkpoint.every = 25
    c.checkpoint.lora_only = True
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1))
    c.hardware = "h100"  # the device the layout is planned for (tools.plan's default --hardware)

    if variant == "tiny":
        make_tiny(c, stage_lengths=(40,))
    return c.lock()
