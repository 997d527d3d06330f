"""Tinker training clients on one base model: create, forward(_backward), optim_step, save and load.

Every call is checked when it arrives (a `BadInput` is the client's 4xx, and nothing is queued or
changed), then queued on the `OrderedWorker` in its client's seq_id order, and its result lands in
its future. Each client holds its own adapter, AdamW state and accumulated gradients; the base
weights are shared. A forward_backward is split into micro-batches of at most `max_batch_tokens`
padded tokens whose gradients add up, so one request cannot take more memory than that.

Multi-LoRA training: forward(_backward) requests of different clients that are next in their own order
when the worker is free, with the same loss and loss config, run as one call over their adapters stacked
(`adapters.Stack`: each row trains its own client's adapter). Expert adapters of a MoE model run alone.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np

from polaris_jax.models.lora import can_stack
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
        self.worker = OrderedWorker(run_together=self._forward_backward_together)
        self.runs: dict[str, Run] = {}
        self.latency_s = {"forward_backward": [0, 0.0], "optim_step": [0, 0.0]}  # kind -> [count, seconds]
        self.batched = [0, 0]  # forward(_backward) calls that ran several clients' requests, and those requests

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

            def ran():  # logged before the future finishes: a client that has the result finds the line
                logging.info(json.dumps({"future": request_id, "ran_s": round(time.monotonic() - started, 4)}))

            try:
                out = fn()
            except BadInput as e:
                ran()
                self.futures.fail(request_id, str(e), "user")
            except Exception as e:  # noqa: BLE001 - the client learns of it through the future
                logging.exception("request %s failed", request_id)
                ran()
                self.futures.fail(request_id, f"{type(e).__name__}: {e}", "server")
            else:
                ran()
                if isinstance(out, tuple):
                    self.futures.finish(request_id, "done", *out)
                else:
                    self.futures.succeed_json(request_id, out)

        return task

    def _ordered(self, model_id, seq_id, kind: str, check, fn, together=None) -> str:
        """Checks the request (check() raises BadInput: its seq_id is then used up) and queues fn.
        together: (key, request): a forward(_backward) that may run with the other clients' requests of an
        equal key (None: alone), as one `_forward_backward_together`; key() is read after the check."""
        try:
            check()
        except BadInput:
            if isinstance(seq_id, int) and model_id in self.runs:
                self.worker.skip(model_id, seq_id)
            raise
        if not isinstance(seq_id, int) or isinstance(seq_id, bool):
            raise BadInput(f"seq_id: {seq_id!r} is not an integer")
        request_id = self.futures.create(kind)
        key = together[0]() if together else None
        item = None if key is None else (key, (request_id, together[1]))
        self.worker.submit(model_id, seq_id, self._task(request_id, fn), item)
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

    def _placed(self, tree):
        """The tree committed to the base weights' device, as every step's outputs are: an uncommitted
        fresh or loaded adapter would compile forward_backward and adam_step a second time at step 2."""
        return jax.device_put(tree, jax.tree.leaves(self.base.params)[0].sharding)

    def _install(self, model_id, spec, adapter, opt_state, row: RunRow) -> None:
        self.store.put(row)
        adapter, opt_state = self._placed((adapter, opt_state))
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
            opt_state = opt_state if optimizer else adapters.init_opt_state(adapter)
            (run.adapter, run.opt_state), run.grads = self._placed((adapter, opt_state)), None
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

        def key():
            if not can_stack(self.base.config, self.runs[req.model_id].spec.targets):
                return None
            return req.forward_only, req.loss_fn, json.dumps(loss_config(req.loss_fn, req.loss_fn_config))

        kind = "forward" if req.forward_only else "forward_backward"
        run_alone = lambda: self._forward_backward([req])[0]  # noqa: E731
        return self._ordered(req.model_id, req.seq_id, kind, check, run_alone, (key, req))

    def _micro_batches(self, rows: list[tuple[int, dict]]) -> list[list[tuple[int, dict]]]:
        """(request index, datum) rows in micro-batches of at most max_batch_tokens padded tokens."""
        batches, current, longest = [], [], 0
        for row in rows:
            n = len(row[1]["tokens"])
            if current and (len(current) + 1) * max(longest, n) > self.max_batch_tokens:
                batches.append(current)
                current, longest = [], 0
            current.append(row)
            longest = max(longest, n)
        return batches + [current]

    def _forward_backward(self, reqs: list[FwdBwdRequest]) -> list[tuple[str, bytes]]:
        """Runs requests of distinct clients with one loss and config (one request: its adapter alone; several:
        stacked) and returns each one's result. Gradients are kept only once every micro-batch ran, so a
        failure leaves each client's accumulated gradients as they were."""
        started = time.monotonic()
        runs, req = [self.runs[r.model_id] for r in reqs], reqs[0]
        loss = TOKEN_LOSSES[req.loss_fn]
        cfg = {k: np.float32(v) for k, v in loss_config(req.loss_fn, req.loss_fn_config).items()}
        keys = loss.inputs + tuple(loss.optional_inputs)
        if len(runs) == 1:
            config, adapter, stack = runs[0].config, runs[0].adapter, None
        else:
            config, adapter = self.base.config, tuple(run.adapter for run in runs)
            stack = adapters.Stack.of([run.spec for run in runs])
        step = adapters.forward if req.forward_only else adapters.forward_backward
        logprobs, totals = [[] for _ in reqs], [0.0] * len(reqs)
        grads = [run.grads for run in runs]
        for micro in self._micro_batches([(i, d) for i, r in enumerate(reqs) for d in r.datums]):
            batch = adapters.pad_batch([d for _, d in micro], keys, loss.optional_inputs)
            if stack is not None:
                batch["adapter_rows_b"] = np.zeros(len(batch["tokens_bt"]), np.int32)
                batch["adapter_rows_b"][: len(micro)] = [i for i, _ in micro]
            out = step(config, req.loss_fn, self.base.params, adapter, batch, cfg, stack)
            lp_bt, loss_b = np.asarray(out["logprobs_bt"]), np.asarray(out["loss_b"])
            for row, (i, d) in enumerate(micro):
                logprobs[i].append(lp_bt[row, : len(d["tokens"])])
                totals[i] += float(loss_b[row])
            if not req.forward_only:
                new = (out["grads"],) if stack is None else out["grads"]
                for i in {i for i, _ in micro}:  # an adapter with no rows here got zeros
                    grads[i] = new[i] if grads[i] is None else adapters.add_grads(grads[i], new[i])
        if not req.forward_only:
            for run, g in zip(runs, grads):
                run.grads = g
        for _ in reqs:
            self._timed("forward_backward", started)
        return [(PROTO, forward_backward_output(lp, {"loss:sum": t})) for lp, t in zip(logprobs, totals)]

    def _forward_backward_together(self, items: list[tuple[str, FwdBwdRequest]]) -> None:
        """The worker's call for several clients' requests: one batched run, each result in its own future.
        If the batched run fails, each request runs alone (so one client's failure is not everyone's)."""
        started = time.monotonic()
        try:
            outputs = self._forward_backward([req for _, req in items])
        except Exception:  # noqa: BLE001 - retried one by one below, where each failure reaches its own client
            logging.exception("forward_backward of %d clients together failed; running each alone", len(items))
            for request_id, req in items:
                self._task(request_id, lambda req=req: self._forward_backward([req])[0])()
            return
        self.batched[0] += 1
        self.batched[1] += len(items)
        seconds = round(time.monotonic() - started, 4)
        for (request_id, _), out in zip(items, outputs):
            logging.info(json.dumps({"future": request_id, "ran_s": seconds, "together": len(items)}))
            self.futures.finish(request_id, "done", *out)

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
