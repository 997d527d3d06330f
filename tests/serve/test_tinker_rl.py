"""A cookbook-style GRPO loop on the arithmetic task, through the official `tinker` SDK only: each step
samples the live LoRA weights (`save_weights_and_get_sampling_client`), scores the samples with the
project's verifier, centres the rewards per group, and trains with Tinker's `importance_sampling` loss
and `optim_step`. The served model is the demo's SFT warm start (a random model cannot do arithmetic in
budget). Held-out pass@1 (sampled at the training temperature) must rise by MARGIN. Slow tier: about
5 min on 2 cores."""

from __future__ import annotations

import json

import numpy as np
import pytest

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402

from polaris_jax.data.tokenizer import Tokenizer  # noqa: E402
from polaris_jax.rewards.scoring import score_completion  # noqa: E402
from polaris_jax.tools import demo  # noqa: E402
from polaris_jax.train.sft import loop as sft_loop  # noqa: E402
from tests.config_files import config_module  # noqa: E402
from tests.serve.server_helpers import free_port, running_server  # noqa: E402

MARGIN = 0.10
STEPS, PROMPTS, GROUP, EVAL, EVAL_SAMPLES = 12, 16, 8, 64, 4
MAX_TOKENS = 40


def _problems(path: str, count: int) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(count), f)]


def _accuracy(sampler, tokenizer, problems) -> float:
    """Mean reward of EVAL_SAMPLES samples per held-out problem at the training temperature (pass@1, as the
    GRPO loop's own eval measures it)."""
    params = types.SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=0)
    futures = [sampler.sample(_prompt(tokenizer, p), EVAL_SAMPLES, params) for p in problems]
    scores = [[_reward(tokenizer, s.tokens, p) for s in f.result().sequences] for f, p in zip(futures, problems)]
    return float(np.mean(scores))


def _prompt(tokenizer, problem) -> types.ModelInput:
    text = tokenizer.apply_chat_template([{"role": "user", "content": problem["problem"]}], add_generation_prompt=True)
    return types.ModelInput.from_ints(tokenizer.encode(text))


def _reward(tokenizer, tokens, problem) -> float:
    return score_completion(tokenizer.decode(tokens, skip_special_tokens=True), problem["answer"]).reward


@pytest.mark.slow
def test_a_grpo_loop_through_the_sdk_raises_held_out_accuracy(tmp_path):
    config = config_module("grpo_tiny").get_config("ci")
    paths = demo.write_task(config, str(tmp_path / "data"))
    model_dir = sft_loop.run(demo.sft_config(config, paths), str(tmp_path / "sft"))["export_dir"]
    tokenizer = Tokenizer.from_dir(model_dir)
    train_problems = _problems(paths["rl"], STEPS * PROMPTS)
    eval_problems = _problems(paths["eval"], EVAL)

    port = free_port()
    args = ["--model", model_dir, "--workdir", str(tmp_path / "serve"), "--max_slots", "64"]
    with running_server(args + ["--max_seq_len", "128", "--page_size", "16"], port) as base:
        service = tinker.ServiceClient(base_url=base, api_key="tml-none")
        training = service.create_lora_training_client(base_model=model_dir, rank=16).result()
        before = _accuracy(
            training.save_weights_and_get_sampling_client(name="before").result(), tokenizer, eval_problems
        )
        rewards = []
        for step in range(STEPS):
            sampler = training.save_weights_and_get_sampling_client(name=f"step{step}").result()
            batch = train_problems[step * PROMPTS : (step + 1) * PROMPTS]
            prompts = [_prompt(tokenizer, p) for p in batch]
            # Seeded, so a run's samples (and so its outcome) depend on the code, not on the server's random seeds.
            futures = [
                (p, q, sampler.sample(q, GROUP, types.SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=s)))
                for s, (p, q) in enumerate(zip(batch, prompts), start=step * PROMPTS)
            ]
            datums = []
            for problem, prompt, future in futures:
                sequences = future.result().sequences
                r = np.array([_reward(tokenizer, s.tokens, problem) for s in sequences])
                rewards.append(r.mean())
                if r.std() == 0:  # no signal in a group of equal rewards
                    continue
                for seq, advantage in zip(sequences, r - r.mean()):
                    ids = prompt.to_ints() + seq.tokens
                    n_prompt = prompt.length - 1  # positions that predict prompt tokens carry no loss
                    inputs = dict(
                        target_tokens=np.asarray(ids[1:], np.int64),
                        logprobs=np.asarray([0.0] * n_prompt + list(seq.logprobs), np.float32),
                        advantages=np.asarray([0.0] * n_prompt + [advantage] * len(seq.tokens), np.float32),
                    )
                    datums.append(types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]), loss_fn_inputs=inputs))
            if datums:
                training.forward_backward(datums, "importance_sampling").result()
                training.optim_step(types.AdamParams(learning_rate=1e-3)).result()
        after = _accuracy(
            training.save_weights_and_get_sampling_client(name="after").result(), tokenizer, eval_problems
        )
        service.close("success").result(timeout=10)  # ends the session's heartbeat while the server runs
    result = dict(before=before, after=after, first_rewards=float(np.mean(rewards[:PROMPTS])))
    result["last_rewards"] = float(np.mean(rewards[-PROMPTS:]))
    print(json.dumps(result))
    assert after - before >= MARGIN, result
