"""The temperature search over a tiny saved checkpoint with a scripted sampler whose answers depend on the
temperature: identical and right when cold, varied and right when warm, varied and half wrong when hot."""

import json

import jax
import numpy as np
import pytest

from polaris_jax import rollout, sampling
from polaris_jax.data.tokenizer import Tokenizer
from polaris_jax.models import ModelConfig, init_params, save_hf
from polaris_jax.tools import temperature_search
from tests.evals.test_harness import byte_tokenizer

N = 4
ANSWERS = ["12", "34"]
COLD, WARM, HOT = 0.6, 1.0, 1.4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tokenizer_dir = tmp_path_factory.mktemp("tokenizer")
    byte_tokenizer().save(tokenizer_dir)
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    model_config = ModelConfig.tiny(vocab_size=tokenizer.vocab_size)
    root = tmp_path_factory.mktemp("ckpt")
    save_hf(model_config, init_params(model_config, jax.random.key(0)), root / "tiny", tokenizer_dir=tokenizer_dir)
    data = root / "problems.jsonl"
    rows = [{"id": f"p{i}", "problem": f"What is {a} + 0?", "answer": a} for i, a in enumerate(ANSWERS)]
    rows.append({"id": "p_unused", "problem": "What is 1 + 1?", "answer": "2"})  # past num_problems
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(root / "tiny"), str(data), tokenizer


def response_texts(temperature: float, answer: str) -> list[str]:
    """The N completions of one problem at `temperature`."""
    if temperature == COLD:
        return [f"The answer is \\boxed{{{answer}}}."] * N
    if temperature == WARM:
        return [f"Path {'abcd'[j] * 3}: so \\boxed{{{answer}}}." for j in range(N)]
    return [f"Guess {'wxyz'[j] * 3}: \\boxed{{{answer if j % 2 == 0 else '-7'}}}." for j in range(N)]


def distinct_4(responses: list[list[int]]) -> float:
    grams = [tuple(r[i : i + 4]) for r in responses for i in range(len(r) - 3)]
    return len(set(grams)) / len(grams)


@pytest.fixture
def scripted(setup, monkeypatch):
    _, _, tokenizer = setup
    eos = tokenizer.eos_token_ids[0]
    temperatures = []

    def generate(config, params, prompts, *, n, max_new_tokens, temperature, **kwargs):
        assert n == N and len(prompts) == len(ANSWERS)
        temperatures.append(temperature)
        tokens_br = np.zeros((len(prompts) * n, max_new_tokens), np.int32)
        lengths_b = np.zeros(len(prompts) * n, np.int32)
        for i, answer in enumerate(ANSWERS):
            for j, text in enumerate(response_texts(temperature, answer)):
                ids = tokenizer.encode(text) + [eos]
                tokens_br[i * n + j, : len(ids)], lengths_b[i * n + j] = ids, len(ids)
        finish_b = np.full(len(lengths_b), sampling.FINISH_EOS, np.int32)
        return sampling.SampleOutput(tokens_br, np.zeros(tokens_br.shape, np.float32), lengths_b, finish_b)

    monkeypatch.setattr(rollout, "generate", generate)
    return temperatures


def expected_distinct_4(temperature: float, tokenizer) -> float:
    """Mean over problems of Distinct-4 within each group, on the ids the sampler returned (EOS included)."""
    eos = tokenizer.eos_token_ids[0]
    return float(
        np.mean([distinct_4([tokenizer.encode(t) + [eos] for t in response_texts(temperature, a)]) for a in ANSWERS])
    )


def test_search_picks_the_most_diverse_temperature_that_keeps_the_best_accuracy(setup, scripted):
    checkpoint, data, tokenizer = setup
    out = temperature_search.search(
        checkpoint, data, [COLD, WARM, HOT], num_problems=2, samples=N, max_response_len=48, backend="static"
    )  # the scripted `generate` stands in for the sampler
    assert scripted == [COLD, WARM, HOT]
    scans = {s["temperature"]: s for s in out["scans"]}
    assert [s["temperature"] for s in out["scans"]] == [COLD, WARM, HOT]
    assert {t: s["accuracy"] for t, s in scans.items()} == {COLD: 1.0, WARM: 1.0, HOT: 0.5}
    assert all(s["responses"] == N * len(ANSWERS) for s in out["scans"])
    assert scans[COLD]["distinct_4"] == pytest.approx(1 / N)  # N copies of one response
    for t in (COLD, WARM, HOT):
        assert scans[t]["distinct_4"] == pytest.approx(expected_distinct_4(t, tokenizer))
    assert scans[COLD]["distinct_4"] < scans[WARM]["distinct_4"]
    # HOT is the most diverse but loses half the accuracy: the highest within 0.03 of the best is WARM.
    assert out["chosen_temperature"] == WARM
    assert out["rule"].startswith("highest temperature with accuracy within 0.03")


def test_search_with_a_diversity_target_and_a_wide_tolerance(setup, scripted):
    checkpoint, data, tokenizer = setup
    target = (expected_distinct_4(COLD, tokenizer) + expected_distinct_4(WARM, tokenizer)) / 2
    out = temperature_search.search(
        checkpoint,
        data,
        [HOT, COLD, WARM],
        num_problems=2,
        samples=N,
        max_response_len=48,
        accuracy_tolerance=0.6,
        diversity_target=target,
        backend="static",
    )
    # All three are within 0.6 of the best; the lowest that reaches the target is WARM, not HOT.
    assert out["chosen_temperature"] == WARM
    assert out["rule"].startswith("lowest temperature")
    assert [s["temperature"] for s in out["scans"]] == [HOT, COLD, WARM]
