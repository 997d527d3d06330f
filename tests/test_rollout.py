"""The one sample -> verify path: training reward, in-loop pass@1 and the eval job score a completion alike.

The R1 template opens `<think>` in the prompt, so a trace cut off inside its reasoning has no answer even
when it boxed one early. Before `verifier.think_policy` was resolved once for every path, training scored
such a trace 1 (think="strip") and the eval job 0 (think="require").
"""

import collections
import json
import types

import numpy as np
import pytest

from polaris_jax import rollout, sampling
from polaris_jax.data.problems import load_problems
from polaris_jax.data.tokenizer import qwen_tokenizer_offline
from polaris_jax.evals import run_eval
from polaris_jax.rewards.extraction import ExtractionConfig
from polaris_jax.rewards.scoring import score_completion
from polaris_jax.train.grpo import loop as grpo_loop
from tests.config_files import config_module

TRUNCATED = "Let me try 6*7. That gives \\boxed{42}, but wait, I should check whether"  # cut off: no </think>
FINISHED = "6*7 = 42.\n</think>\n\nThe answer is \\boxed{42}."


def _load(name: str, arg: str):
    return config_module(name).get_config(arg)


def scripted_generate(tokenizer):
    """A sampler stand-in: even samples are the truncated trace, odd ones the finished one."""
    eos = tokenizer.eos_token_ids[0]

    def generate(config, params, prompts, *, n, max_new_tokens, **kwargs):
        rows = len(prompts) * n
        tokens_br = np.zeros((rows, max_new_tokens), np.int32)
        lengths_b, finish_b = np.zeros(rows, np.int32), np.zeros(rows, np.int32)
        for row in range(rows):
            finished = row % 2 == 1
            ids = tokenizer.encode(FINISHED if finished else TRUNCATED) + ([eos] if finished else [])
            assert len(ids) <= max_new_tokens
            tokens_br[row, : len(ids)], lengths_b[row] = ids, len(ids)
            finish_b[row] = sampling.FINISH_EOS if finished else sampling.FINISH_LENGTH
        return sampling.SampleOutput(tokens_br, np.zeros(tokens_br.shape, np.float32), lengths_b, finish_b)

    return generate


@pytest.fixture(scope="module")
def r1_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("r1")
    tokenizer = qwen_tokenizer_offline("r1_distill_qwen")
    tokenizer.save(root / "tokenizer")
    data = root / "problems.jsonl"
    data.write_text(
        "".join(
            json.dumps({"id": f"p{i}", "problem": f"What is {i}+{42 - i}?", "answer": "42"}) + "\n" for i in range(4)
        )
    )
    return tokenizer, str(root / "tokenizer"), str(data)


def test_a_truncated_think_trace_scores_the_same_in_training_in_loop_eval_and_the_eval_job(
    r1_setup, tmp_path, monkeypatch
):
    tokenizer, tokenizer_dir, data = r1_setup
    # The bug this guards against: without the resolved policy the early box would count.
    assert score_completion(TRUNCATED, "42", ExtractionConfig(think="strip")).reward == 1.0
    monkeypatch.setattr(rollout, "generate", scripted_generate(tokenizer))
    expected = np.tile([0.0, 1.0], 8)

    config = _load("polaris_qwen3_4b", "tiny")
    with config.unlocked():
        config.tokenizer_dir = tokenizer_dir
        config.schedule.datasets = (data,) * len(config.schedule.steps)
        config.eval.dataset = data
        config.data.max_prompt_len = 128
        config.rewards = {"accuracy": {"weight": 1.0}}
        config.rollout.backend = "static"  # the scripted `generate` stands in for the sampler
    run = grpo_loop.Run(config, str(tmp_path / "grpo"))
    try:
        assert run.pool.extraction.think == "require"
        rollouts, _, _ = grpo_loop._sampler(run, run.stages[0], 0, run.params(), run.mesh)(0, 0)
        np.testing.assert_array_equal(rollouts.correct_b, expected)
        np.testing.assert_array_equal(rollouts.rewards_b, expected)
        eval_problems = load_problems(data, run.tokenizer, config.data)
        in_loop = grpo_loop._evaluate(run, eval_problems, 0)
    finally:
        run.close()
    assert in_loop["pass@1"] == pytest.approx(0.5)

    eval_config = _load("eval_math", "tiny")
    eval_config.tokenizer = "r1_distill_qwen"
    eval_config.benchmark = data
    eval_config.n = 4
    eval_config.max_new_tokens = 48
    result = run_eval(eval_config, str(tmp_path / "eval"))
    with open(result["samples_path"]) as f:
        samples = [json.loads(line) for line in f]
    assert [s["reward"] for s in samples] == expected.tolist()
    assert result["avg@4"] == pytest.approx(in_loop["pass@1"])


