"""Published GRPO recipes applied to a `default_config()`, and the tiny CPU variant of any recipe.

The recipe configs (configs/polaris_*.py, configs/openr1_grpo.py, ...) restate the published values
through these helpers; they are functions, not an inheritance chain.
"""

from __future__ import annotations

import ml_collections

POLARIS_INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."


def polaris_recipe(
    c: ml_collections.ConfigDict,
    *,
    model_dir: str,
    dataset: str,
    eval_dataset: str,
    response_lens: tuple[int, ...],
    temperatures: tuple[float, ...],
    steps: tuple[int, ...] = (400, 200, 100),
    rollout_mesh: dict | None = None,
    engine_pages: int = 98_304,
) -> ml_collections.ConfigDict:
    """The Polaris recipe (An et al. 2025) in place, shared by configs/polaris_*.py, which pick the model
    and its stage schedule: lr 1e-6 constant, 128 prompts x 8 samples, PPO-clip 0.2 / 0.28 (DAPO
    clip-higher), token-mean loss, no KL, no entropy bonus, top_p 1.0, in-batch substitution of
    uninformative groups, rollout rescue; evaluation at the first stage's temperature.

    Layout for one node of 8 x 80 GB (Polaris's 8 x H800): training on (fsdp=2, sequence=4), each row
    split over 4 devices by Ulysses (Polaris's SP=4), updates packed into rows of the longest sequence
    with one row per micro pass and FSDP shard (verl's dynamic batch size); the engine on the same
    devices over `rollout_mesh` (default tensor=8: the KV pool split by kv heads) with a pool of
    `engine_pages` pages of 16 tokens (about 1.6M tokens) and 256 slots. `tools.plan` checks it fits."""
    c.model.init_from = model_dir
    c.model.compute_dtype = "bfloat16"
    c.model.remat_policy = "full"  # each layer recomputed in the backward pass, as verl's gradient checkpointing
    c.data.instruction = POLARIS_INSTRUCTION
    c.data.max_prompt_len = 1024

    c.schedule.max_response_len = tuple(response_lens)
    c.schedule.temperature = tuple(temperatures)
    c.schedule.steps = tuple(steps)
    c.schedule.datasets = (dataset,) * len(steps)

    c.rollout.prompts_per_step = 128
    c.rollout.samples_per_prompt = 8
    c.rollout.top_p = 1.0
    c.rollout.chunks = 4
    c.rollout.backend = "engine"
    c.rollout.engine.max_slots = 256
    c.rollout.engine.num_pages = engine_pages
    c.rollout.mesh = ml_collections.ConfigDict(rollout_mesh or dict(tensor=8))

    c.algo.advantage = "grpo"
    c.algo.policy_loss = "ppo_clip"
    c.algo.clip_low = 0.2
    c.algo.clip_high = 0.28
    c.algo.loss_agg_mode = "token-mean"
    c.algo.kl_coef = 0.0
    c.algo.use_reference = False
    c.algo.entropy_coef = 0.0
    c.algo.num_iterations = 1
    c.algo.minibatches = 1
    c.algo.microbatches = 1
    c.algo.pack_tokens = c.data.max_prompt_len + max(response_lens)
    c.algo.micro_tokens = c.algo.pack_tokens

    c.shaping.polaris_substitution = True
    c.shaping.rollout_rescue = True
    c.rewards = ml_collections.ConfigDict({"accuracy": {"weight": 1.0}})

    c.optimizer.peak_lr = 1e-6
    c.optimizer.warmup_ratio = 0.0
    c.optimizer.min_lr_ratio = 1.0
    c.optimizer.weight_decay = 0.0

    c.train.loss_chunk_size = 1024
    c.eval.dataset = eval_dataset
    c.eval.every = 50
    c.eval.samples_per_problem = 4
    c.eval.temperature = temperatures[0]
    c.checkpoint.every = 25
    c.checkpoint.lora_only = False
    c.mesh = ml_collections.ConfigDict(dict(fsdp=2, sequence=4))
    c.hardware = "h800"  # the device the layout is planned for (tools.plan's default --hardware)
    c.model.sequence_parallelism = "ulysses"
    return c


def make_tiny(c: ml_collections.ConfigDict, stage_lengths=(32, 40, 48)) -> ml_collections.ConfigDict:
    """Turns a recipe into its CPU smoke variant in place: the same algorithm and stage structure on a
    random tiny Qwen3, the synthetic arithmetic task (no files needed) and a few steps per stage.
    A random model never answers right, so DAPO's soft overlong penalty is added to the rewards: its
    groups then differ in reward and every update path (substitution included) really runs."""
    c.model.init_from = ""
    c.model.preset = "tiny"
    c.model.overrides = ml_collections.ConfigDict(
        dict(vocab_size=0, hidden_size=64, num_layers=2, intermediate_size=128)
    )
    c.model.compute_dtype = "float32"
    c.model.remat_policy = "none"
    if c.lora.rank:
        c.lora.rank = min(c.lora.rank, 4)
    c.tokenizer_dir = "synthetic_arith"
    c.data.instruction = ""
    c.data.max_prompt_len = 32
    stages_n = len(c.schedule.steps)
    c.schedule.max_response_len = tuple(stage_lengths[:stages_n])
    c.schedule.steps = (2,) * stages_n
    c.schedule.datasets = ("synthetic_arith:train:256",) * stages_n
    c.rewards.soft_overlong = ml_collections.ConfigDict(
        dict(weight=1.0, max_tokens=min(stage_lengths[:stages_n]), cache_tokens=16)
    )
    c.rollout.prompts_per_step = 4
    c.rollout.samples_per_prompt = min(c.rollout.samples_per_prompt, 4)
    c.rollout.chunks = 2
    c.algo.minibatches = min(c.algo.minibatches, 2)
    c.algo.microbatches = 1
    # Padded updates: a stage then compiles once (packing compiles once per packed-row count it meets).
    c.algo.pack_tokens = 0
    c.algo.micro_tokens = 0
    c.rollout.mesh = ml_collections.ConfigDict()
    c.rollout.engine.num_pages = 0
    c.rollout.engine.max_slots = min(c.rollout.engine.max_slots, 64)
    c.train.loss_chunk_size = 64
    c.eval.dataset = "synthetic_arith:eval:8"
    c.eval.samples_per_problem = 2
    c.eval.max_response_len = 0
    c.reward_workers = 1
    c.checkpoint.every = 2
    c.export.hf = False
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    return c
