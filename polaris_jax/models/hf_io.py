"""Hugging Face checkpoint import and export.

Import reads tensor by tensor from memory-mapped safetensors and builds each stacked parameter with
`jax.make_array_from_callback`, so every device receives only its own slice: no model is ever fully
materialised on the host. Export writes `config.json` plus safetensors (sharded above a threshold)
into a temporary directory that is renamed into place only once complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding

from polaris_jax.models import hf_names
from polaris_jax.models.config import ModelConfig
from polaris_jax.models.params import param_specs
from polaris_jax.models.safetensors_io import CheckpointReader, write_safetensors
from polaris_jax.models.sharding import DEFAULT_RULES, param_shardings

_SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)


def _np_dtype(dtype):
    return np.dtype(jnp.dtype(dtype))


def _leaf_reader(config, reader, path: tuple[str, ...], dtype):
    """A function (index tuple of slices) -> numpy block of the leaf at `path`, in our layout."""
    if path[0].endswith("_layers"):
        kind, name = path[0][: -len("_layers")], path[1]
        layers = [i for i in range(config.num_layers) if ("moe" if config.layer_is_moe(i) else "dense") == kind]

        def read(index):
            rows = range(len(layers))[index[0]]
            blocks = [hf_names.read_layer_tensor(config, reader, layers[j], kind, name)[index[1:]] for j in rows]
            return np.stack(blocks).astype(dtype)

        return read
    name = path[0]

    def read(index):
        return hf_names.read_top_tensor(config, reader, name)[index].astype(dtype)

    return read


def load_hf(path, dtype=None, *, shardings=None, mesh=None, rules=None, config_overrides=None):
    """Loads a HF checkpoint directory -> (ModelConfig, params).

    Args:
      path: directory with config.json and model.safetensors (or an index and shards).
      dtype: parameter dtype (e.g. "float32", "bfloat16"); defaults to the checkpoint's.
      shardings: optional pytree of `jax.sharding.Sharding` matching the params (see
        `models.sharding.param_shardings`); by default everything goes to the first device.
      mesh, rules: instead of `shardings`, place each parameter in its shards of `mesh` under the
        logical-axis `rules` (default `models.sharding.DEFAULT_RULES`).
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    overrides = dict(config_overrides or {})
    if dtype is not None:
        overrides["param_dtype"] = jnp.dtype(dtype).name
    config = ModelConfig.from_hf(path, **overrides)
    if mesh is not None and shardings is None:
        shardings = param_shardings(config, mesh, DEFAULT_RULES if rules is None else rules)
    reader = CheckpointReader(path)
    hf_names.check_checkpoint(config, reader)
    np_dtype = _np_dtype(config.weight_dtype)
    specs = param_specs(config)
    flat, treedef = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: hasattr(x, "axes"))
    flat_shardings = (
        jax.tree.leaves(shardings) if shardings is not None else [SingleDeviceSharding(jax.devices()[0])] * len(flat)
    )
    leaves = []
    for (key_path, spec), sharding in zip(flat, flat_shardings):
        keys = tuple(k.key for k in key_path)
        if any("_lora_" in k for k in keys):
            raise ValueError("load_hf loads base weights; add LoRA adapters after loading")
        read = _leaf_reader(config, reader, keys, np_dtype)
        leaves.append(jax.make_array_from_callback(spec.shape, sharding, read))
    return config, jax.tree.unflatten(treedef, leaves)


def _shard_plan(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    shards, current, current_bytes = [], [], 0
    for name, nbytes in sizes:
        if current and current_bytes + nbytes > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(name)
        current_bytes += nbytes
    if current:
        shards.append(current)
    return shards


def save_hf(config, params, path, *, tokenizer_dir=None, max_shard_bytes: int = 5 * 2**30, overwrite: bool = False):
    """Exports params in the layout `transformers.AutoModelForCausalLM.from_pretrained` loads.

    LoRA adapters, if present, are merged into the base weights. Tensors are fetched to the host one
    at a time. An existing non-empty `path` is kept unless `overwrite`; on any failure nothing is left
    behind and an overwritten directory is restored.

    Multi-host: every process calls this (tensors sharded over several hosts are all-gathered one at
    a time), process 0 alone writes, and all return once the export is in place.
    """
    from polaris_jax.models.lora import merge_lora

    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True to replace it")
    if config.lora_rank:
        config, params = merge_lora(config, params)
    names = hf_names.export_names(config)
    sizes = [(n, int(np.prod(shape)) * jnp.dtype(config.weight_dtype).itemsize) for n, shape in names]
    plan = _shard_plan(sizes, max_shard_bytes)
    if jax.process_count() == 1:
        return _write_hf(config, params, path, plan, sizes, tokenizer_dir)
    from jax.experimental import multihost_utils

    # Process 0 checks that it can write before the collectives start, so a bad path fails everywhere
    # instead of leaving the other processes waiting in an all-gather.
    problem = _unwritable_parent(path) if jax.process_index() == 0 else ""
    if int(multihost_utils.broadcast_one_to_all(np.int32(bool(problem)))):
        raise OSError(f"process 0 cannot write the export at {path}" + (f": {problem}" if problem else ""))
    if jax.process_index() == 0:
        _write_hf(config, params, path, plan, sizes, tokenizer_dir)
    else:
        for shard_names in plan:  # take part in the same all-gathers, in the same order
            for name in shard_names:
                hf_names.export_tensor(config, params, name)
    multihost_utils.sync_global_devices(f"save_hf {path}")
    return path


def _unwritable_parent(path: str) -> str:
    """'' if a temp directory can be made next to `path`, else why not."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        shutil.rmtree(tempfile.mkdtemp(prefix=".probe-", dir=os.path.dirname(path)))
    except OSError as e:
        return str(e)
    return ""


def _write_hf(config, params, path: str, plan, sizes, tokenizer_dir) -> str:
    """Writes the export into a temp directory next to `path`, then renames it into place."""
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent)
    try:
        weight_map = {}
        for i, shard_names in enumerate(plan):
            fname = "model.safetensors" if len(plan) == 1 else f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
            tensors = {n: hf_names.export_tensor(config, params, n) for n in shard_names}
            write_safetensors(os.path.join(tmp, fname), tensors)
            weight_map.update({n: fname for n in shard_names})
        if len(plan) > 1:
            total = sum(s for _, s in sizes)
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config.to_hf(), f, indent=2)
        if tokenizer_dir is not None:
            for name in _SIDE_FILES:
                if os.path.exists(os.path.join(tokenizer_dir, name)):
                    shutil.copy2(os.path.join(tokenizer_dir, name), os.path.join(tmp, name))
        backup = None
        if os.path.exists(path):
            backup = path + ".old-" + os.path.basename(tmp)
            os.rename(path, backup)
        try:
            os.rename(tmp, path)
        except OSError:
            if backup:
                os.rename(backup, path)
            raise
        if backup:
            shutil.rmtree(backup)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
