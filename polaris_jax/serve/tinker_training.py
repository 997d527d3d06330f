"""Tinker training clients on one base model: create, forward(_backward), optim_step, save and load.

Every call is checked when it arrives (a `BadInput` is the client's 4xx, and nothing is queued or
changed), then queued on the `OrderedWorker` in its client's seq_id order, and its result lands in
its future. Each client holds its own adapter, AdamW state and accumulated gradients; the base
weights are shared. A forward_backward is split into micro-batches of at most `max_batch_tokens`
padded tokens whose gradients add up, so one request cannot take more memory than that.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np

from polaris_jax.serve import tinker_checkpoints as ckpt
from polaris_jax.serve.base_model import BaseModel
from polaris_jax.serve.futures import PROTO, Futures
from polaris_jax.serve.ordered_worker import OrderedWorker
from polaris_jax.serve.store import CheckpointRow, RunRow, Store
from polaris_jax.serve.tinker_proto import BadInput, FwdBwdRequest, forward_backward_output
from polaris_jax.train import adapters
from polaris_jax.train.token_losses import TOKEN_LOSSES, loss_config


@dataclasses.dataclass
class Run:
    model_id: str
    spec: adapters.AdapterSpec
    config: object  # the base config with this adapter's LoRA fields
    adapter: dict
    opt_state: object
    grads: dict | None = None


class Training:
    def __init__(self, base: BaseModel, store: Store, futures: Futures, workdir: str, max_batch_tokens: int = 16384):
        self.base, self.store, self.futures, self.workdir = base, store, futures, workdir
        self.max_batch_tokens = max_batch_tokens
        self.worker = OrderedWorker()
        self.runs: dict[str, Run] = {}
        self.latency_s = {"forward_backward": [0, 0.0], "optim_step": [0, 0.0]}  # kind -> [count, seconds]

    def _timed(self, kind: str, started: float) -> None:
        self.latency_s[kind][0] += 1
        self.latency_s[kind][1] += time.monotonic() - started

    # ----- lookups -----

    def run(self, model_id) -> Run:
        run = self.runs.get(model_id)
        if run is None:
            raise BadInput(f"model_id: {model_id!r} is not a training client of this server")
        return run

    def checkpoint(self, path, field: str = "path") -> CheckpointRow:
        ckpt.parse_path(path, field)
        row = self.store.get(CheckpointRow, path)
        if row is None:
            raise BadInput(f"{field}: no checkpoint {path!r}")
        return row

    def _task(self, request_id: str, fn):
        """A worker task that runs fn() and finishes the future with its result (fn returns (ctype, bytes)
        or a JSON-able object), or fails it naming the error."""

        def task():
            started = time.monotonic()
            try:
                out = fn()
            except BadInput as e:
                self.futures.fail(request_id, str(e), "user")
            except Exception as e:  # noqa: BLE001 - the client learns of it through the future
                logging.exception("request %s failed", request_id)
                self.futures.fail(request_id, f"{type(e).__name__}: {e}", "server")
            else:
                if isinstance(out, tuple):
                    self.futures.finish(request_id, "done", *out)
                else:
                    self.futures.succeed_json(request_id, out)
            finally:
                seconds = round(time.monotonic() - started, 4)
                logging.info(json.dumps({"future": request_id, "ran_s": seconds}))

        return task

    def _ordered(self, model_id, seq_id, kind: str, check, fn) -> str:
        """Checks the request (check() raises BadInput: its seq_id is then used up) and queues fn."""
        try:
            check()
        except BadInput:
            if isinstance(seq_id, int) and model_id in self.runs:
                self.worker.skip(model_id, seq_id)
            raise
        if not isinstance(seq_id, int) or isinstance(seq_id, bool):
            raise BadInput(f"seq_id: {seq_id!r} is not an integer")
        request_id = self.futures.create(kind)
        self.worker.submit(model_id, seq_id, self._task(request_id, fn))
        return request_id

    # ----- creating clients -----

    def create_model(self, session_id: str, model_seq_id: int, base_model: str, lora: dict) -> str:
        self.base.check_name(base_model)
        spec = adapters.AdapterSpec(
            rank=lora.get("rank", 32),
            seed=lora.get("seed") or 0,
            train_attn=bool(lora.get("train_attn", True)),
            train_mlp=bool(lora.get("train_mlp", True)),
            train_unembed=bool(lora.get("train_unembed", True)),
        )
        try:
            spec.check()
        except ValueError as e:
            raise BadInput(f"lora_config.{e}") from None
        model_id = f"{session_id}:train:{model_seq_id}"
        request_id = self.futures.create("create_model")
        row = RunRow(
            model_id=model_id,
            session_id=session_id,
            base_model=base_model,
            rank=spec.rank,
            seed=spec.seed,
            train_attn=spec.train_attn,
            train_mlp=spec.train_mlp,
            train_unembed=spec.train_unembed,
            created=time.time(),
        )

        def create():
            adapter = adapters.init_adapter(self.base.config, spec)
            self._install(model_id, spec, adapter, adapters.init_opt_state(adapter), row)
            return {"model_id": model_id}

        self.worker.submit_now(self._task(request_id, create))
        return request_id

    def _install(self, model_id, spec, adapter, opt_state, row: RunRow) -> None:
        self.store.put(row)
        self.runs[model_id] = Run(model_id, spec, spec.model_config(self.base.config), adapter, opt_state)
        self.worker.start_at(model_id, 1)

    def load_into_new(self, session_id: str, model_seq_id: int, path: str, optimizer: bool) -> str:
        """create_training_client_from_state[_with_optimizer]: a new client starting from a checkpoint."""
        row = self.checkpoint(path)
        if row.kind != "weights":
            raise BadInput(f"path: {path!r} holds sampler weights only; training resumes from a save_state path")
        model_id = f"{session_id}:train:{model_seq_id}"
        spec = ckpt.spec_of(row)
        run_row = RunRow(
            model_id=model_id,
            session_id=session_id,
            base_model=self.base.name,
            rank=spec.rank,
            seed=0,
            train_attn=spec.train_attn,
            train_mlp=spec.train_mlp,
            train_unembed=spec.train_unembed,
            created=time.time(),
        )
        request_id = self.futures.create("load_weights")

        def load():
            adapter, opt_state = ckpt.load(self.base.config, row, optimizer)
            self._install(model_id, spec, adapter, opt_state or adapters.init_opt_state(adapter), run_row)
            return {"path": path, "model_id": model_id}

        self.worker.submit_now(self._task(request_id, load))
        return request_id

    def load_into(self, model_id, seq_id, path: str, optimizer: bool) -> str:
        """TrainingClient.load_state[_with_optimizer]: replaces this client's adapter (and Adam state)."""

        def check():
            run, row = self.run(model_id), self.checkpoint(path)
            if ckpt.spec_of(row, run.spec.seed) != run.spec:
                raise BadInput(f"path: {path!r} has rank {row.rank}, this client {run.spec.rank} (or other targets)")

        def load():
            run, row = self.runs[model_id], self.store.get(CheckpointRow, path)
            adapter, opt_state = ckpt.load(self.base.config, row, optimizer)
            run.adapter, run.grads = adapter, None
            run.opt_state = opt_state if optimizer else adapters.init_opt_state(adapter)
            return {"path": path, "model_id": model_id}

        return self._ordered(model_id, seq_id, "load_weights", check, load)

    # ----- forward, backward, step -----

    def forward_backward(self, req: FwdBwdRequest) -> str:
        def check():
            self.run(req.model_id)
            loss = TOKEN_LOSSES.get(req.loss_fn)
            if loss is None:
                raise BadInput(f"loss_fn: unknown loss {req.loss_fn!r}; built in: {sorted(TOKEN_LOSSES)}")
            try:
                loss_config(req.loss_fn, req.loss_fn_config)
            except ValueError as e:
                raise BadInput(str(e)) from None
            for i, d in enumerate(req.datums):
                missing = [k for k in loss.inputs if k not in d]
                if missing:
                    raise BadInput(f"data[{i}].loss_fn_inputs: {missing} missing for loss {req.loss_fn!r}")
                length, limit = len(d["tokens"]), self.base.max_seq_len
                if length > limit:
                    raise BadInput(f"data[{i}].model_input: {length} tokens exceed the context limit {limit}")

        kind = "forward" if req.forward_only else "forward_backward"
        return self._ordered(req.model_id, req.seq_id, kind, check, lambda: self._forward_backward(req))

    def _micro_batches(self, datums: list[dict]) -> list[list[dict]]:
        batches, current, longest = [], [], 0
        for d in datums:
            longest_if = max(longest, len(d["tokens"]))
            if current and (len(current) + 1) * longest_if > self.max_batch_tokens:
                batches.append(current)
                current, longest_if = [], len(d["tokens"])
            current.append(d)
            longest = longest_if
        return batches + [current]

    def _forward_backward(self, req: FwdBwdRequest):
        started = time.monotonic()
        run, loss = self.runs[req.model_id], TOKEN_LOSSES[req.loss_fn]
        cfg = {k: np.float32(v) for k, v in loss_config(req.loss_fn, req.loss_fn_config).items()}
        keys = loss.inputs + tuple(loss.optional_inputs)
        logprobs, total, grads = [], 0.0, run.grads
        for datums in self._micro_batches(req.datums):
            batch = adapters.pad_batch(datums, keys, loss.optional_inputs)
            step = adapters.forward if req.forward_only else adapters.forward_backward
            out = step(run.config, req.loss_fn, self.base.params, run.adapter, batch, cfg)
            if not req.forward_only:
                grads = out["grads"] if grads is None else adapters.add_grads(grads, out["grads"])
            lp_bt = np.asarray(out["logprobs_bt"])
            logprobs += [lp_bt[i, : len(d["tokens"])] for i, d in enumerate(datums)]
            total += float(out["loss"])
        run.grads = grads  # only once every micro-batch ran: a failure leaves the accumulated gradients as they were
        self._timed("forward_backward", started)
        return PROTO, forward_backward_output(logprobs, {"loss:sum": total})

    def optim_step(self, model_id, seq_id, adam_params: dict) -> str:
        hyper = {}

        def check():
            self.run(model_id)
            if not isinstance(adam_params, dict):
                raise BadInput("adam_params: missing (only Adam is served)")
            try:
                hyper.update(adapters.adam_hyper(adam_params))
            except ValueError as e:
                raise BadInput(str(e)) from None

        def step():
            started = time.monotonic()
            run = self.runs[model_id]
            grads = run.grads if run.grads is not None else jax.tree.map(np.zeros_like, run.adapter)
            run.adapter, run.opt_state, norm = adapters.adam_step(run.adapter, run.opt_state, grads, hyper)
            run.grads = None
            self._timed("optim_step", started)
            return {"metrics": {"grad_norm:mean": float(norm)}}

        return self._ordered(model_id, seq_id, "optim_step", check, step)

    # ----- saving -----

    def save(self, model_id, seq_id, kind: str, name, overwrite: bool = False) -> str:
        """save_state (kind "weights": adapter + Adam state) or save_weights_for_sampler (adapter)."""

        def check():
            self.run(model_id)
            ckpt.check_name(name)
            if not overwrite and self.store.get(CheckpointRow, ckpt.tinker_path(model_id, kind, name)):
                raise BadInput(f"path: {name!r} is already saved for {model_id} (pass overwrite=True to replace it)")

        def save():
            run = self.runs[model_id]
            old = self.store.get(CheckpointRow, ckpt.tinker_path(model_id, kind, name))
            row = ckpt.save(self.workdir, model_id, kind, name, run.spec, run.adapter, run.opt_state)
            self.store.put(row)  # the new files are complete before the path points at them
            if old is not None:
                ckpt.remove(old.directory)
            return {"path": row.path}

        return self._ordered(model_id, seq_id, "save_weights", check, save)

    def snapshot(self, model_id, seq_id, on_snapshot) -> str:
        """save_weights_and_get_sampling_client: the adapter as it is after every earlier request, handed
        to on_snapshot(spec, adapter) -> sampling_session_id, with no files written."""

        def snap():
            run = self.runs[model_id]  # a copy: the next optim_step donates the adapter's buffers
            return {"sampling_session_id": on_snapshot(run.spec, jax.tree.map(jnp.copy, run.adapter))}

        return self._ordered(model_id, seq_id, "save_weights_for_sampler", lambda: self.run(model_id), snap)
