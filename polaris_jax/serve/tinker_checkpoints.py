"""Adapter checkpoints on disk (orbax), written so that a kill mid-save loses nothing already saved.

Each save goes to a fresh directory `WORKDIR/checkpoints/<uuid>` (orbax itself writes into a temporary
directory and renames it when complete); only then does the database row for its `tinker://` path
point at it, and an overwritten checkpoint's old directory is removed after that. A `weights` save
holds {adapter, opt_state}; a `sampler_weights` save holds {adapter}.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid

import jax
import orbax.checkpoint as ocp

from polaris_jax.serve.store import CheckpointRow
from polaris_jax.serve.tinker_proto import BadInput
from polaris_jax.train.adapters import AdapterSpec, init_adapter, init_opt_state

KINDS = ("weights", "sampler_weights")


def tinker_path(model_id: str, kind: str, name: str) -> str:
    return f"tinker://{model_id}/{kind}/{name}"


def check_name(name) -> str:
    if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
        raise BadInput(f"path: {name!r} is not a checkpoint name (non-empty, no '/')")
    return name


def parse_path(path, field: str = "path") -> tuple[str, str, str]:
    """(model_id, kind, name) of `tinker://MODEL_ID/KIND/NAME`; BadInput naming `field` otherwise."""
    parts = path[len("tinker://") :].split("/") if isinstance(path, str) and path.startswith("tinker://") else []
    if len(parts) != 3 or parts[1] not in KINDS or not all(parts):
        raise BadInput(f"{field}: {path!r} is not tinker://MODEL_ID/{{weights|sampler_weights}}/NAME")
    return parts[0], parts[1], parts[2]


def save(workdir: str, model_id: str, kind: str, name: str, spec: AdapterSpec, adapter, opt_state) -> CheckpointRow:
    directory = os.path.join(workdir, "checkpoints", uuid.uuid4().hex)
    tree = {"adapter": adapter} if kind == "sampler_weights" else {"adapter": adapter, "opt_state": opt_state}
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory, tree)
    checkpointer.wait_until_finished()
    checkpointer.close()
    return CheckpointRow(
        path=tinker_path(model_id, kind, name),
        model_id=model_id,
        kind=kind,
        name=name,
        directory=directory,
        rank=spec.rank,
        train_attn=spec.train_attn,
        train_mlp=spec.train_mlp,
        train_unembed=spec.train_unembed,
        has_optimizer=kind == "weights",
        created=time.time(),
    )


def spec_of(row: CheckpointRow, seed: int = 0) -> AdapterSpec:
    return AdapterSpec(
        rank=row.rank, seed=seed, train_attn=row.train_attn, train_mlp=row.train_mlp, train_unembed=row.train_unembed
    )


def load(base_config, row: CheckpointRow, with_optimizer: bool):
    """(adapter, opt_state or None) restored from `row`'s directory."""
    if not os.path.isdir(row.directory):
        raise BadInput(f"path: {row.path}'s files are gone from {row.directory}")
    adapter = init_adapter(base_config, spec_of(row))
    template = {"adapter": adapter}
    if row.has_optimizer:
        template["opt_state"] = init_opt_state(adapter)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    checkpointer = ocp.StandardCheckpointer()
    restored = checkpointer.restore(row.directory, abstract)
    checkpointer.close()
    opt_state = restored.get("opt_state") if with_optimizer else None
    return restored["adapter"], opt_state


def remove(directory: str) -> None:
    shutil.rmtree(directory, ignore_errors=True)
