"""The Tinker REST surface (`/api/v1/...`), as the tinker SDK 0.38 calls it.

Bodies are JSON except forward_backward's request (protobuf, maybe zstd) and the forward_backward and
sample results (protobuf, through retrieve_future). A client error is a 400 with a JSON body naming
the field (never a 5xx or an empty 400: the SDK retries those for minutes). retrieve_future
long-polls: it holds the request until the result is ready or `poll_s` passed, then says try_again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid

import fastapi
from fastapi.responses import JSONResponse, Response

from polaris_jax.serve import training_runs
from polaris_jax.serve.base_model import BaseModel
from polaris_jax.serve.futures import Futures
from polaris_jax.serve.store import SessionRow, Store
from polaris_jax.serve.tinker_proto import BadInput, parse_forward_backward
from polaris_jax.serve.tinker_sampling import Sampling
from polaris_jax.serve.tinker_training import Training

SDK_VERSION = "0.38.0"  # the tinker SDK whose REST surface this module serves


@dataclasses.dataclass
class Tinker:
    base: BaseModel
    store: Store
    futures: Futures
    training: Training
    sampling: Sampling
    tokenizer: object
    poll_s: float = 30.0

    def close(self) -> None:
        self.training.worker.close()
        self.sampling.close()


def _future(request_id: str, **extra) -> dict:
    return {"request_id": request_id, **extra}


def _field(body: dict, name: str, kind=str):
    value = body.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise BadInput(f"{name}: {value!r} is missing or not a {getattr(kind, '__name__', kind)}")
    return value


def tinker_router(t: Tinker, dependencies) -> fastapi.APIRouter:
    api = fastapi.APIRouter(prefix="/api/v1", dependencies=dependencies)

    async def json_body(http: fastapi.Request) -> dict:
        try:
            body = await http.json()
        except ValueError:
            raise BadInput("body: not valid JSON") from None
        if not isinstance(body, dict):
            raise BadInput("body: a JSON object is expected")
        return body

    @api.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @api.post("/client/config")
    @api.post("/client/dynamic_config")
    def client_config():
        return {}

    @api.post("/telemetry")
    def telemetry():
        return {"status": "accepted"}

    @api.get("/get_server_capabilities")
    def capabilities():
        models = [
            {"model_name": name, "max_context_length": t.base.max_seq_len, "trainable": True, "sampleable": True}
            for name in t.base.names
        ]
        return {"supported_models": models}

    @api.post("/create_session")
    async def create_session(http: fastapi.Request):
        body = await json_body(http)
        session_id = f"sess-{uuid.uuid4().hex[:16]}"
        t.store.new_session(session_id, body.get("tags"))
        return {"session_id": session_id}

    @api.post("/session_heartbeat")
    async def heartbeat(http: fastapi.Request):
        body = await json_body(http)
        row = t.store.get(SessionRow, body.get("session_id"))
        if row is None:
            return JSONResponse({"detail": f"session_id: {body.get('session_id')!r} is unknown"}, 410)
        row.last_heartbeat = time.time()
        t.store.put(row)
        return {}

    @api.post("/sessions/{session_id}/finish")
    async def finish(session_id: str, http: fastapi.Request):
        body = await json_body(http)
        row = t.store.get(SessionRow, session_id)
        if row is not None:
            row.finished = str((body.get("reason") or {}).get("type", "success"))
            t.store.put(row)
        return {}

    @api.post("/create_model")
    async def create_model(http: fastapi.Request):
        body = await json_body(http)
        session_id = _field(body, "session_id")
        seq = _field(body, "model_seq_id", int)
        training_runs.save_metadata(t.store, f"{session_id}:train:{seq}", body.get("user_metadata"))  # checked first
        request_id = t.training.create_model(session_id, seq, body.get("base_model"), body.get("lora_config") or {})
        return _future(request_id, model_id=f"{session_id}:train:{seq}")

    @api.get("/training_runs/{model_id}")
    def training_run(model_id: str):
        return training_runs.training_run(t.store, model_id)

    @api.get("/training_runs/{model_id}/checkpoints")
    def training_run_checkpoints(model_id: str):
        return training_runs.checkpoints(t.store, model_id)

    @api.post("/get_info")
    async def get_info(http: fastapi.Request):
        body = await json_body(http)
        run = t.training.run(body.get("model_id"))
        model_data = {"model_name": t.base.name, "arch": t.base.config.arch, "tokenizer_id": t.base.directory}
        return {"model_id": run.model_id, "model_data": model_data, "is_lora": True, "lora_rank": run.spec.rank}

    @api.post("/forward_backward")
    async def forward_backward(http: fastapi.Request):
        if "protobuf" not in http.headers.get("content-type", ""):
            raise BadInput("body: forward_backward takes a ForwardBackwardRequest protobuf (application/x-protobuf)")
        raw = await http.body()
        req = await asyncio.to_thread(
            parse_forward_backward, raw, http.headers.get("content-encoding"), t.base.vocab_size
        )
        return _future(t.training.forward_backward(req), model_id=req.model_id)

    @api.post("/optim_step")
    async def optim_step(http: fastapi.Request):
        body = await json_body(http)
        model_id = body.get("model_id")
        return _future(t.training.optim_step(model_id, body.get("seq_id"), body.get("adam_params")), model_id=model_id)

    @api.post("/save_weights")
    async def save_weights(http: fastapi.Request):
        body = await json_body(http)
        model_id = body.get("model_id")
        request_id = t.training.save(
            model_id, body.get("seq_id"), "weights", body.get("path"), bool(body.get("overwrite"))
        )
        return _future(request_id, model_id=model_id)

    @api.post("/save_weights_for_sampler")
    async def save_weights_for_sampler(http: fastapi.Request):
        body = await json_body(http)
        model_id, seq = body.get("model_id"), body.get("seq_id")
        if body.get("path"):
            request_id = t.training.save(model_id, seq, "sampler_weights", body["path"], bool(body.get("overwrite")))
        else:
            session_id = str(model_id).split(":train:")[0]
            request_id = t.training.snapshot(
                model_id, seq, lambda spec, adapter: t.sampling.add_live(session_id, spec, adapter)
            )
        return _future(request_id, model_id=model_id)

    @api.post("/load_weights")
    async def load_weights(http: fastapi.Request):
        body = await json_body(http)
        path, optimizer = body.get("path"), bool(body.get("optimizer"))
        if body.get("model_id"):
            request_id = t.training.load_into(body["model_id"], body.get("seq_id"), path, optimizer)
            return _future(request_id, model_id=body["model_id"])
        session_id, seq = _field(body, "session_id"), _field(body, "model_seq_id", int)
        request_id = t.training.load_into_new(session_id, seq, path, optimizer)
        return _future(request_id, model_id=f"{session_id}:train:{seq}")

    @api.post("/create_sampling_session")
    async def create_sampling_session(http: fastapi.Request):
        body = await json_body(http)
        session_id = _field(body, "session_id")
        seq = _field(body, "sampling_session_seq_id", int)
        sampler_id = t.sampling.create(session_id, seq, body.get("base_model"), body.get("model_path"))
        return {"sampling_session_id": sampler_id}

    @api.get("/samplers/{sampler_id}")
    def sampler_info(sampler_id: str):
        weights = t.sampling.sampler(sampler_id)
        path = None if weights.key == "base" or weights.key.startswith("live:") else weights.key
        return {"sampler_id": sampler_id, "base_model": t.base.name, "model_path": path}

    @api.post("/asample")
    async def asample(http: fastapi.Request):
        body = await json_body(http)
        call = t.sampling.request(body, t.tokenizer)
        if t.sampling.queue_full(call.weights):  # refused, not queued until memory runs out; the SDK retries a 429
            return JSONResponse({"detail": "the sampler's queue is full; retry later"}, 429)
        request_id = t.futures.create("sample")
        asyncio.create_task(t.sampling.sample(call, request_id))
        return _future(request_id, sample_sequence_ids=[f"{request_id}:{i}" for i in range(call.request.n)])

    @api.post("/retrieve_future")
    async def retrieve_future(http: fastapi.Request):
        body = await json_body(http)
        request_id = body.get("request_id")
        outcome = await t.futures.wait(request_id, t.poll_s)
        if outcome is None:
            raise BadInput(f"request_id: {request_id!r} was never issued by this server")
        status, content_type, payload = outcome
        if status == "pending":
            return {"type": "try_again", "request_id": request_id, "queue_state": "active"}
        return Response(payload, media_type=content_type)

    @api.api_route("/{route:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    def unknown_route(route: str, http: fastapi.Request):
        """Last: a route this server lacks, most often an SDK of another version calling its own surface."""
        sdk = http.headers.get("x-stainless-package-version", "unknown")
        detail = f"/api/v1/{route} is not served: this server speaks the REST surface of tinker=={SDK_VERSION}"
        if sdk != SDK_VERSION:
            detail += f" and this client is tinker {sdk} (pip install tinker=={SDK_VERSION})"
        return JSONResponse({"detail": detail}, 404)

    return api
