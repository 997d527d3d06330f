"""Fathom-R1-style curriculum SFT of DeepSeek-R1-Distill-Qwen-14B at 16K tokens.

    python -m polaris_jax.main --config=configs/sft_fathom_r1_14b.py --workdir=/runs/fathom_14b \
        --config.model.init_from=/ckpt/DeepSeek-R1-Distill-Qwen-14B \
        --config.data.sources='("/data/fathom_sft.jsonl",)'
    # CPU smoke run of the same recipe on a tiny Qwen2-architecture model and the synthetic task:
    python -m polaris_jax.main --config=configs/sft_fathom_r1_14b.py:tiny --workdir=/tmp/fathom_tiny
    # then the Fathom merge of several runs (e.g. different seeds / data slices):
    python -m polaris_jax.tools.merge --inputs=/runs/a/export/hf,/runs/b/export/hf --weights=0.5,0.5 \
        --output=/runs/fathom_merged

Fathom-R1-14B (Fractal AI) trains R1-Distill-Qwen-14B on a curated set of hard math problems in
a curriculum, easy to hard within each epoch, at a 16K context, and linearly merges the resulting
checkpoints. Here `data.order="curriculum"` sorts each epoch by the rows' `difficulty` field
(numbers, or named levels listed in `data.difficulty_levels`), seeded ties, and the R1-Distill chat
template (which opens `<think>\\n` in the generation prompt) renders the examples. Fathom
published the recipe's shape, not every hyper-parameter: lr 1e-5 with warmup 3% and cosine to 0.1x,
clip 1.0, 3 epochs and 64 rows per step are our choices for a few-thousand-example set.

Hardware: one node of 8 x 80 GB GPUs (`hardware`, `mesh` fsdp=8), 8 microbatches of one 16K row per device
(tests/tools/test_recipe_fit.py plans it under 90% of 80 GB).

LoRA instead of full fine-tuning: set --config.lora.rank=64 and multiply peak_lr by ~10
(see polaris_jax/models/lora.py, "LoRA Without Regret").
"""

from polaris_jax.train.sft.config import default_config


def get_config(arg: str | None = None):
    variant = arg or ""
    if variant not in ("", "tiny"):
        raise ValueError(f"unknown variant {variant!r}; choose '' or 'tiny'")
    c = default_config()
    c.model.preset = "r1_distill_qwen_14b"
    c.model.init_from = "/ckpt/DeepSeek-R1-Distill-Qwen-14B"
    c.model.param_dtype = "float32"
    c.model.compute_dtype = "bfloat16"
    c.model.remat_policy = "full"

    c.data.sources = ("/data/fathom_sft.jsonl",)
    c.data.batch_size = 64
    c.data.seq_len = 16384
    c.data.mode = "pack"
    c.data.order = "curriculum"
    c.data.difficulty_key = "difficulty"
    c.data.num_epochs = 3
    c.data.chat_template = "r1_distill_qwen"

    c.optimizer.peak_lr = 1e-5
    c.optimizer.warmup_ratio = 0.03
    c.optimizer.min_lr_ratio = 0.1
    c.optimizer.grad_clip_norm = 1.0

    c.train.steps = 300
    c.train.microbatches = 8
    c.train.loss_chunk_size = 1024
    c.train.log_every = 5
    c.checkpoint.every = 50
    c.checkpoint.keep = 6  # several checkpoints to merge
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 8, 1
    c.hardware = "h100"  # the device the layout is planned for (tools.plan's default --hardware)

    if variant == "tiny":
        c.model.preset = "tiny"
        c.model.init_from = ""
        c.model.overrides.arch = "qwen2"
        c.model.overrides.vocab_size = 0
        c.model.compute_dtype = "float32"
        c.model.remat_policy = "dots_no_batch"
        c.synthetic.task = "arith"
        c.data.sources = ()
        c.data.chat_template = ""
        c.data.order = "curriculum"  # synthetic difficulty = number of operands
        c.data.batch_size = 8
        c.data.seq_len = 256
        c.train.microbatches = 1
        c.mesh.fsdp = -1
        c.data.num_epochs = 0
        c.train.steps = 20
        c.train.loss_chunk_size = 128
        c.checkpoint.every = 10
    return c.lock()