def _rollouts(correct_gn) -> rollout.Rollouts:
    correct_b = np.asarray(correct_gn, np.float32).reshape(-1)
    rows, r = len(correct_b), 3
    return rollout.Rollouts(
        prompt_bt=np.arange(rows * 2, dtype=np.int32).reshape(rows, 2),
        prompt_len_b=np.full(rows, 2, np.int32),
        response_br=np.arange(rows * r, dtype=np.int32).reshape(rows, r),
        response_len_b=np.full(rows, r, np.int32),
        sampler_logprobs_br=np.zeros((rows, r), np.float32),
        finish_b=np.full(rows, sampling.FINISH_EOS, np.int32),
        correct_b=correct_b,
        rewards_b=correct_b,
        group_b=np.repeat(np.arange(len(correct_gn), dtype=np.int32), 2),
    )


def test_batch_shaping_keeps_a_rollouts_batch_typed_and_whole():
    from polaris_jax.train import rl

    batch = _rollouts([[1, 0], [1, 1], [0, 0]])
    shaped, info = rl.polaris_substitute(
        batch, 2, np.random.default_rng(0), rewards_key="rewards_b", min_informative_fraction=0.0
    )
    assert isinstance(shaped, rollout.Rollouts) and info["num_substituted_groups"] == 2
    np.testing.assert_array_equal(shaped.group_b, [0, 0, 0, 0, 0, 0])  # every group is now a copy of group 0
    np.testing.assert_array_equal(shaped.response_br, np.concatenate([batch.response_br[:2]] * 3))

    acc = rl.DynamicSamplingAccumulator(2, 2, rewards_key="rewards_b")
    acc.add(batch)
    acc.add(_rollouts([[0, 1]]).replace(group_b=np.asarray([7, 7], np.int32)))
    kept, _ = acc.pop()
    assert isinstance(kept, rollout.Rollouts)
    np.testing.assert_array_equal(kept.group_b, [0, 0, 7, 7])
    np.testing.assert_array_equal(kept.prompt_bt[:2], batch.prompt_bt[:2])


