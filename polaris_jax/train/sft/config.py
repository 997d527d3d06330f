"""The SFT config schema with defaults; every configs/sft_*.py starts from `default_config()`.

Keeping one schema means `--config.key=value` means the same thing in every SFT experiment, and
a key that exists nowhere is refused (configs return `lock()`ed ConfigDicts).
"""

from __future__ import annotations

import ml_collections

from polaris_jax.models.sharding import DEFAULT_RULES
from polaris_jax.train import setup


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.job = "sft"
    c.seed = 0

    setup.add_model_sections(c)

    c.tokenizer_dir = ""  # "" = model.init_from (or the synthetic task's tokenizer)
    c.synthetic = ml_collections.ConfigDict()
    c.synthetic.task = ""  # "arith": generate the SFT jsonl + tokenizer into workdir/data
    c.synthetic.num_examples = 2000
    c.synthetic.seed = 0

    # polaris_jax.data.sft_pipeline.SFTDataConfig; batch_size is global rows per step (split over processes).
    c.data = ml_collections.ConfigDict()
    c.data.sources = ()
    c.data.batch_size = 8
    c.data.seq_len = 4096
    c.data.mode = "pack"  # pack | bucket
    c.data.buckets = ()
    c.data.order = "shuffle"  # shuffle | curriculum | sequential
    c.data.seed = 0
    c.data.num_epochs = 1  # 0 = repeat forever
    c.data.split = "train"  # tfds split
    c.data.tfds_data_dir = ""
    c.data.messages_key = "messages"  # rows hold `messages`, or `prompt` + `response`
    c.data.prompt_key = "prompt"
    c.data.response_key = "response"
    c.data.system_prompt = ""
    c.data.difficulty_key = "difficulty"  # curriculum order sorts by this field
    c.data.difficulty_levels = ()  # names of difficulty levels, easiest first, when they are not numbers
    c.data.chat_template = ""  # "" = the tokenizer's; or a built-in name (qwen3, r1_distill_qwen)
    c.data.template_kwargs = ml_collections.ConfigDict()  # e.g. enable_thinking
    c.data.completion_mode = "auto"
    c.data.on_malformed = "skip"

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.peak_lr = 1e-5
    c.optimizer.warmup_ratio = 0.03
    c.optimizer.min_lr_ratio = 0.1
    c.optimizer.weight_decay = 0.0
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.grad_clip_norm = 1.0  # 0 = no clipping
    # bf16 params (model.param_dtype) with a float32 master copy in the optimiser state (train.optimizer).
    c.optimizer.master_weights = False

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000
    c.train.microbatches = 1  # gradient accumulation: rows per step / microbatches rows per pass
    c.train.loss_chunk_size = 512  # sequence positions per lm_head chunk of the loss
    c.train.z_loss_coef = 0.0
    c.train.router_aux_coef = 0.001  # MoE load-balancing loss (transformers' default); ignored for dense
    c.train.log_every = 10
    c.train.peak_flops_per_device = 0.0  # 0 = from the device-kind table (no MFU on CPU)

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 500
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True
    c.checkpoint.lora_only = False  # LoRA runs: leave the frozen base out of checkpoints
    c.checkpoint.resume_from = ""  # another run's checkpoints/ directory to start from

    c.export = ml_collections.ConfigDict()
    c.export.hf = True  # write workdir/export/hf at the end (LoRA merged)

    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.sharding_rules = tuple(DEFAULT_RULES)
    return c
