"""The HTTP app: the OpenAI-compatible routes (here) and the Tinker REST surface (`tinker_api`).

GET /health (no key; 200 once the model is loaded and the engine warm, else 503), GET /v1/models,
POST /v1/completions, POST /v1/chat/completions (both with SSE streaming). With an API key set, every
route but /health needs `Authorization: Bearer KEY` or `X-API-Key: KEY` (else 401).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import random
import time
import uuid

import fastapi
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from openai.types import Completion, Model
from openai.types.chat import ChatCompletionChunk
from starlette.background import BackgroundTask

from polaris_jax.data.tokenizer import Tokenizer
from polaris_jax.sampling.requests import QueueFull, Request, RequestError
from polaris_jax.serve import metrics
from polaris_jax.serve import openai_api as api
from polaris_jax.serve.base_model import BaseModel
from polaris_jax.serve.choices import ChoiceText, drive
from polaris_jax.serve.engine_thread import EngineStopped, EngineThread
from polaris_jax.serve.futures import HTTP_REQUEST_ID
from polaris_jax.serve.tinker_api import Tinker, tinker_router
from polaris_jax.serve.tinker_proto import BadInput

log = logging.getLogger("polaris_jax.serve")


@dataclasses.dataclass
class Served:
    """What the routes serve: the base model's engine thread, its tokenizer, the model (names, stop ids,
    limits requests are checked against) and the API key."""

    engine: EngineThread
    tokenizer: Tokenizer
    base: BaseModel
    api_key: str | None = None

    @property
    def max_slots(self) -> int:
        return self.engine.engine.settings.max_slots


@contextlib.asynccontextmanager
async def _base_lease(engine: EngineThread):
    yield engine, 0


def _sse(obj) -> str:
    return f"data: {json.dumps(obj.model_dump(mode='json', warnings=False, exclude_none=True))}\n\n"


class RequestLog:
    """One JSON log line per HTTP request with its id (the client's X-Request-Id, or a new one), returned as
    the X-Request-Id header; a Tinker future logs that id beside its own when created, and its own when its
    work ends. Plain ASGI: Starlette's `@app.middleware("http")` wraps every `receive` in a task group, and at
    64 concurrent completions the event loop spent most of its time there (py-spy: 65% of the HTTP thread
    busy, most of it in `is_disconnected`), holding the GIL the engine thread needs between device calls."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given or uuid.uuid4().hex[:16]
        HTTP_REQUEST_ID.set(request_id)
        started, status = time.monotonic(), 500

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", request_id.encode("latin-1"))]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            fields = dict(request_id=request_id, method=scope["method"], path=scope["path"], status=status)
            log.info(json.dumps({**fields, "ms": round(1000 * (time.monotonic() - started), 1)}))


def create_app(served: Served, tinker: Tinker | None = None) -> fastapi.FastAPI:
    app = fastapi.FastAPI(title="polaris_jax", docs_url=None, redoc_url=None)

    def check_key(authorization: str | None = fastapi.Header(None), x_api_key: str | None = fastapi.Header(None)):
        if served.api_key is None:
            return
        bearer = authorization[7:] if authorization and authorization.startswith("Bearer ") else None
        if served.api_key not in (bearer, x_api_key):
            message = "a valid API key is required (Authorization: Bearer KEY or X-API-Key: KEY)"
            raise api.ApiError(401, message, None, "authentication_error")

    for error, status in ((RequestError, 400), (QueueFull, 429), (EngineStopped, 503)):
        app.add_exception_handler(
            error,
            lambda _, e, status=status: JSONResponse(
                api.ApiError(status, str(e), None, "server_error" if status >= 500 else "invalid_request_error").body(),
                status,
            ),
        )
    app.add_exception_handler(api.ApiError, lambda _, e: JSONResponse(e.body(), e.status))
    app.add_exception_handler(BadInput, lambda _, e: JSONResponse({"detail": str(e)}, 400))
    app.add_exception_handler(RequestValidationError, lambda _, e: JSONResponse(api.validation_error(e).body(), 400))

    app.add_middleware(RequestLog)

    @app.get("/health")
    def health():
        ok = served.engine.healthy
        return JSONResponse({"status": "ok" if ok else "starting"}, 200 if ok else 503)

    @app.get("/metrics")
    def prometheus_metrics():
        adapters = tinker.sampling.adapter_engines if tinker is not None else []
        text = metrics.render(served.engine, adapters, tinker.training if tinker is not None else None)
        return fastapi.Response(text, media_type="text/plain; version=0.0.4")

    v1 = fastapi.APIRouter(prefix="/v1", dependencies=[fastapi.Depends(check_key)])

    @v1.get("/models")
    def models():
        created = int(time.time())
        data = [Model(id=m, object="model", created=created, owned_by="polaris_jax") for m in served.base.names]
        return {"object": "list", "data": [m.model_dump() for m in data]}

    def lease_for(model: str):
        """The lease of (engine thread, adapter slot) for the base model or a `tinker://.../sampler_weights/...`
        path (`Sampling.lease`)."""
        if model in served.base.names:
            return _base_lease(served.engine)
        if tinker is not None and model.startswith("tinker://"):
            try:
                weights = tinker.sampling.path_weights(model)
            except BadInput as e:
                raise api.ApiError(404, f"model: {e}", "model", "not_found") from None
            return tinker.sampling.lease(weights)
        raise api.ApiError(404, f"model: {model!r} is not served (GET /v1/models)", "model", "not_found")

    def engine_requests(body, prompts: list[list[int]], field: str, max_tokens: int | None, rid: str):
        body.check_supported(served.max_slots)
        seed = body.seed if body.seed is not None else random.randrange(2**31)
        requests = []
        for i, ids in enumerate(prompts):
            budget = api.check_prompt(
                ids, max_tokens, vocab_size=served.base.vocab_size, max_seq_len=served.base.max_seq_len, field=field
            )
            requests.append(
                Request(
                    prompt=ids,
                    max_new_tokens=budget,
                    temperature=body.temperature,
                    top_p=body.top_p,
                    n=body.n,
                    eos_token_ids=served.base.eos_token_ids,
                    seed=seed,
                    sample_offset=i * body.n,
                    id=f"{rid}/{i}",
                    logprobs=body.wants_logprobs,  # none asked: greedy calls may skip them
                )
            )
        return requests

    async def respond(body, http, requests, rid, done, piece_chunk, chunk_cls):
        """Runs the requests; the full response (done(choices)) or an SSE stream of piece_chunk's. The engine
        lease (an adapter's slot) is held until the last token is out."""
        held = contextlib.AsyncExitStack()
        engine, slot = await held.enter_async_context(lease_for(body.model))
        try:
            streams = await engine.submit_all([dataclasses.replace(r, adapter=slot) for r in requests])
        except BaseException:
            await held.aclose()
            raise
        choices = [ChoiceText(served.tokenizer, body.stops) for _ in range(len(requests) * body.n)]
        prompt_tokens = sum(len(r.prompt) for r in requests)
        if not body.stream:
            async with held:
                async for _ in drive(streams, choices, body.n, http.is_disconnected):
                    pass
            if await http.is_disconnected():
                return fastapi.Response(status_code=499)
            return done(choices, prompt_tokens)

        async def events():
            try:
                if piece_chunk(0, None, None) is not None:  # chat streams open each choice with its role
                    for index in range(len(choices)):
                        yield _sse(piece_chunk(index, None, None))
                async for index in drive(streams, choices, body.n):
                    piece = choices[index].take()
                    if piece is not None:
                        yield _sse(piece_chunk(index, choices[index], piece))
                if body.include_usage:
                    yield _sse(api.usage_chunk(chunk_cls, rid, body.model, prompt_tokens, choices))
            except Exception as e:  # noqa: BLE001 - the stream has begun: the error is its last event
                yield f"data: {json.dumps(api.ApiError(500, str(e), None, 'server_error').body())}\n\n"
            finally:
                await held.aclose()
            yield "data: [DONE]\n\n"

        # The lease is also released after the response, for a client gone before the stream began.
        return StreamingResponse(events(), media_type="text/event-stream", background=BackgroundTask(held.aclose))

    @v1.post("/completions")
    async def completions(body: api.CompletionRequest, http: fastapi.Request):
        rid = api.new_id("cmpl")
        prompts = api.prompt_ids(body, served.tokenizer)
        requests = engine_requests(body, prompts, "prompt", 16 if body.max_tokens is None else body.max_tokens, rid)
        logprobs = body.wants_logprobs

        def done(choices, prompt_tokens):
            return api.completion(rid, body.model, choices, prompt_tokens, logprobs)

        def piece_chunk(index, choice, piece):
            if choice is None:
                return None  # completions streams have no opening chunk
            return api.completion_chunk(rid, body.model, index, choice, piece, logprobs)

        return await respond(body, http, requests, rid, done, piece_chunk, Completion)

    @v1.post("/chat/completions")
    async def chat_completions(body: api.ChatRequest, http: fastapi.Request):
        rid = api.new_id("chatcmpl")
        prompt = api.chat_prompt_ids(body, served.tokenizer)
        max_tokens = body.max_completion_tokens or body.max_tokens
        requests = engine_requests(body, [prompt], "messages", max_tokens, rid)
        top = (body.top_logprobs or 0) if body.logprobs else None

        def done(choices, prompt_tokens):
            return api.chat_completion(rid, body.model, choices, prompt_tokens, top)

        def piece_chunk(index, choice, piece):
            return api.chat_chunk(rid, body.model, index, choice, piece, top)

        return await respond(body, http, requests, rid, done, piece_chunk, ChatCompletionChunk)

    app.include_router(v1)
    if tinker is not None:
        app.include_router(tinker_router(tinker, [fastapi.Depends(check_key)]))
    return app
