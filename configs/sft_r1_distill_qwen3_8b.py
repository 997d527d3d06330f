"""R1 distillation into Qwen3-8B-Base: the recipe of DeepSeek-R1-0528-Qwen3-8B / Open-R1's OpenR1-Distill.

    # on the accelerator hosts (one process per host; jax.distributed from POLARIS_* env or config):
    python -m polaris_jax.main --config=configs/sft_r1_distill_qwen3_8b.py --workdir=/runs/r1_qwen3_8b \
        --config.model.init_from=/ckpt/Qwen3-8B-Base \
        --config.data.sources='("/data/mixture_of_thoughts/math.parquet", "/data/mixture_of_thoughts/code.parquet")'
    # CPU smoke run of the same recipe on a tiny Qwen3 and the synthetic task:
    python -m polaris_jax.main --config=configs/sft_r1_distill_qwen3_8b.py:tiny --workdir=/tmp/r1_tiny
    # LoRA variant (rank 64, 10x learning rate, adapter-only checkpoints):
    python -m polaris_jax.main --config=configs/sft_r1_distill_qwen3_8b.py:lora --workdir=/runs/r1_qwen3_8b_lora

Recipe (Open-R1 OpenR1-Distill-7B, which reproduces DeepSeek's distillation): AdamW at lr 4e-5,
linear warmup over 3% of steps, cosine down to 0.1x, global-norm clip 0.2, no weight decay, 32K
token rows, 128 rows per step, 5 epochs over Mixture-of-Thoughts (chat rows with `messages`;
the R1 traces carry `<think>...</think>`). Qwen3's chat template keeps the reasoning of the final
assistant turn. `train.steps` must be set for the data: 5 epochs x packed rows / 128 (the value
below is a placeholder, not derived from a dataset; `data/examples` in the metrics counts rows read).

Memory: bf16 compute with float32 master weights and Adam moments (16 bytes/param = 131 GB for
8B) FSDP-sharded over every device; full remat of each layer at 32K tokens per row; the loss
never materialises [T, V] logits (train/losses.py chunks the vocabulary projection) nor [T, T]
attention scores (attention_impl auto runs models/flash_attention.py at this length). The planner
(`python -m polaris_jax.tools.plan --config=configs/sft_r1_distill_qwen3_8b.py --model=qwen3_8b
--mesh=fsdp=64`) gives a 36.7 GiB peak per device on 64 devices. Hardware: this config is laid out for
one node of 8 x 80 GB GPUs (H100 / H800; `hardware`, `mesh` fsdp=8): 16 microbatches, one 32K row per
device and microbatch (tests/tools/test_recipe_fit.py plans it under 90% of 80 GB).

LoRA: "LoRA Without Regret" (see polaris_jax/models/lora.py) wants ~10x the full fine-tuning
learning rate, so the lora variant uses 4e-4 with alpha 32.
"""

from polaris_jax.train.sft.config import default_config


def get_config(arg: str | None = None):
    variant = arg or ""
    if variant not in ("", "tiny", "lora"):
        raise ValueError(f"unknown variant {variant!r}; choose '', 'tiny' or 'lora'")
    c = default_config()
    c.model.preset = "deepseek_r1_0528_qwen3_8b"
    c.model.init_from = "/ckpt/Qwen3-8B-Base"
    c.model.param_dtype = "float32"
    c.model.compute_dtype = "bfloat16"
    c.model.remat_policy = "full"

    c.data.sources = ("/data/mixture_of_thoughts/math.parquet",)
    c.data.batch_size = 128
    c.data.seq_len = 32768
    c.data.mode = "pack"
    c.data.order = "shuffle"
    c.data.num_epochs = 5
    c.data.chat_template = "qwen3"

    c.optimizer.peak_lr = 4e-5
    c.optimizer.warmup_ratio = 0.03
    c.optimizer.min_lr_ratio = 0.1
    c.optimizer.weight_decay = 0.0
    c.optimizer.grad_clip_norm = 0.2

    c.train.steps = 9000
    c.train.microbatches = 16
    c.train.loss_chunk_size = 1024
    c.train.log_every = 10
    c.checkpoint.every = 500
    c.checkpoint.keep = 3
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 8, 1
    c.hardware = "h100"  # the device the layout is planned for (tools.plan's default --hardware)

    if variant == "lora":
        c.lora.rank = 64
        c.lora.alpha = 32.0
        c.optimizer.peak_lr = 4e-4  # ~10x the full fine-tuning rate
        c.checkpoint.lora_only = True
    if variant == "tiny":
        c.model.preset = "tiny"
        c.model.init_from = ""
        c.model.overrides.vocab_size = 0
        c.model.compute_dtype = "float32"
        c.model.remat_policy = "dots_no_batch"
        c.synthetic.task = "arith"
        c.data.sources = ()
        c.data.chat_template = ""
        c.data.batch_size = 8
        c.data.seq_len = 256
        c.train.microbatches = 1
        c.mesh.fsdp = -1
        c.data.num_epochs = 0
        c.train.steps = 20
        c.train.loss_chunk_size = 128
        c.train.log_every = 5
        c.checkpoint.every = 10
    return c.lock()
