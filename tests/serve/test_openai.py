"""The OpenAI endpoints, end to end: a server subprocess on a tiny random Qwen3, driven by the `openai` client.

The tiny model's vocabulary is the real Qwen3 tokenizer's (151,669 ids, hidden size 32), so chat
templates, special tokens and EOS ids are the real ones; its logits are large random ones, so greedy
text is arbitrary but deterministic. Greedy output is compared with transformers' generate().
"""

from __future__ import annotations

import concurrent.futures
import os

import httpx
import numpy as np
import pytest

openai = pytest.importorskip("openai")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from polaris_jax.data.tokenizer import Tokenizer, qwen_tokenizer_offline  # noqa: E402
from tests.serve.server_helpers import EOS, free_port, running_server, tiny_checkpoint  # noqa: E402

KEY = "test-key"
MAX_SEQ_LEN = 128
MESSAGES = [{"role": "user", "content": "What is 2 + 3?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_qwen3")
    tokenizer = qwen_tokenizer_offline("qwen3")
    tokenizer.save(path)
    model = tiny_checkpoint(path, tokenizer.vocab_size)
    args = ["--model", str(path), "--api_key", KEY, "--max_slots", "8", "--workdir", str(path / "serve")]
    args += ["--max_seq_len", str(MAX_SEQ_LEN), "--prefill_chunk", "64", "--page_size", "16"]
    with running_server(args, free_port()) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=60)
        yield dict(client=client, base=base, model=str(path), hf=model, tokenizer=Tokenizer.from_dir(path))


def _hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    torch.set_num_threads(1)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=EOS,
            pad_token_id=EOS[0],
        )
    return out[0, len(prompt) :].tolist()


def test_models_and_health(server):
    ids = [m.id for m in server["client"].models.list().data]
    assert ids[0] == server["model"] and os.path.basename(server["model"]) in ids
    assert httpx.get(f"{server['base']}/health").status_code == 200  # no key needed


def test_greedy_completions_match_transformers(server):
    rng = np.random.RandomState(0)
    prompts = [rng.randint(0, 151_643, size=length).tolist() for length in (5, 17)]
    out = server["client"].completions.create(
        model=server["model"], prompt=prompts, max_tokens=12, temperature=0, logprobs=1
    )
    tokenizer = server["tokenizer"]
    for prompt, choice in zip(prompts, out.choices):
        expected = _hf_greedy(server["hf"], prompt, 12)
        assert choice.logprobs.tokens == [tokenizer.decode([t]) for t in expected]
        assert choice.text == tokenizer.decode(expected, skip_special_tokens=True)
        assert choice.finish_reason == ("stop" if expected[-1] in EOS else "length")
        assert all(lp <= 0 for lp in choice.logprobs.token_logprobs)
    assert out.usage.prompt_tokens == 5 + 17
    assert out.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in out.choices)


def test_stream_chat_equals_chat_and_usage(server):
    client, model = server["client"], server["model"]
    full = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=20, temperature=0)
    templated = server["tokenizer"].encode(server["tokenizer"].apply_chat_template(MESSAGES))
    assert full.usage.prompt_tokens == len(templated)
    assert full.usage.completion_tokens >= 1
    pieces, finish = [], None
    for chunk in client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=20, temperature=0, stream=True
    ):
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == full.choices[0].message.content
    assert finish == full.choices[0].finish_reason


def test_stop_string_trims_text(server):
    client, model = server["client"], server["model"]
    full = client.completions.create(model=model, prompt="Hello", max_tokens=16, temperature=0).choices[0]
    if len(full.text) < 4:
        pytest.skip("the random model's greedy text is too short to pick a stop string from")
    stop = full.text[2:4]
    cut = client.completions.create(model=model, prompt="Hello", max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].text == full.text[: full.text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_concurrent_clients_match_sequential(server):
    client, model = server["client"], server["model"]
    prompts = [f"Count to {i}:" for i in range(8)]

    def ask(prompt):
        return client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0).choices[0].text

    alone = [ask(p) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, prompts))
    assert together == alone


def test_wrong_key_is_401(server):
    bad = openai.OpenAI(base_url=f"{server['base']}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    response = httpx.get(f"{server['base']}/v1/models")
    assert response.status_code == 401 and "error" in response.json()
    assert httpx.get(f"{server['base']}/v1/models", headers={"X-API-Key": KEY}).status_code == 200


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(max_tokens=-1), "max_tokens"),
        (dict(prompt=[1] * MAX_SEQ_LEN), "prompt"),
        (dict(prompt=[1, 10**7]), "prompt"),
        (dict(model="no-such-model"), "model"),
    ],
    ids=["negative_max_tokens", "prompt_over_context", "token_out_of_vocab", "unknown_model"],
)
def test_bad_requests_name_the_field(server, kwargs, field):
    client = server["client"]
    request = dict(model=server["model"], prompt="Hi", max_tokens=4, temperature=0) | kwargs
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(**request)
    assert 400 <= info.value.status_code < 500
    assert info.value.body["param"] == field and field in info.value.body["message"]
    good = client.completions.create(model=server["model"], prompt="Hi", max_tokens=4, temperature=0)
    assert good.choices[0].finish_reason in ("stop", "length")


def test_stream_completions_with_stop_equals_whole(server):
    client, model = server["client"], server["model"]
    request = dict(model=model, prompt="Once", max_tokens=24, temperature=0.9, seed=5, n=2, logprobs=1)
    whole = client.completions.create(**request)
    stop = whole.choices[0].text[3:5] or "zz"  # a stop string that the first choice meets, maybe mid-token
    whole = client.completions.create(**request, stop=[stop])
    texts, tokens, finish = ["", ""], [[], []], [None, None]
    for chunk in client.completions.create(**request, stop=[stop], stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            tokens[choice.index] += choice.logprobs.tokens
            finish[choice.index] = choice.finish_reason or finish[choice.index]
    assert texts == [c.text for c in whole.choices]
    assert tokens == [c.logprobs.tokens for c in whole.choices]
    assert finish == [c.finish_reason for c in whole.choices]
    assert stop not in texts[0]


def test_choice_text_detokenizes_and_stops():
    from polaris_jax.serve.choices import ChoiceText

    tokenizer = qwen_tokenizer_offline("qwen3")
    ids = tokenizer.encode("🦜 hi there, friend")  # the parrot is two tokens, each a partial character
    choice = ChoiceText(tokenizer, stops=["re, f"])
    pieces = []
    for token in ids:
        choice.add([token], [-1.0], None)
        piece = choice.take()
        pieces.append(piece[0] if piece else "")
    assert "\ufffd" not in "".join(pieces)
    assert choice.text == "".join(pieces) == "🦜 hi the" and choice.finish == "stop"
    assert choice.offsets[:3] == [0, 0, 1]  # the parrot's first token has no text of its own
    ended = ChoiceText(tokenizer, stops=[])
    ended.add(ids[:1] + [151645], [-1.0, -2.0], "eos")  # a partial character is flushed at the end
    assert ended.text == tokenizer.decode(ids[:1]) and ended.finish == "stop" and len(ended.tokens) == 2
