"""The difficulty filter end to end: a tiny saved checkpoint, a scripted sampler that solves each problem a
chosen number of times out of k, and the files and counts it writes."""

import json
import re

import jax
import numpy as np
import pytest

from polaris_jax import rollout, sampling
from polaris_jax.data.tokenizer import Tokenizer
from polaris_jax.models import ModelConfig, init_params, save_hf
from polaris_jax.tools import difficulty_filter
from tests.evals.test_harness import byte_tokenizer

K = 4
# Problem id -> how many of its K samples answer correctly.
SOLVED = {"q0": 4, "q1": 0, "q2": 2, "q3": 3, "q4": 1, "q5": 0}
ANSWERS = {f"q{i}": str(10 + i) for i in range(len(SOLVED))}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tokenizer_dir = tmp_path_factory.mktemp("tokenizer")
    byte_tokenizer().save(tokenizer_dir)
    model_config = ModelConfig.tiny(vocab_size=Tokenizer.from_dir(tokenizer_dir).vocab_size)
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_hf(model_config, init_params(model_config, jax.random.key(0)), path, tokenizer_dir=tokenizer_dir)
    return path


@pytest.fixture
def dataset(tmp_path):
    path = tmp_path / "problems.jsonl"
    rows = [
        {"id": pid, "problem": f"[{pid}] What is {answer} + 0?", "answer": answer} for pid, answer in ANSWERS.items()
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path, rows


def scripted_generate(tokenizer, calls):
    """Reads the problem id back from each prompt; sample j is right when j < SOLVED[id]."""
    eos = tokenizer.eos_token_ids[0]

    def generate(config, params, prompts, *, n, max_new_tokens, temperature, **kwargs):
        calls.append({"prompts": len(prompts), "n": n, "max_new_tokens": max_new_tokens, "temperature": temperature})
        rows = len(prompts) * n
        tokens_br = np.zeros((rows, max_new_tokens), np.int32)
        lengths_b = np.zeros(rows, np.int32)
        for i, prompt in enumerate(prompts):
            pid = re.search(r"\[(q\d+)\]", tokenizer.decode(prompt)).group(1)
            for j in range(n):
                answer = ANSWERS[pid] if j < SOLVED[pid] else "-1"
                ids = tokenizer.encode(f"So the answer is \\boxed{{{answer}}}.") + [eos]
                tokens_br[i * n + j, : len(ids)], lengths_b[i * n + j] = ids, len(ids)
        finish_b = np.full(rows, sampling.FINISH_EOS, np.int32)
        return sampling.SampleOutput(tokens_br, np.zeros(tokens_br.shape, np.float32), lengths_b, finish_b)

    return generate


def test_filter_keeps_the_unsolved_problems_below_the_threshold_and_writes_the_histogram(
    checkpoint, dataset, tmp_path, monkeypatch
):
    data_path, rows = dataset
    calls = []
    monkeypatch.setattr(rollout, "generate", scripted_generate(Tokenizer.from_dir(checkpoint), calls))
    config = difficulty_filter.filter_config(
        model_dir=str(checkpoint), dataset=str(data_path), samples=K, temperature=1.3, max_response_len=48
    )
    config.rollout.backend = "static"  # the scripted `generate` stands in for the sampler
    config.filter.prompts_per_batch = 4  # two chunks: 4 problems, then 2
    config.filter.max_pass_rate = 0.5  # drops q0 (4/4) and q3 (3/4)
    config.reward_workers = 1
    workdir = tmp_path / "work"

    result = difficulty_filter.run(config, str(workdir))

    assert calls == [
        {"prompts": 4, "n": K, "max_new_tokens": 48, "temperature": 1.3},
        {"prompts": 2, "n": K, "max_new_tokens": 48, "temperature": 1.3},
    ]
    kept = [json.loads(line) for line in (workdir / "filtered.jsonl").read_text().splitlines()]
    by_id = {row["id"]: row for row in rows}
    assert kept == [
        {**by_id["q1"], "pass_rate": 0.0},
        {**by_id["q2"], "pass_rate": 0.5},
        {**by_id["q4"], "pass_rate": 0.25},
        {**by_id["q5"], "pass_rate": 0.0},
    ]
    histogram = [json.loads(line) for line in (workdir / "solve_counts.jsonl").read_text().splitlines()]
    assert histogram == [
        {"correct": 0, "problems": 2},
        {"correct": 1, "problems": 1},
        {"correct": 2, "problems": 1},
        {"correct": 3, "problems": 1},
        {"correct": 4, "problems": 1},
    ]
    assert result["problems"] == 6
    assert result["kept"] == 4
    assert result["dropped_solved_all"] == 1
    assert result["dropped_above_threshold"] == 1
    assert result["mean_pass_rate"] == pytest.approx(sum(SOLVED.values()) / (K * len(SOLVED)))
    assert result["output"] == str(workdir / "filtered.jsonl")


def test_filter_at_the_default_threshold_drops_only_the_problems_solved_every_time(
    checkpoint, dataset, tmp_path, monkeypatch
):
    data_path, _ = dataset
    monkeypatch.setattr(rollout, "generate", scripted_generate(Tokenizer.from_dir(checkpoint), []))
    config = difficulty_filter.filter_config(model_dir=str(checkpoint), dataset=str(data_path), samples=K)
    config.filter.max_response_len = 48
    config.rollout.backend = "static"  # the scripted `generate` stands in for the sampler
    config.filter.output = str(tmp_path / "stage2.jsonl")
    config.reward_workers = 1

    result = difficulty_filter.run(config, str(tmp_path / "work"))

    kept = [json.loads(line) for line in (tmp_path / "stage2.jsonl").read_text().splitlines()]
    assert [(row["id"], row["pass_rate"]) for row in kept] == [
        ("q1", 0.0),
        ("q2", 0.5),
        ("q3", 0.75),
        ("q4", 0.25),
        ("q5", 0.0),
    ]
    assert not (tmp_path / "work" / "filtered.jsonl").exists()
    assert (result["kept"], result["dropped_solved_all"], result["dropped_above_threshold"]) == (5, 1, 0)
    assert result["output"] == str(tmp_path / "stage2.jsonl")
