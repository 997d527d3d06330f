"""tinker-cookbook's own training loops (`supervised.train.main`, `rl.train.main`, 0.6.1) against the server,
offline: a tiny random Qwen3 with the real vocabulary served by `python -m polaris_jax.serve`, the
cookbook's `qwen3` renderer, a local conversations file, and its arithmetic RL environment.

The supervised loop must lower the held-out NLL its own evaluator reports; the RL loop's sampler and
trainer must agree (the cookbook's `optim/kl_sample_train_v1`, the KL between the logprobs `sample`
returned and those `forward_backward` computes); a second run on the same log_path resumes from the
checkpoint it recorded (through `GET /api/v1/training_runs/...`) and finds nothing left to do.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from polaris_jax.data.tokenizer import qwen_tokenizer_offline
from tests.serve.server_helpers import free_port, running_server, tiny_checkpoint

# The cookbook (torch, transformers, datasets) is imported in the tests, not at collection (make test deselects them).
pytestmark = pytest.mark.slow
KEY = "tml-cookbook-key"  # the SDK wants the tml- prefix; the cookbook passes no key, so it comes from the env
RENDERER = "qwen3"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    pytest.importorskip("tinker")
    pytest.importorskip("transformers")
    sl_train = pytest.importorskip("tinker_cookbook.supervised.train")
    rl_train = pytest.importorskip("tinker_cookbook.rl.train")
    path = tmp_path_factory.mktemp("cookbook") / "tiny_qwen3"
    path.mkdir()
    tokenizer = qwen_tokenizer_offline("qwen3")
    tokenizer.save(path)
    tiny_checkpoint(path, tokenizer.vocab_size)
    args = ["--model", str(path), "--api_key", KEY, "--workdir", str(path.parent / "serve"), "--max_slots", "8"]
    args += ["--max_seq_len", "256", "--prefill_chunk", "64", "--page_size", "16"]
    mp = pytest.MonkeyPatch()
    mp.setenv("TINKER_API_KEY", KEY)
    mp.setenv("HF_HUB_OFFLINE", "1")
    for module in (sl_train, rl_train):  # it fetches a price list from the web (5 s timeout) otherwise
        mp.setattr(module, "fetch_model_pricing", lambda *a, **k: None)
    with running_server(args, free_port()) as base_url:
        yield dict(base_url=base_url, model=str(path), root=path.parent)
    mp.undo()


def _metrics(log_path) -> list[dict]:
    return [json.loads(line) for line in (log_path / "metrics.jsonl").read_text().splitlines()]


def test_the_cookbooks_supervised_loop_lowers_its_held_out_nll(served):
    import tinker_cookbook.supervised.train as sl_train
    from tinker_cookbook.supervised.data import FromConversationFileBuilder
    from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig

    data = served["root"] / "conversations.jsonl"
    with data.open("w") as f:  # whatever the question, the same answer: learnable in a few steps
        for i in range(20):
            messages = [{"role": "user", "content": f"Question {i}: what is the code?"}]
            f.write(json.dumps({"messages": messages + [{"role": "assistant", "content": "banana"}]}) + "\n")
    log_path = served["root"] / "sl"
    builder = FromConversationFileBuilder(
        file_path=str(data),
        test_size=4,  # held-out rows: the cookbook's evaluator samples from saved weights and scores them
        common_config=ChatDatasetBuilderCommonConfig(
            model_name_for_tokenizer=served["model"],
            renderer_name=RENDERER,
            max_length=64,
            batch_size=4,
            train_on_what="last_assistant_message",
        ),
    )
    config = sl_train.Config(
        log_path=str(log_path),
        model_name=served["model"],
        recipe_name="polaris_offline_sl",
        renderer_name=RENDERER,
        dataset_builder=builder,
        base_url=served["base_url"],
        learning_rate=2e-2,
        lora_rank=4,
        num_epochs=3,  # 16 training rows / 4: 12 steps
        eval_every=6,
        save_every=6,
        ttl_seconds=None,
    )
    asyncio.run(sl_train.main(config))
    rows = _metrics(log_path)
    held_out = [r["test/nll"] for r in rows if "test/nll" in r]
    assert len(rows) >= 12 and len(held_out) >= 2, rows
    assert held_out[-1] < 0.5 * held_out[0], held_out
    checkpoints = [json.loads(line) for line in (log_path / "checkpoints.jsonl").read_text().splitlines()]
    assert checkpoints and all(c["state_path"].startswith("tinker://") for c in checkpoints if "state_path" in c)


def test_the_cookbooks_rl_loop_samples_what_it_trains_and_resumes(served):
    import tinker_cookbook.rl.train as rl_train
    from tinker_cookbook.recipes.math_rl.arithmetic_env import ArithmeticDatasetBuilder

    log_path = served["root"] / "rl"

    def run():
        builder = ArithmeticDatasetBuilder(
            batch_size=2, group_size=4, n_batches=2, model_name_for_tokenizer=served["model"], renderer_name=RENDERER
        )
        config = rl_train.Config(
            log_path=str(log_path),
            model_name=served["model"],
            recipe_name="polaris_offline_rl",
            renderer_name=RENDERER,
            dataset_builder=builder,
            base_url=served["base_url"],
            learning_rate=1e-3,
            lora_rank=4,
            max_tokens=8,
            loss_fn="importance_sampling",
            eval_every=0,
            save_every=1,
            ttl_seconds=None,
        )
        asyncio.run(rl_train.main(config))

    def steps():  # the training steps' rows (a summary row of token counts follows them)
        return [r for r in _metrics(log_path) if "env/all/total_episodes" in r]

    run()
    rows = steps()
    assert [r["step"] for r in rows] == [0, 1]
    for r in rows:
        assert r["env/all/total_episodes"] == 8
        assert abs(r["optim/kl_sample_train_v1"]) < 1e-3, r  # the sampler's logprobs are the trainer's
    run()  # resumes from its last checkpoint: nothing is left to do, no step runs again
    assert steps() == rows
