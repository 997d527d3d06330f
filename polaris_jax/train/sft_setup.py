"""What an SFT run is built from: tokenizer, data iterator and model (random, HF, + LoRA), from the config.

Config sections read here (see configs/sft_tiny.py for a complete example):
  model:     preset, init_from (HF dir, '' = random init), overrides (ModelConfig fields; vocab_size 0 =
             the tokenizer's, rounded up to 8), param_dtype, compute_dtype, remat_policy
  lora:      rank (0 = full fine-tuning), alpha, targets
  tokenizer_dir: '' = model.init_from
  data:      `polaris_jax.data.sft_pipeline.SFTDataConfig` fields
  synthetic: task ('' or 'arith'), num_examples, seed: writes a jsonl + tokenizer into the workdir
"""

from __future__ import annotations

import json
import os
import tempfile

import jax

from polaris_jax.data import synthetic_arith
from polaris_jax.data.sft_pipeline import SFTDataConfig, make_sft_iterator
from polaris_jax.data.tokenizer import Tokenizer
from polaris_jax.distributed import wait_for_process_zero
from polaris_jax.models import lora as lora_lib
from polaris_jax.models.config import ConfigError, ModelConfig, preset
from polaris_jax.models.hf_io import load_hf
from polaris_jax.models.sharding import param_shardings
from polaris_jax.train import partitioning

SYNTHETIC_TASKS = ("", "arith")
_ARITH_MIX = {"correct": 0.6, "slip": 0.25, "lazy": 0.15}


def _write_jsonl_atomic(path: str, records) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".jsonl")
    with os.fdopen(fd, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    os.replace(tmp, path)


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
        problems = synthetic_arith.sample_problems(config.synthetic.seed, config.synthetic.num_examples,
                                                   synthetic_arith.ArithTask())
        traces = synthetic_arith.sft_traces(problems, _ARITH_MIX, config.synthetic.seed)
        records = ({"prompt": p.text, "response": text, "difficulty": len(p.operands)} for p, _, text in traces)
        _write_jsonl_atomic(path, records)
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
            raise ValueError(f"data.batch_size={values['batch_size']} (global rows per step) does not divide "
                             f"over {jax.process_count()} processes")
        values.update(shard_index=jax.process_index(), shard_count=jax.process_count(),
                      batch_size=values["batch_size"] // jax.process_count())
    return SFTDataConfig.from_config(values)


def make_data_iterator(config, tokenizer: Tokenizer, sources):
    return make_sft_iterator(data_config(config, sources), tokenizer)


def model_config_from(config, tokenizer: Tokenizer | None = None) -> ModelConfig:
    """The ModelConfig a run trains (before LoRA), from init_from's config.json or a preset."""
    overrides = dict(config.model.overrides.to_dict()) if "overrides" in config.model else {}
    overrides.update(param_dtype=config.model.param_dtype, compute_dtype=config.model.compute_dtype,
                     remat_policy=config.model.remat_policy)
    if overrides.get("vocab_size", None) == 0:
        if tokenizer is None:
            raise ValueError("model.overrides.vocab_size=0 takes the tokenizer's size, but there is no tokenizer")
        overrides["vocab_size"] = synthetic_arith.padded_vocab_size(tokenizer)
    if tokenizer is not None and not config.model.init_from and "eos_token_ids" not in overrides:
        overrides["eos_token_ids"] = tuple(tokenizer.eos_token_ids)
    try:
        if config.model.init_from:
            model_config = ModelConfig.from_hf(config.model.init_from, **overrides)
        elif config.model.preset == "tiny":
            model_config = ModelConfig.tiny(**overrides)
        else:
            model_config = preset(config.model.preset, **overrides)
    except TypeError as e:  # an override that is not a ModelConfig field
        raise ConfigError(f"model.overrides: {e}") from e
    if tokenizer is not None and tokenizer.vocab_size > model_config.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                          f"{model_config.vocab_size}")
    return model_config


def with_lora(config, model_config: ModelConfig) -> ModelConfig:
    if config.lora.rank <= 0:
        return model_config
    return model_config.replace(lora_rank=config.lora.rank, lora_alpha=float(config.lora.alpha),
                                lora_targets=tuple(config.lora.targets))


def build_params(config, model_config: ModelConfig, mesh, rules, rng):
    """(config actually trained, params in their shards, trainable mask). LoRA adapters are added on top."""
    init_rng, lora_rng = jax.random.split(rng)
    if config.model.init_from:
        shardings = param_shardings(model_config, mesh, rules)
        _, params = load_hf(config.model.init_from, dtype=model_config.param_dtype, shardings=shardings,
                            config_overrides={k: getattr(model_config, k) for k in
                                              ("compute_dtype", "remat_policy")})
    else:
        params = partitioning.init_sharded_params(model_config, init_rng, mesh, rules)
    if config.lora.rank <= 0:
        return model_config, params, jax.tree.map(lambda _: True, params)
    lora_config = with_lora(config, model_config)

    def add(base, key):  # builds only the adapters: XLA drops the unused fresh base weights
        return lora_lib.add_lora(model_config, base, key, rank=lora_config.lora_rank, alpha=lora_config.lora_alpha,
                                 targets=lora_config.lora_targets)[1]

    params = jax.jit(add, out_shardings=param_shardings(lora_config, mesh, rules), donate_argnums=0)(params,
                                                                                                        lora_rng)
    return lora_config, params, lora_lib.lora_mask(params)
