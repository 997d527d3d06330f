"""Linear merge of N Hugging Face checkpoints with weights (Fathom-R1's final step), tensor by tensor.

    python -m polaris_jax.tools.merge --inputs=run_a/export/hf,run_b/export/hf --weights=0.5,0.5 --output=DIR
    python -m polaris_jax.main --config=configs/merge.py --workdir=DIR \
        --config.inputs='("run_a/export/hf", "run_b/export/hf")' --config.weights='(0.5, 0.5)'

merged[name] = sum_i w_i * input_i[name], accumulated in float32 and stored in the first input's dtype.
Weights are divided by their sum unless `normalize=False` (mergekit's `linear` does the same). All
inputs must share config.json's architecture and every tensor's name and shape. Only one tensor of
each input is in memory at a time (inputs are memory-mapped). The output keeps the first input's
file layout, config.json and tokenizer files, and appears only once complete.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
from collections.abc import Sequence

import numpy as np

from polaris_jax.files import atomic_directory
from polaris_jax.models.config import ModelConfig
from polaris_jax.models.safetensors_io import CheckpointReader, SafetensorsFile, write_safetensors

_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "model.safetensors.index.json",
)


def _file_layout(directory: str) -> dict[str, list[str]]:
    """{safetensors file name: tensor names in it} of one checkpoint directory."""
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            layout = collections.defaultdict(list)
            for name, shard in json.load(f)["weight_map"].items():
                layout[shard].append(name)
            return dict(layout)
    return {"model.safetensors": list(SafetensorsFile(os.path.join(directory, "model.safetensors")).keys())}


def _architecture(path: str) -> ModelConfig:
    """The checkpoint's config with storage-only fields (dtype, eos ids) neutralised."""
    return ModelConfig.from_hf(path).replace(param_dtype="float32", compute_dtype="float32", eos_token_ids=())


def _check_inputs(inputs: Sequence[str], weights: Sequence[float]) -> None:
    if len(inputs) < 2:
        raise ValueError(f"a merge needs at least 2 checkpoints, got {len(inputs)}")
    if len(weights) != len(inputs):
        raise ValueError(f"{len(inputs)} checkpoints but {len(weights)} weights")
    for path in inputs:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    first = _architecture(inputs[0])
    for path in inputs[1:]:
        if _architecture(path) != first:
            raise ValueError(f"{path} has a different architecture from {inputs[0]} (compare their config.json)")


def merge_checkpoints(
    inputs: Sequence[str], weights: Sequence[float], output: str, *, normalize: bool = True, overwrite: bool = False
) -> str:
    """Writes the weighted average of `inputs` to `output`; returns its absolute path."""
    inputs = [os.path.abspath(os.fspath(p)) for p in inputs]
    weights = [float(w) for w in weights]
    _check_inputs(inputs, weights)
    if normalize:
        total = sum(weights)
        if total == 0:
            raise ValueError(f"weights {weights} sum to 0 and cannot be normalised")
        weights = [w / total for w in weights]
    output = os.path.abspath(os.fspath(output))
    if os.path.isdir(output) and os.listdir(output) and not overwrite:  # before reading any input
        raise FileExistsError(f"{output} exists and is not empty; pass overwrite=True to replace it")
    readers = [CheckpointReader(p) for p in inputs]
    layout = _file_layout(inputs[0])
    with atomic_directory(output, overwrite=overwrite) as tmp:
        for file_name, names in layout.items():
            write_safetensors(
                os.path.join(tmp, file_name),
                {n: _merged_tensor(readers, weights, n) for n in names},
                metadata={"format": "pt", "merged_from": json.dumps(inputs), "merge_weights": json.dumps(weights)},
            )
        for name in _SIDE_FILES:
            if os.path.exists(os.path.join(inputs[0], name)):
                shutil.copy2(os.path.join(inputs[0], name), os.path.join(tmp, name))
    return output


def _merged_tensor(readers, weights, name: str) -> np.ndarray:
    first = readers[0].get(name)
    acc = np.zeros(first.shape, np.float32)
    for reader, weight in zip(readers, weights):
        if name not in reader:
            raise KeyError(f"checkpoint {reader.directory} is missing tensor {name!r}")
        tensor = reader.get(name)
        if tensor.shape != first.shape:
            raise ValueError(
                f"tensor {name!r} has shape {tensor.shape} in {reader.directory} "
                f"but {first.shape} in {readers[0].directory}"
            )
        acc += weight * tensor.astype(np.float32)
    return acc.astype(first.dtype)


def run(config, workdir: str) -> dict:
    """The `merge` job of polaris_jax.main: config.inputs, config.weights, config.output ('' = workdir/merged)."""
    output = config.output or os.path.join(workdir, "merged")
    path = merge_checkpoints(
        list(config.inputs), list(config.weights), output, normalize=config.normalize, overwrite=config.overwrite
    )
    return {"output": path, "num_inputs": len(config.inputs)}


def _main(argv) -> None:
    del argv
    from absl import flags

    values = flags.FLAGS
    path = merge_checkpoints(
        values.inputs,
        [float(w) for w in values.weights],
        values.output,
        normalize=values.normalize,
        overwrite=values.overwrite,
    )
    print(json.dumps({"output": path, "num_inputs": len(values.inputs)}))


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_list("inputs", None, "Comma-separated Hugging Face checkpoint directories.", required=True)
    flags.DEFINE_list("weights", None, "Comma-separated weights, one per input.", required=True)
    flags.DEFINE_string("output", None, "Output directory.", required=True)
    flags.DEFINE_bool("normalize", True, "Divide the weights by their sum.")
    flags.DEFINE_bool("overwrite", False, "Replace a non-empty output directory.")
    app.run(_main)