def test_the_paged_engine_gives_the_static_engines_rollouts():
    """`rollout.backend` picks the sampler; both draw the same keys, so the verified batches agree."""
    import dataclasses

    from polaris_jax.data.problems import Problem
    from polaris_jax.sampling.engine_settings import engine_section
    from tests.sampling.conftest import golden

    model = golden("qwen3_tied")
    # A stand-in tokenizer for the golden model's 256 ids: ids as text, an EOS id that some rows meet.
    common = collections.Counter(t for row in model.new_ids for t in row).most_common(4)
    tokenizer = types.SimpleNamespace(
        eos_token_ids=tuple(t for t, _ in common), decode=lambda ids: " ".join(map(str, ids))
    )
    problems = [Problem(f"p{i}", tuple(p), "42") for i, p in enumerate(model.prompts)]
    static = rollout.RolloutSettings(
        max_response_len=24,
        temperature=1.0,
        samples_per_prompt=3,
        prompt_width=rollout.prompt_width(problems),
        top_p=0.9,
    )
    paged = dataclasses.replace(
        static, chunks=2, backend="engine", engine=dict(engine_section().to_dict(), max_slots=4)
    )
    with rollout.verifier_pool("strip", "", num_workers=1) as pool:
        kwargs = dict(tokenizer=tokenizer, pool=pool, seed=5)
        ours = rollout.sample_and_verify(model.config, model.params, problems, paged, **kwargs)
        expected = rollout.sample_and_verify(
            model.config, model.params, problems, dataclasses.replace(static, chunks=2), **kwargs
        )
    for field in ("prompt_bt", "response_br", "response_len_b", "finish_b", "group_b"):
        np.testing.assert_array_equal(getattr(ours.rollouts, field), getattr(expected.rollouts, field), err_msg=field)
    # Float rounding only: the engine's CPU attention kernel sums in another order than static's dense attention,
    # and the difference grows over 24 decoded tokens (seen: 1.2e-5 on a logprob of -2.3).
    logprobs = ours.rollouts.sampler_logprobs_br, expected.rollouts.sampler_logprobs_br
    np.testing.assert_allclose(*logprobs, rtol=1e-5, atol=1e-5)
    assert ours.texts == expected.texts
    assert set(expected.rollouts.finish_reasons) == {"eos", "length"}
    assert ours.info["engine/decode_tokens"] == ours.info["rollout_tokens"]
    assert 0 < ours.info["engine/live_slots_mean"] <= 4 and ours.info["engine/pages_used_max"] > 0
    assert "engine/steps" not in expected.info


def test_long_tail_budgets_follow_a_lognormal_with_the_asked_spread():
    from polaris_jax.data.problems import Problem

    problems = [Problem(f"q{i}", (1,), "1") for i in range(4000)]
    budgets = rollout.long_tail_budgets(problems, 2000, 20.0, seed=3)
    assert budgets.max() <= 2000 and budgets.min() >= 100
    assert np.percentile(budgets, 99) / np.percentile(budgets, 1) == pytest.approx(20.0, rel=0.15)
    # log budgets are normal: median at the geometric middle, max_len / sqrt(spread)
    assert np.median(budgets) == pytest.approx(2000 / np.sqrt(20.0), rel=0.08)
    np.testing.assert_array_equal(budgets[:50], rollout.long_tail_budgets(problems[:50], 2000, 20.0, seed=3))


def test_forced_long_tail_lengths_are_the_same_on_both_backends():
    """`length_spread` ignores EOS and caps each prompt at its budget: `generate`'s per-prompt caps and the
    engine's per-request max_new_tokens give the same rows."""
    import dataclasses

    from polaris_jax.data.problems import Problem
    from tests.sampling.conftest import golden

    model = golden("qwen3_tied")
    tokenizer = types.SimpleNamespace(eos_token_ids=(1, 2, 3), decode=lambda ids: " ".join(map(str, ids)))
    problems = [Problem(f"p{i}", tuple(p), "42") for i, p in enumerate(model.prompts)]
    static = rollout.RolloutSettings(
        max_response_len=40,
        temperature=1.0,
        samples_per_prompt=2,
        prompt_width=rollout.prompt_width(problems),
        length_spread=8.0,
        seed=1,
    )
    budgets = np.repeat(rollout.long_tail_budgets(problems, 40, 8.0, seed=1), 2)
    with rollout.verifier_pool("strip", "", num_workers=1) as pool:
        kwargs = dict(tokenizer=tokenizer, pool=pool, seed=5)
        ours = rollout.sample_and_verify(
            model.config, model.params, problems, dataclasses.replace(static, backend="engine"), **kwargs
        )
        expected = rollout.sample_and_verify(model.config, model.params, problems, static, **kwargs)
    np.testing.assert_array_equal(expected.rollouts.response_len_b, budgets)
    assert set(expected.rollouts.finish_reasons) == {"length"} and len(set(budgets)) > 1
    for field in ("response_br", "response_len_b", "finish_b"):
        np.testing.assert_array_equal(getattr(ours.rollouts, field), getattr(expected.rollouts, field), err_msg=field)
