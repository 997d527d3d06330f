"""The CPU end-to-end demo: tiny Qwen3, SFT warm start, GRPO with the math verifier, held-out pass@1.

    python -m polaris_jax.main --config=configs/grpo_tiny.py --workdir=/tmp/grpo_demo
    python -m polaris_jax.main --config=configs/grpo_tiny.py:ci --workdir=/tmp/grpo_ci

One command: it writes the synthetic arithmetic task (polaris_jax/data/synthetic_arith.py) and its
character tokenizer, builds a tiny Qwen3-architecture model, warm-starts it with SFT on deliberately
imperfect traces (40% correct, 30% with a forgotten operation, 30% a guess without thinking),
evaluates held-out pass@1 (256 unseen problems x 2 samples at T=1), runs 60 GRPO steps (DAPO
clip-higher, token-mean, no KL) rewarded by the math verifier over two Polaris-style stages, evaluates
again and prints one JSON line with `accuracy_before` and `accuracy_after`.

Measured on 2 CPU cores (2026-12-06, BENCHMARKS.md, on the engine): pass@1 0.334 -> 0.877, GRPO phase 93 s.

Variants (the `:arg`):
  ""   the demo
  "ci" a narrower model and fewer steps, for the learning test in tests/train/grpo/test_grpo_learning.py
"""

import ml_collections

from polaris_jax.train.grpo.config import default_config


def get_config(arg: str | None = None):
    variant = arg or ""
    if variant not in ("", "ci"):
        raise ValueError(f"unknown grpo_tiny variant {variant!r}; choose '' or 'ci'")
    c = default_config()
    c.job = "demo"
    c.seed = 0

    c.model.preset = "tiny"
    c.model.overrides = ml_collections.ConfigDict(
        dict(
            arch="qwen3",
            vocab_size=0,
            hidden_size=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=32,
            intermediate_size=384,
        )
    )
    c.model.compute_dtype = "float32"
    c.model.remat_policy = "none"

    c.data.instruction = ""  # the problem is the whole user turn
    c.data.max_prompt_len = 32

    # Two Polaris-style stages: the response budget grows between them.
    c.schedule.max_response_len = (40, 48)
    c.schedule.temperature = (1.0, 1.0)
    c.schedule.steps = (30, 30)
    c.schedule.datasets = ("synthetic:rl", "synthetic:rl")  # written by the demo into WORKDIR/data

    c.rollout.prompts_per_step = 16
    c.rollout.samples_per_prompt = 8
    c.rollout.chunks = 2

    c.algo.advantage = "grpo"
    c.algo.policy_loss = "ppo_clip"
    c.algo.clip_low = 0.2
    c.algo.clip_high = 0.28
    c.algo.loss_agg_mode = "token-mean"
    c.algo.num_iterations = 1
    c.algo.minibatches = 1

    c.optimizer.peak_lr = 1e-4
    c.optimizer.grad_clip_norm = 1.0

    c.train.loss_chunk_size = 64
    c.train.log_every = 10

    c.eval.dataset = "synthetic:eval"
    c.eval.every = 20
    c.eval.samples_per_problem = 2
    c.eval.temperature = 1.0

    c.reward_workers = 1
    c.checkpoint.every = 30
    c.checkpoint.keep = 2

    # The demo's own part: the task, its splits and the SFT warm start.
    c.demo = ml_collections.ConfigDict()
    c.demo.min_operands = 3
    c.demo.max_operands = 4
    c.demo.trace_mix = ml_collections.ConfigDict(dict(correct=0.4, skip=0.3, lazy=0.3))
    c.demo.sft_examples = 40_000
    c.demo.rl_problems = 4000
    c.demo.eval_problems = 256
    c.demo.sft_steps = 400
    c.demo.sft_batch_size = 16
    c.demo.sft_seq_len = 256
    c.demo.sft_lr = 3e-3

    if variant == "ci":  # the learning test: a narrower model, fewer steps everywhere
        c.model.overrides.hidden_size = 96
        c.model.overrides.head_dim = 24
        c.model.overrides.intermediate_size = 288
        c.demo.sft_examples = 20_000
        c.demo.rl_problems = 1000
        c.demo.sft_steps = 300
        c.demo.eval_problems = 128
        c.schedule.max_response_len = (40, 40)
        c.schedule.steps = (15, 15)
        c.eval.every = 0
        c.checkpoint.every = 1000
        c.export.hf = False
        c.plots = False
    return c.lock()
