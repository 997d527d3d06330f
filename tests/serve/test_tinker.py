"""The Tinker REST surface, end to end: a server subprocess on a tiny random Qwen3, driven by the official
`tinker` SDK (pinned in the dev extra).

References (tests/serve/tinker_reference.py): losses recomputed with numpy from Tinker's published
formulas over logprobs from the project's model functions (`polaris_jax.models.logits`); optim_step is
checked against optax's AdamW; greedy sampling against transformers' generate(). The restart test runs
last: it kills the server and starts another on the same workdir and database.
"""

from __future__ import annotations

import contextlib
import json
import os
import time

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

tinker = pytest.importorskip("tinker")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tinker import types  # noqa: E402

from polaris_jax.data.tokenizer import qwen_tokenizer_offline  # noqa: E402
from polaris_jax.models import load_hf  # noqa: E402
from polaris_jax.train.adapters import AdapterSpec, init_adapter  # noqa: E402
from tests.serve.server_helpers import EOS, free_port, running_server, tiny_checkpoint  # noqa: E402
from tests.serve.tinker_reference import RANK, datum, jax_logprobs, model_logprobs, reference_loss  # noqa: E402

KEY = "tml-test-key"
MAX_SEQ_LEN = 128


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_qwen3")
    tokenizer = qwen_tokenizer_offline("qwen3")
    tokenizer.save(path)
    hf = tiny_checkpoint(path, tokenizer.vocab_size)
    args = ["--model", str(path), "--api_key", KEY, "--workdir", str(path / "serve"), "--max_slots", "8"]
    args += ["--max_seq_len", str(MAX_SEQ_LEN), "--prefill_chunk", "64", "--page_size", "16"]
    port = free_port()
    stack = contextlib.ExitStack()
    state = {"base": stack.enter_context(running_server(args, port))}

    def restart():
        stack.close()
        state["base"] = stack.enter_context(running_server(args, port))

    config, params = load_hf(path, dtype=None)
    clients: list = []
    yield dict(state=state, restart=restart, model=str(path), hf=hf, config=config, params=params, clients=clients)
    for service in clients:  # finish the sessions (stopping their heartbeats) while the server still runs
        with contextlib.suppress(Exception):
            service.close("success").result(timeout=10)
    stack.close()


def _service(server):
    service = tinker.ServiceClient(base_url=server["state"]["base"], api_key=KEY)
    server["clients"].append(service)
    return service


def test_capabilities_info_and_offline_tokenizer(server):
    rest = tinker.RestClient(base_url=server["state"]["base"], api_key=KEY)
    names = [m.model_name for m in rest.get_server_capabilities().result().supported_models]
    assert server["model"] in names
    client = _service(server).create_lora_training_client(base_model=server["model"], rank=RANK).result()
    info = client.get_info()
    assert info.model_id.endswith(":train:0") and info.lora_rank == RANK
    assert info.model_data.tokenizer_id == server["model"]
    assert client.get_tokenizer().encode("hello world") == qwen_tokenizer_offline("qwen3").encode("hello world")


