"""End to end: a tiny saved checkpoint, 8 MATH-500 problems, n=4, both output files."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

sampling = pytest.importorskip("polaris_jax.sampling")

import jax  # noqa: E402
import tokenizers  # noqa: E402

from polaris_jax import rollout  # noqa: E402
from polaris_jax.data.benchmarks import benchmark_file  # noqa: E402
from polaris_jax.data.chat_template import builtin_template  # noqa: E402
from polaris_jax.data.tokenizer import Tokenizer  # noqa: E402
from polaris_jax.evals import run_eval  # noqa: E402
from polaris_jax.models import ModelConfig, init_params, save_hf  # noqa: E402
from tests.config_files import config_module  # noqa: E402

pytestmark = pytest.mark.timeout(600)

REPO = pathlib.Path(__file__).resolve().parents[2]
MATH500 = benchmark_file("math500")  # the file shipped in polaris_jax/data/benchmark_files/


def byte_tokenizer() -> Tokenizer:
    """A 261-token byte-level tokenizer with Qwen's chat specials, so the model can stay tiny."""
    alphabet = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    backend.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    backend.add_tokens(["<think>", "</think>"])
    config = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": builtin_template("qwen3")}
    return Tokenizer(backend, config)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tokenizer = byte_tokenizer()
    tokenizer_dir = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save(tokenizer_dir)
    model_config = ModelConfig.tiny(vocab_size=tokenizer.vocab_size)
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_hf(model_config, init_params(model_config, jax.random.key(0)), path, tokenizer_dir=tokenizer_dir)
    return path


def eval_config(checkpoint):
    config = config_module("eval_math").get_config("tiny")
    config.checkpoint = str(checkpoint)
    config.benchmark = str(MATH500)
    config.num_problems = 8
    config.n = 4
    config.max_new_tokens = 8
    config.problems_per_batch = 4  # two chunks: the first is verified while the second samples
    return config


def read_outputs(result):
    samples = [json.loads(line) for line in pathlib.Path(result["samples_path"]).read_text().splitlines()]
    summary = json.loads(pathlib.Path(result["summary_path"]).read_text())
    return samples, summary


def test_eval_on_a_tiny_model_writes_samples_and_summary(checkpoint, tmp_path):
    result = run_eval(eval_config(checkpoint), str(tmp_path))
    samples, summary = read_outputs(result)
    assert len(samples) == 8 * 4
    problems = [json.loads(line) for line in MATH500.read_text().splitlines()[:8]]
    assert [s["id"] for s in samples] == [p["unique_id"] for p in problems for _ in range(4)]
    assert [s["sample"] for s in samples] == [0, 1, 2, 3] * 8
    assert all(1 <= s["num_tokens"] <= 8 and s["finish_reason"] in ("eos", "stop", "length") for s in samples)
    assert summary["n"] == 4 and summary["num_problems"] == 8
    rewards = np.array([s["reward"] for s in samples])
    assert summary["metrics"]["avg@4"] == pytest.approx(rewards.mean())
    assert summary["metrics"]["mean_response_tokens"] == pytest.approx(np.mean([s["num_tokens"] for s in samples]))
    assert set(summary["metrics"]) >= {"avg@4", "pass@1", "pass@2", "pass@4", "cons@4", "truncation_rate"}
    leftovers = [p.name for p in pathlib.Path(result["samples_path"]).parent.iterdir() if p.name.startswith(".")]
    assert not leftovers  # atomic writes leave no temp files


