"""The REST client's view of training runs: `GET /api/v1/training_runs/{id}` (the SDK's `TrainingRun`, which
tinker-cookbook reads for the renderer name in `user_metadata` when it resumes) and
`GET /api/v1/training_runs/{id}/checkpoints` (`CheckpointsListResponse`). Both come from the database, so
they answer after a restart too."""

from __future__ import annotations

import datetime
import json

from polaris_jax.serve.store import CheckpointRow, RunMetadataRow, RunRow, Store
from polaris_jax.serve.tinker_proto import BadInput

_CHECKPOINT_TYPES = {"weights": "training", "sampler_weights": "sampler"}


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat()


def save_metadata(store: Store, model_id: str, user_metadata) -> None:
    """Keeps create_model's `user_metadata` (a JSON object; values kept as strings, as the SDK types them)."""
    if user_metadata is None:
        return
    if not isinstance(user_metadata, dict):
        raise BadInput(f"user_metadata: {user_metadata!r} is not a JSON object")
    text = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in user_metadata.items()}
    store.put(RunMetadataRow(model_id=model_id, user_metadata=json.dumps(text)))


def checkpoint_json(row: CheckpointRow) -> dict:
    return {
        "checkpoint_id": f"{row.kind}/{row.name}",
        "checkpoint_type": _CHECKPOINT_TYPES[row.kind],
        "time": _iso(row.created),
        "tinker_path": row.path,
        "public": False,
    }


def checkpoints(store: Store, model_id: str) -> dict:
    _run(store, model_id)
    rows = sorted(store.where(CheckpointRow, model_id=model_id), key=lambda r: r.created)
    return {"checkpoints": [checkpoint_json(r) for r in rows], "cursor": None}


def training_run(store: Store, model_id: str) -> dict:
    run = _run(store, model_id)
    rows = sorted(store.where(CheckpointRow, model_id=model_id), key=lambda r: r.created)
    last = {kind: next((r for r in reversed(rows) if r.kind == kind), None) for kind in _CHECKPOINT_TYPES}
    metadata = store.get(RunMetadataRow, model_id)
    return {
        "training_run_id": model_id,
        "base_model": run.base_model,
        "model_owner": "local",
        "is_lora": True,
        "lora_rank": run.rank,
        "last_request_time": _iso(max([run.created] + [r.created for r in rows])),
        "last_checkpoint": checkpoint_json(last["weights"]) if last["weights"] else None,
        "last_sampler_checkpoint": checkpoint_json(last["sampler_weights"]) if last["sampler_weights"] else None,
        "user_metadata": json.loads(metadata.user_metadata) if metadata is not None else None,
    }


def _run(store: Store, model_id: str) -> RunRow:
    run = store.get(RunRow, model_id)
    if run is None:
        raise BadInput(f"training_run_id: {model_id!r} is not a training run of this server")
    return run