def test_builtin_losses_match_model_functions(server):
    client = _service(server).create_lora_training_client(base_model=server["model"], rank=RANK).result()
    rng = np.random.RandomState(0)
    seqs = [rng.randint(0, 151_000, size=n).tolist() for n in (7, 12)]
    lps = [model_logprobs(server, s) for s in seqs]  # a new adapter leaves the model unchanged (B = 0)
    cases = [
        ("cross_entropy", {}),
        ("importance_sampling", {}),
        ("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}),
        ("cispo", {}),
        ("dro", {"beta": 0.3}),
    ]
    for name, config in cases:
        data, expected = [], 0.0
        for s, lp in zip(seqs, lps):
            n = len(s) - 1
            inputs = (
                {"weights": rng.rand(n)}
                if name == "cross_entropy"
                else {"logprobs": lp + rng.uniform(-0.3, 0.3, n), "advantages": rng.randn(n)}
            )
            data.append(datum(s, **inputs))
            expected += reference_loss(name, lp, {k: v.astype(np.float32) for k, v in inputs.items()}, config)
        out = client.forward(data, name, loss_fn_config=config or None).result()
        assert out.metrics["loss:sum"] == pytest.approx(expected, rel=1e-4, abs=1e-4), name
        for got, lp in zip(out.loss_fn_outputs, lps):
            np.testing.assert_allclose(got["logprobs"].to_numpy(), lp, atol=1e-4)


def test_optim_step_equals_optax_adamw_and_clients_do_not_leak(server):
    service = _service(server)
    a = service.create_lora_training_client(base_model=server["model"], rank=RANK, seed=3).result()
    b = service.create_lora_training_client(base_model=server["model"], rank=RANK, seed=3).result()
    seq = [11, 2000, 3000, 4000, 5000, 6000, 7000]
    weights = np.array([0, 0, 1, 1, 1, 1], np.float32)
    a.forward_backward([datum(seq, weights=weights)], "cross_entropy").result()
    adam = types.AdamParams(learning_rate=1e-2, beta1=0.8, beta2=0.9, eps=1e-8, weight_decay=0.1, grad_clip_norm=1.0)
    a.optim_step(adam).result()
    got_a = a.forward([datum(seq, weights=weights)], "cross_entropy").result().loss_fn_outputs[0]["logprobs"]
    got_b = b.forward([datum(seq, weights=weights)], "cross_entropy").result().loss_fn_outputs[0]["logprobs"]

    adapter = init_adapter(server["config"], AdapterSpec(rank=RANK, seed=3, train_unembed=True))
    grads = jax.grad(lambda ad: -jnp.sum(jnp.asarray(weights) * jax_logprobs(server, seq, ad)))(adapter)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, b1=0.8, b2=0.9, eps=1e-8, weight_decay=0.1))
    updates, _ = tx.update(grads, tx.init(adapter), adapter)
    stepped = optax.apply_updates(adapter, updates)
    np.testing.assert_allclose(got_a.to_numpy(), model_logprobs(server, seq, stepped), atol=2e-4)
    np.testing.assert_allclose(got_b.to_numpy(), model_logprobs(server, seq), atol=1e-4)  # b never trained
    assert np.abs(got_a.to_numpy() - got_b.to_numpy()).max() > 1e-2  # the step did move a


