"""Shared helpers of the SFT tests: golden-batch conversion, HF gradient layout, packed batches."""

from __future__ import annotations

import numpy as np

from polaris_jax.data import packing
from polaris_jax.models import hf_names
from polaris_jax.models.params import param_specs

IGNORE = -100


class DictReader:
    """The reader interface of `hf_names` over a dict of HF-named arrays."""

    def __init__(self, arrays: dict):
        self.arrays, self.directory = arrays, "<dict>"

    def __contains__(self, name):
        return name in self.arrays

    def shape(self, name):
        return self.arrays[name].shape

    def get(self, name):
        return self.arrays[name]


def hf_tree(config, arrays_by_hf_name: dict) -> dict:
    """HF-named tensors (e.g. torch gradients) -> our parameter tree layout (stacked layers)."""
    reader = DictReader(arrays_by_hf_name)
    out = {}
    for key, spec in param_specs(config).items():
        if key.endswith("_layers"):
            kind = key[: -len("_layers")]
            layers = [i for i in range(config.num_layers) if ("moe" if config.layer_is_moe(i) else "dense") == kind]
            out[key] = {
                name: np.stack([hf_names.read_layer_tensor(config, reader, i, kind, name) for i in layers])
                for name in spec
            }
        else:
            out[key] = hf_names.read_top_tensor(config, reader, key)
    return out


def golden_sft_batch(golden) -> dict:
    """transformers' (input_ids, attention_mask, labels with -100, shifted inside the loss) -> our batch,
    where targets_bt[t] is the token at t+1 and the mask says which of those are trained."""
    ids_bt, labels_bt = golden["sft_input_ids"], golden["sft_labels"]
    targets_bt = np.zeros_like(ids_bt)
    targets_bt[:, :-1] = np.where(labels_bt[:, 1:] == IGNORE, 0, labels_bt[:, 1:])
    mask_bt = np.zeros_like(ids_bt)
    mask_bt[:, :-1] = labels_bt[:, 1:] != IGNORE
    return {
        "tokens_bt": ids_bt,
        "positions_bt": golden["sft_position_ids"],
        "segment_ids_bt": golden["sft_attention_mask"],
        "targets_bt": targets_bt,
        "loss_mask_bt": mask_bt,
    }


def random_sequences(rng: np.random.Generator, lengths, vocab: int):
    """[(tokens, loss mask on the tokens)]: a prompt part (mask 0) then a response part (mask 1)."""
    out = []
    for length in lengths:
        tokens = rng.integers(1, vocab, size=length).astype(np.int32)
        mask = np.zeros(length, np.int32)
        mask[rng.integers(1, length) :] = 1
        out.append((tokens, mask))
    return out


def packed_batch(rows_of_sequences, length: int, pad_id: int = 0) -> dict:
    return packing.stack_rows([packing.make_row(row, length, pad_id) for row in rows_of_sequences])


def random_packed_batch(seed: int, batch: int, length: int, vocab: int) -> dict:
    """Rows filled with 1-3 random sequences each (plus padding)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(batch):
        count = int(rng.integers(1, 4))
        cuts = np.sort(rng.choice(np.arange(4, length - 2), size=count, replace=False))
        lengths = np.diff(np.concatenate([[0], cuts])).tolist()
        rows.append(random_sequences(rng, [max(n, 2) for n in lengths], vocab))
    return packed_batch(rows, length)
