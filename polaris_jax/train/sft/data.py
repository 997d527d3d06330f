"""What an SFT run reads: the tokenizer and the data iterator, from the config (the model comes from
`train.setup`).

Config sections read here (see configs/sft_tiny.py for a complete example):
  tokenizer_dir: '' = model.init_from
  data:      `polaris_jax.data.sft_pipeline.SFTDataConfig` fields
  synthetic: task ('' or 'arith'), num_examples, seed: writes a jsonl + tokenizer into the workdir
"""

from __future__ import annotations

import os

import jax

from polaris_jax.data import synthetic_arith
from polaris_jax.data.sft_pipeline import SFTDataConfig, make_sft_iterator
from polaris_jax.data.tokenizer import Tokenizer
from polaris_jax.distributed import wait_for_process_zero
from polaris_jax.files import jsonl, write_atomic

SYNTHETIC_TASKS = ("", "arith")
_ARITH_MIX = {"correct": 0.6, "slip": 0.25, "lazy": 0.15}


def prepare_synthetic(config, workdir: str) -> tuple[tuple[str, ...], str] | None:
    """Writes the synthetic task's SFT jsonl and tokenizer under workdir/data (idempotent)."""
    task = config.synthetic.task
    if task not in SYNTHETIC_TASKS:
        raise ValueError(f"synthetic.task={task!r} is not one of {SYNTHETIC_TASKS}")
    if not task:
        return None
    data_dir = os.path.join(workdir, "data")
    tokenizer_dir = os.path.join(data_dir, "tokenizer")
    path = os.path.join(data_dir, "sft_arith.jsonl")
    if jax.process_index() == 0 and not os.path.exists(path):
        os.makedirs(data_dir, exist_ok=True)
        synthetic_arith.build_tokenizer(tokenizer_dir)
        problems = synthetic_arith.sample_problems(
            config.synthetic.seed, config.synthetic.num_examples, synthetic_arith.ArithTask()
        )
        traces = synthetic_arith.sft_traces(problems, _ARITH_MIX, config.synthetic.seed)
        records = ({"prompt": p.text, "response": text, "difficulty": len(p.operands)} for p, _, text in traces)
        write_atomic(path, jsonl(records))
    wait_for_process_zero("synthetic data")
    return (path,), tokenizer_dir


def load_tokenizer(config, workdir: str) -> tuple[Tokenizer, tuple[str, ...], str]:
    """(tokenizer, data sources, tokenizer dir)."""
    synthetic = prepare_synthetic(config, workdir)
    sources = tuple(config.data.sources)
    tokenizer_dir = config.tokenizer_dir or config.model.init_from
    if synthetic is not None:
        sources = sources or synthetic[0]
        tokenizer_dir = config.tokenizer_dir or synthetic[1]
    if not tokenizer_dir:
        raise ValueError("no tokenizer: set tokenizer_dir, model.init_from or synthetic.task")
    if not sources:
        raise ValueError("no data: set data.sources (jsonl / parquet / tfds) or synthetic.task")
    return Tokenizer.from_dir(tokenizer_dir), sources, tokenizer_dir


_EMPTY_IS_NONE = ("chat_template", "system_prompt", "tfds_data_dir")


def data_config(config, sources) -> SFTDataConfig:
    """config.data -> SFTDataConfig; "" means None for optional strings, num_epochs 0 means repeat forever."""
    values = {**config.data.to_dict(), "sources": tuple(sources)}
    values.update({k: None for k in _EMPTY_IS_NONE if values.get(k) == ""})
    if values.get("num_epochs") == 0:
        values["num_epochs"] = None
    if jax.process_count() > 1:  # each host reads its own slice of every epoch's order and its share of rows
        if values["batch_size"] % jax.process_count():
            raise ValueError(
                f"data.batch_size={values['batch_size']} (global rows per step) does not divide "
                f"over {jax.process_count()} processes"
            )
        values.update(
            shard_index=jax.process_index(),
            shard_count=jax.process_count(),
            batch_size=values["batch_size"] // jax.process_count(),
        )
    return SFTDataConfig.from_config(values)


def make_data_iterator(config, tokenizer: Tokenizer, sources):
    return make_sft_iterator(data_config(config, sources), tokenizer)