def test_forward_backward_custom_equals_builtin(server):
    service = _service(server)
    builtin = service.create_lora_training_client(base_model=server["model"], rank=RANK, seed=4).result()
    custom = service.create_lora_training_client(base_model=server["model"], rank=RANK, seed=4).result()
    seq = [5, 600, 7000, 80_000, 9, 10]
    weights = np.array([0.5, -1.0, 2.0, 1.0, 0.0], np.float32)  # arbitrary signed weights
    data = [datum(seq, weights=weights)]
    builtin.forward_backward(data, "cross_entropy").result()

    def loss_fn(data, logprobs_list):
        loss = -(logprobs_list[0] * torch.tensor(weights)).sum()
        return loss, {"custom_loss:sum": float(loss.detach())}

    out = custom.forward_backward_custom(data, loss_fn).result()
    expected = -float(np.sum(model_logprobs(server, seq) * weights))
    assert out.metrics["custom_loss:sum"] == pytest.approx(expected, rel=1e-4)
    for client in (builtin, custom):
        client.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    got = [
        c.forward(data, "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy() for c in (builtin, custom)
    ]
    np.testing.assert_allclose(got[0], got[1], atol=1e-5)


ANSWER = [4242, 4343]  # the toy task: whatever the prompt, answer these two tokens


def _toy(rng, count):
    return [rng.randint(1000, 100_000, size=4).tolist() + ANSWER for _ in range(count)]


def _weights(seq):
    return np.array([0.0] * (len(seq) - 1 - len(ANSWER)) + [1.0] * len(ANSWER), np.float32)


def test_supervised_loop_lowers_heldout_nll_and_live_sampler_samples_it(server):
    client = _service(server).create_lora_training_client(base_model=server["model"], rank=RANK, seed=1).result()
    rng = np.random.RandomState(1)
    held_out = [datum(s, weights=_weights(s)) for s in _toy(rng, 8)]

    def nll():
        return client.forward(held_out, "cross_entropy").result().metrics["loss:sum"] / (8 * len(ANSWER))

    before = nll()
    for _ in range(6):  # the cookbook's pipelining: optim_step is sent before forward_backward's result
        batch = [datum(s, weights=_weights(s)) for s in _toy(rng, 8)]
        fwd_bwd = client.forward_backward(batch, "cross_entropy")
        step = client.optim_step(types.AdamParams(learning_rate=3e-2))
        assert fwd_bwd.result().metrics["loss:sum"] > 0
        step.result()
    after = nll()
    assert after < 0.5 * before, (before, after)

    sampler = client.save_weights_and_get_sampling_client().result()
    prompt = _toy(rng, 1)[0][:4]
    seq = prompt + ANSWER
    lp = sampler.compute_logprobs(types.ModelInput.from_ints(seq)).result()
    fwd = client.forward([datum(seq, weights=_weights(seq))], "cross_entropy").result()
    assert lp[0] is None
    np.testing.assert_allclose(lp[1:], fwd.loss_fn_outputs[0]["logprobs"].to_numpy(), atol=1e-4)
    params = types.SamplingParams(max_tokens=len(ANSWER), temperature=0.0, stop=[])
    out = sampler.sample(types.ModelInput.from_ints(prompt), 2, params).result()
    assert [s.stop_reason for s in out.sequences] == ["length", "length"]
    sampled = out.sequences[0]  # the live weights made it: its logprobs are the trained model's
    check = sampler.compute_logprobs(types.ModelInput.from_ints(prompt + sampled.tokens)).result()
    np.testing.assert_allclose(sampled.logprobs, check[len(prompt) :], atol=1e-4)
    assert out.sequences[1].tokens == sampled.tokens  # greedy


def test_openai_serves_a_tinker_sampler_path(server):
    openai = pytest.importorskip("openai")
    client = _service(server).create_lora_training_client(base_model=server["model"], rank=RANK, seed=6).result()
    seq = [1, 20, 300, 4000, 50_000]
    client.forward_backward([datum(seq, weights=[1.0] * 4)], "cross_entropy").result()
    client.optim_step(types.AdamParams(learning_rate=5e-2)).result()
    path = client.save_weights_for_sampler("for-openai").result().path
    sampler = _service(server).create_sampling_client(model_path=path).result()
    params = types.SamplingParams(max_tokens=6, temperature=0.0)
    expected = sampler.sample(types.ModelInput.from_ints(seq), 1, params).result().sequences[0]
    oa = openai.OpenAI(base_url=f"{server['state']['base']}/v1", api_key=KEY, max_retries=0, timeout=60)
    out = oa.completions.create(model=path, prompt=seq, max_tokens=6, temperature=0, logprobs=1).choices[0]
    np.testing.assert_allclose(out.logprobs.token_logprobs, expected.logprobs, atol=1e-5)
    assert len(out.logprobs.tokens) == len(expected.tokens)
    with pytest.raises(openai.NotFoundError, match="model"):
        oa.completions.create(model="tinker://x:train:0/sampler_weights/none", prompt=seq, max_tokens=2)


def test_base_sampler_greedy_matches_transformers(server):
    sampler = _service(server).create_sampling_client(base_model=server["model"]).result()
    prompt = np.random.RandomState(2).randint(0, 151_643, size=9).tolist()
    out = sampler.sample(types.ModelInput.from_ints(prompt), 1, types.SamplingParams(max_tokens=10, temperature=0.0))
    seq = out.result().sequences[0]
    with torch.no_grad():
        expected = (
            server["hf"]
            .generate(
                torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=EOS, pad_token_id=EOS[0]
            )[0, len(prompt) :]
            .tolist()
        )
    assert seq.tokens == expected
    assert seq.stop_reason == ("stop" if expected[-1] in EOS else "length")
    assert all(lp <= 0 for lp in seq.logprobs)


def test_a_stop_string_ends_where_the_text_contains_it_whatever_tokens_spell_it(server):
    """A stop string spanning two sampled tokens (the last character of one, the first of the next): its
    own tokenization is not what the model sampled, yet the sample ends at the token that completes it in
    the decoded text (that token included), as vLLM serves Tinker's string stops."""
    tokenizer = qwen_tokenizer_offline("qwen3")
    sampler = _service(server).create_sampling_client(base_model=server["model"]).result()
    prompt = np.random.RandomState(5).randint(0, 151_643, size=7).tolist()
    greedy = types.SamplingParams(max_tokens=24, temperature=0.0, stop=[])
    tokens = sampler.sample(types.ModelInput.from_ints(prompt), 1, greedy).result().sequences[0].tokens
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    cut = None
    for j in range(1, len(tokens)):
        before, after = tokenizer.decode(tokens[:j]), tokenizer.decode(tokens[j : j + 1])
        stop = before[-1:] + after[:1]
        clean = len(stop) == 2 and "\ufffd" not in before + after and text.startswith(before)
        if (
            clean
            and text.find(stop) == len(before) - 1
            and tuple(tokenizer.encode(stop)) != tuple(tokens[j - 1 : j + 1])
        ):
            cut = j
            break
    assert cut is not None, f"no clean token boundary in {text!r}"
    params = types.SamplingParams(max_tokens=24, temperature=0.0, stop=[stop])
    seq = sampler.sample(types.ModelInput.from_ints(prompt), 1, params).result().sequences[0]
    assert seq.tokens == tokens[: cut + 1] and seq.stop_reason == "stop", (stop, seq.tokens, tokens)


def test_adapters_of_different_ranks_decode_together_each_as_its_own(server):
    """Two clients' live adapters (ranks 2 and 4, one also on the unembedding) and the base model, sampled at
    once: the adapters share one multi-LoRA engine, and each sample's logprobs are its own adapter's
    (compute_logprobs: a forward pass with that adapter alone). The stack the tests before made (rank 4, every
    target) holds both, so the engine compiles nothing new."""
    service = _service(server)
    samplers, prompt = [], [7, 70, 700, 7000]
    for rank, seed, unembed in ((2, 11, False), (RANK, 12, True)):
        client = service.create_lora_training_client(
            base_model=server["model"], rank=rank, seed=seed, train_unembed=unembed
        ).result()
        seq = prompt + [seed, 5 * seed]
        client.forward_backward([datum(seq, weights=[1.0] * 5)], "cross_entropy").result()
        client.optim_step(types.AdamParams(learning_rate=5e-2)).result()
        samplers.append(client.save_weights_and_get_sampling_client().result())
    samplers.append(service.create_sampling_client(base_model=server["model"]).result())
    params = types.SamplingParams(max_tokens=8, temperature=1.0, seed=3, stop=[])
    futures = [s.sample(types.ModelInput.from_ints(prompt), 2, params) for s in samplers]  # in flight together
    outs = [f.result() for f in futures]
    own = []
    for sampler, out in zip(samplers, outs):
        for seq in out.sequences:
            check = sampler.compute_logprobs(types.ModelInput.from_ints(prompt + seq.tokens)).result()
            np.testing.assert_allclose(seq.logprobs, check[len(prompt) :], atol=1e-4)
        own.append(np.asarray(check[len(prompt) :]))
    # The adapters differ: the second adapter scores the base sample's last tokens otherwise.
    other = samplers[1].compute_logprobs(types.ModelInput.from_ints(prompt + outs[2].sequences[1].tokens)).result()
    assert np.max(np.abs(np.asarray(other[len(prompt) :]) - own[2])) > 1e-2
    text = httpx.get(f"{server['state']['base']}/metrics").text
    assert "polaris_adapter_engines 1\n" in text  # every adapter so far: one engine


def test_clients_forward_backward_calls_that_coincide_run_as_one_and_train_each_its_own(server):
    """Multi-LoRA training: two clients' forward_backward calls (ranks 2 and 4, other targets) that arrive
    while the trainer is busy run as one stacked call, and each client ends where a twin trained alone
    ends (its loss, logprobs and, after optim_step, its weights)."""
    service = _service(server)
    make = lambda rank, seed, mlp: service.create_lora_training_client(  # noqa: E731
        base_model=server["model"], rank=rank, seed=seed, train_mlp=mlp
    )
    a, b, twin_a, twin_b, busy = [
        f.result()
        for f in (make(2, 21, True), make(RANK, 22, False), make(2, 21, True), make(RANK, 22, False), make(2, 0, True))
    ]
    rng = np.random.RandomState(5)
    data = {}
    for name, n in (("a", 9), ("b", 14)):
        seqs = [rng.randint(0, 151_000, size=n + k).tolist() for k in range(2)]
        data[name] = [datum(s, logprobs=-rng.rand(len(s) - 1), advantages=rng.randn(len(s) - 1)) for s in seqs]
    adam = types.AdamParams(learning_rate=5e-2)
    counted = lambda: _metric(server, "polaris_forward_backward_batched_requests_total")  # noqa: E731
    before = counted()
    # A forward of a shape no test compiled before keeps the trainer busy for seconds; a and b arrive meanwhile.
    long_rows = [datum(rng.randint(0, 151_000, size=MAX_SEQ_LEN).tolist(), weights=np.ones(MAX_SEQ_LEN - 1))] * 7
    blocker = busy.forward(long_rows, "cross_entropy")  # another loss: it runs alone
    time.sleep(1.0)
    together = [
        a.forward_backward(data["a"], "importance_sampling"),
        b.forward_backward(data["b"], "importance_sampling"),
    ]
    steps = [a.optim_step(adam), b.optim_step(adam)]
    blocker.result()
    outs = [f.result() for f in together]
    [f.result() for f in steps]
    assert counted() >= before + 2
    probe = [datum([3, 30, 300, 3000, 30_000, 7], weights=np.ones(5))]
    for client, twin, name, out in ((a, twin_a, "a", outs[0]), (b, twin_b, "b", outs[1])):
        alone = twin.forward_backward(data[name], "importance_sampling").result()
        twin.optim_step(adam).result()
        assert out.metrics["loss:sum"] == pytest.approx(alone.metrics["loss:sum"], rel=1e-5, abs=1e-5)
        for got, want in zip(out.loss_fn_outputs, alone.loss_fn_outputs):
            np.testing.assert_allclose(got["logprobs"].to_numpy(), want["logprobs"].to_numpy(), atol=1e-5)
        trained = client.forward(probe, "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
        expected = twin.forward(probe, "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
        np.testing.assert_allclose(trained, expected, atol=1e-4)
        assert np.abs(trained - model_logprobs(server, [3, 30, 300, 3000, 30_000, 7])).max() > 1e-3  # it moved


def _metric(server, name: str) -> float:
    text = httpx.get(f"{server['state']['base']}/metrics").text
    return float(dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))[name])


def test_rest_client_reads_training_runs_and_their_checkpoints(server):
    """What tinker-cookbook reads back when it resumes: the run's user_metadata (its renderer name), its last
    training and sampler checkpoints, and the checkpoint list, through the SDK's RestClient."""
    service = _service(server)
    metadata = {"renderer_name": "qwen3", "recipe": "unit"}
    client = service.create_lora_training_client(base_model=server["model"], rank=RANK, user_metadata=metadata).result()
    state = client.save_state("first").result().path
    weights = client.save_weights_for_sampler("for-sampling").result().path
    rest = service.create_rest_client()
    model_id = client.get_info().model_id
    run = rest.get_training_run(model_id).result()
    assert (run.training_run_id, run.lora_rank, run.is_lora, run.user_metadata) == (model_id, RANK, True, metadata)
    assert (run.last_checkpoint.tinker_path, run.last_sampler_checkpoint.tinker_path) == (state, weights)
    assert rest.get_training_run_by_tinker_path(weights).result().training_run_id == model_id
    listed = rest.list_checkpoints(model_id).result().checkpoints
    assert [(c.tinker_path, c.checkpoint_type) for c in listed] == [(state, "training"), (weights, "sampler")]
    with pytest.raises(tinker.BadRequestError, match="training_run_id"):
        rest.get_training_run("sess-none:train:0").result()


def test_a_route_of_another_sdk_version_gets_a_404_that_says_so(server):
    """An SDK of another version calls routes this server lacks (tinker 0.16's, e.g.): a JSON 404 naming the
    route, the client's version (the Stainless header every tinker SDK sends) and the one to install."""
    headers = {"X-API-Key": KEY, "X-Stainless-Package-Version": "0.16.1"}
    r = httpx.post(f"{server['state']['base']}/api/v1/old_style_route", json={}, headers=headers)
    assert r.status_code == 404
    assert r.json()["detail"] == (
        "/api/v1/old_style_route is not served: this server speaks the REST surface of tinker==0.38.0 and this "
        "client is tinker 0.16.1 (pip install tinker==0.38.0)"
    )
    assert httpx.get(f"{server['state']['base']}/api/v1/healthz", headers=headers).status_code == 200


def test_prometheus_metrics_count_the_work(server):
    text = httpx.get(f"{server['state']['base']}/metrics").text  # after the tests above: training and sampling
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert float(values["polaris_forward_backward_seconds_count"]) >= 6
    assert float(values["polaris_optim_step_seconds_sum"]) > 0
    assert float(values["polaris_decode_tokens_total"]) > 0
    assert float(values["polaris_adapter_engines"]) >= 1
    assert float(values["polaris_engine_pages_total"]) > 0


def test_logs_carry_request_ids(server):
    base, headers = server["state"]["base"], {"X-API-Key": KEY, "X-Request-Id": "rid-under-test"}
    session = httpx.post(f"{base}/api/v1/create_session", json={}, headers=headers).json()["session_id"]
    body = {"session_id": session, "model_seq_id": 0, "base_model": server["model"], "lora_config": {"rank": 2}}
    response = httpx.post(f"{base}/api/v1/create_model", json=body, headers=headers)
    assert response.headers["X-Request-Id"] == "rid-under-test"
    future = response.json()["request_id"]
    retrieve = f"{base}/api/v1/retrieve_future"
    while (
        httpx.post(retrieve, json={"request_id": future}, headers=headers, timeout=60).json().get("type") == "try_again"
    ):
        pass  # a long poll may answer try_again before the future finishes
    lines = [json.loads(line.split(" ", 4)[4]) for line in _log_lines(server) if line.split(" ", 4)[4][:1] == "{"]
    assert {"request_id": "rid-under-test", "future": future, "kind": "create_model"} in lines
    assert any(line.get("future") == future and "ran_s" in line for line in lines)
    assert any(
        line.get("request_id") == "rid-under-test" and line.get("path") == "/api/v1/create_model" for line in lines
    )


def _log_lines(server):
    with open(os.path.join(server["model"], "serve", "serve.log"), encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.count(" ") >= 4]


def test_bad_inputs_get_4xx_naming_the_field_and_serving_goes_on(server):
    service = _service(server)
    client = service.create_lora_training_client(base_model=server["model"], rank=RANK).result()
    good = [datum([1, 2, 3, 4], weights=[1, 1, 1])]
    bad = {
        "model_input length": [datum([1, 2, 3, 4], weights=[1, 1])],
        "outside the vocabulary": [datum([1, 2, 10**7], weights=[1, 1])],
        "'advantages'": [datum([1, 2, 3], logprobs=[0, 0])],
    }
    for expected, data in bad.items():
        loss = "cross_entropy" if "advantages" not in expected else "importance_sampling"
        with pytest.raises(tinker.BadRequestError, match=expected):
            client.forward_backward(data, loss).result()
        assert client.forward(good, "cross_entropy").result().metrics["loss:sum"] > 0
    with pytest.raises(tinker.BadRequestError, match="loss_fn_config"):
        client.forward(good, "ppo", loss_fn_config={"nope": 1.0}).result()
    with pytest.raises(tinker.BadRequestError, match="model_path"):  # raised when made or when first used
        ghost = service.create_sampling_client(model_path="tinker://nobody:train:0/sampler_weights/x").result()
        ghost.sample(types.ModelInput.from_ints([1, 2]), 1, types.SamplingParams(max_tokens=2)).result()
    sampler = service.create_sampling_client(base_model=server["model"]).result()
    with pytest.raises(tinker.BadRequestError, match="max_seq_len"):
        sampler.sample(types.ModelInput.from_ints([5] * 100), 1, types.SamplingParams(max_tokens=100)).result()
    with pytest.raises(tinker.BadRequestError, match="base_model"):
        service.create_lora_training_client(base_model="no-such-model", rank=RANK).result()
    base = server["state"]["base"]
    assert httpx.post(f"{base}/api/v1/create_session", json={}, headers={"X-API-Key": "tml-wrong"}).status_code == 401
    assert client.forward(good, "cross_entropy").result().metrics["loss:sum"] > 0


@pytest.mark.slow  # two server start-ups (about 40 s)
def test_restart_keeps_checkpoints_futures_and_resumes_identically(server):
    service = _service(server)
    client = service.create_lora_training_client(base_model=server["model"], rank=RANK, seed=5).result()
    rng = np.random.RandomState(5)
    batch = [datum(s, weights=_weights(s)) for s in _toy(rng, 4)]
    adam = types.AdamParams(learning_rate=2e-2)
    client.forward_backward(batch, "cross_entropy").result()
    client.optim_step(adam).result()
    path = client.save_state("ckpt-1").result().path
    sampler_path = client.save_weights_for_sampler("s-1").result().path

    def next_losses(c):
        c.forward_backward(batch, "cross_entropy").result()
        c.optim_step(adam).result()
        return c.forward(batch, "cross_entropy").result().metrics["loss:sum"]

    expected = next_losses(client)
    base = server["state"]["base"]
    headers = {"X-API-Key": KEY}
    session = httpx.post(f"{base}/api/v1/create_session", json={}, headers=headers).json()["session_id"]
    body = {"session_id": session, "model_seq_id": 0, "base_model": server["model"], "lora_config": {"rank": 2}}
    future = httpx.post(f"{base}/api/v1/create_model", json=body, headers=headers).json()
    retrieve = {"request_id": future["request_id"]}
    first = httpx.post(f"{base}/api/v1/retrieve_future", json=retrieve, headers=headers, timeout=60).json()

    server["restart"]()
    base = server["state"]["base"]
    again = httpx.post(f"{base}/api/v1/retrieve_future", json=retrieve, headers=headers, timeout=60).json()
    assert again == first == {"model_id": f"{session}:train:0"}
    resumed = _service(server).create_training_client_from_state_with_optimizer(path).result()
    assert next_losses(resumed) == pytest.approx(expected, rel=1e-6)
    sampler = _service(server).create_sampling_client(model_path=sampler_path).result()
    out = sampler.sample(types.ModelInput.from_ints([1, 2, 3]), 1, types.SamplingParams(max_tokens=3, temperature=0.0))
    assert len(out.result().sequences[0].tokens) >= 1