def test_eval_scores_and_votes_with_the_verifier(checkpoint, tmp_path, monkeypatch):
    """A scripted sampler (known completions) checks scoring, voting and the metrics."""
    tokenizer = Tokenizer.from_dir(checkpoint)
    eos = tokenizer.eos_token_ids[0]
    golds = [json.loads(line)["answer"] for line in MATH500.read_text().splitlines()[:8]]
    script = [
        ("<think>\nok\n</think>\nSo \\boxed{%s}.", "eos"),  # right
        ("<think>\nhmm\n</think>\n\\boxed{-12345}", "eos"),  # wrong
        ("\\boxed{%s}", "eos"),  # right again: the majority
        ("<think>\nrunning out of tok", "length"),  # truncated, no answer
    ]
    seen_batches = []

    def scripted_generate(config, params, prompts, *, n, max_new_tokens, **kwargs):
        seen_batches.append(len(prompts))
        start = sum(seen_batches[:-1])
        rows = len(prompts) * n
        tokens_br = np.zeros((rows, max_new_tokens), np.int32)
        lengths_b, finish_b = np.zeros(rows, np.int32), np.zeros(rows, np.int32)
        codes = {"eos": sampling.FINISH_EOS, "length": sampling.FINISH_LENGTH}
        for i in range(len(prompts)):
            for j, (template, reason) in enumerate(script[:n]):
                text = template % golds[start + i] if "%s" in template else template
                ids = tokenizer.encode(text) + ([eos] if reason == "eos" else [])
                tokens_br[i * n + j, : len(ids)], lengths_b[i * n + j] = ids, len(ids)
                finish_b[i * n + j] = codes[reason]
        return sampling.SampleOutput(tokens_br, np.zeros(tokens_br.shape, np.float32), lengths_b, finish_b)

    monkeypatch.setattr(rollout, "generate", scripted_generate)
    config = eval_config(checkpoint)
    config.max_new_tokens = 96  # room for the scripted completions
    samples, summary = read_outputs(run_eval(config, str(tmp_path)))
    assert seen_batches == [4, 4]
    assert [s["reward"] for s in samples] == [1.0, 0.0, 1.0, 0.0] * 8
    assert all(not s["completion"].endswith("<|im_end|>") for s in samples)
    assert samples[0]["group"] == samples[2]["group"] != samples[1]["group"] and samples[3]["group"] is None
    metrics = summary["metrics"]
    assert metrics["avg@4"] == pytest.approx(0.5)
    assert metrics["pass@2"] == pytest.approx(1 - 1 / 6)  # 1 - C(2,2)/C(4,2)
    assert metrics["cons@4"] == 1.0
    assert metrics["truncation_rate"] == pytest.approx(0.25)


def test_auto_think_policy_requires_a_close_tag_when_the_prompt_opens_the_block(checkpoint):
    from polaris_jax.evals.harness import think_policy

    tokenizer = Tokenizer.from_dir(checkpoint)
    config = eval_config(checkpoint)
    assert think_policy(config, tokenizer) == "strip"
    config.force_think = True
    assert think_policy(config, tokenizer) == "require"
    config.verifier.think_policy = "ignore"
    assert think_policy(config, tokenizer) == "ignore"


_SHARDED_EVAL = """
import json, sys
from tests.evals.test_harness import eval_config
from polaris_jax.evals import run_eval
from polaris_jax.evals.harness import mesh_and_rules
config = eval_config(sys.argv[1])
config.mesh.data = -1
mesh, _ = mesh_and_rules(config)
import polaris_jax.rollout as rollout
original, meshes = rollout.generate, []
def spy(*args, mesh, **kwargs):
    meshes.append(mesh.devices.size)
    return original(*args, mesh=mesh, **kwargs)
rollout.generate = spy
result = run_eval(config, sys.argv[2])
print(json.dumps(dict(mesh=dict(mesh.shape), generate_meshes=meshes, samples=result["samples_path"])))
"""


def test_eval_on_a_four_device_data_mesh_gives_the_same_samples(checkpoint, tmp_path):
    """Rows are split over a 4-device mesh (fake CPU devices, in a subprocess); each row's sample
    depends on the seed and its index only, so every completion must equal the one-device run's."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", _SHARDED_EVAL, str(checkpoint), str(tmp_path / "sharded")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=500,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
    assert report["generate_meshes"] == [4, 4]  # both chunks sampled on the mesh
    sharded = [json.loads(line) for line in pathlib.Path(report["samples"]).read_text().splitlines()]
    single, _ = read_outputs(run_eval(eval_config(checkpoint), str(tmp_path / "single")))
    assert len(sharded) == len(single) == 32
    assert [s["completion"] for s in sharded] == [s["completion"] for s in single]
    assert [s["reward"] for s in sharded] == [s["reward"] for s in single]
