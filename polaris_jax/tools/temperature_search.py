"""Polaris's diversity-based temperature search, as a command over a checkpoint and a problem file.

    python -m polaris_jax.tools.temperature_search --checkpoint=checkpoints/Qwen3-4B \\
        --dataset=data/polaris/polaris-data-53K.jsonl --num_problems=64 --samples=8 \\
        --temperatures=0.6,0.8,1.0,1.2,1.3,1.4,1.5,1.6 --max_response_len=8192 --out=temps.json

Samples `samples` answers per problem at each temperature, measures mean per-problem Distinct-4
and accuracy (the same verifier as training), and picks a temperature with
`train.rl.diversity.choose_temperature` (see its docstring for the rule). Prints one JSON line and
optionally writes it to --out.
"""

from __future__ import annotations

import json

from absl import app, flags

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Hugging Face checkpoint directory.")
_DATASET = flags.DEFINE_string("dataset", None, "Problem file (jsonl/parquet) or a synthetic_arith: spec.")
_NUM_PROBLEMS = flags.DEFINE_integer("num_problems", 64, "Problems taken from the top of the file.")
_SAMPLES = flags.DEFINE_integer("samples", 8, "Samples per problem (the group Distinct-4 is measured in).")
_TEMPERATURES = flags.DEFINE_list("temperatures", ["0.6", "0.8", "1.0", "1.2", "1.4"], "Grid to scan.")
_MAX_LEN = flags.DEFINE_integer("max_response_len", 4096, "Response token budget.")
_INSTRUCTION = flags.DEFINE_string("instruction", "", "Appended to each problem on its own line.")
_TOLERANCE = flags.DEFINE_float("accuracy_tolerance", 0.03, "Accuracy drop accepted for more diversity.")
_DIVERSITY = flags.DEFINE_float("diversity_target", None, "Lowest Distinct-4 to aim for (optional).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampler seed.")
_THINK = flags.DEFINE_enum(
    "think_policy",
    "auto",
    ["auto", "strip", "require", "ignore"],
    "The verifier's think policy (as verifier.think_policy).",
)
_BACKEND = flags.DEFINE_enum(
    "backend", "engine", ["engine", "static"], "The sampler: the continuous-batching engine or sampling.generate."
)
_OUT = flags.DEFINE_string("out", "", "Also write the JSON here.")


def search(
    checkpoint: str,
    dataset: str,
    temperatures,
    *,
    num_problems: int = 64,
    samples: int = 8,
    max_response_len: int = 4096,
    instruction: str = "",
    accuracy_tolerance: float = 0.03,
    diversity_target: float | None = None,
    seed: int = 0,
    think_policy: str = "auto",
    backend: str = "engine",
) -> dict:
    import ml_collections

    from polaris_jax.data import problems as problems_lib
    from polaris_jax.rollout import RolloutSettings, prompt_width, rollout_seed, sample_and_verify, verifier_pool
    from polaris_jax.tools.difficulty_filter import load_policy
    from polaris_jax.train import rl

    tokenizer, model_config, params = load_policy(checkpoint)
    data_config = ml_collections.ConfigDict(dict(instruction=instruction, max_prompt_len=1 << 20))
    problems = problems_lib.load_problems(dataset, tokenizer, data_config)[:num_problems]
    with verifier_pool(think_policy, problems_lib.prompt_text("1+1", tokenizer, data_config)) as pool:

        def sample_fn(temperature: float):
            settings = RolloutSettings(
                max_response_len=max_response_len,
                temperature=temperature,
                samples_per_prompt=samples,
                prompt_width=prompt_width(problems),
                backend=backend,
            )
            rollouts = sample_and_verify(
                model_config, params, problems, settings, tokenizer=tokenizer, pool=pool, seed=rollout_seed(seed)
            ).rollouts
            lengths = rollouts.response_len_b
            responses = [rollouts.response_br[i, : lengths[i]].tolist() for i in range(len(lengths))]
            return responses, (rollouts.correct_b > 0.5).tolist()

        result = rl.search_temperature(
            sample_fn,
            [float(t) for t in temperatures],
            group_size=samples,
            accuracy_tolerance=accuracy_tolerance,
            diversity_target=diversity_target,
        )
    return {
        "chosen_temperature": result.chosen_temperature,
        "rule": result.rule,
        "scans": [
            {
                "temperature": s.temperature,
                "distinct_4": s.diversity,
                "accuracy": s.accuracy,
                "responses": s.num_responses,
            }
            for s in result.scans
        ],
    }


def main(argv):
    del argv
    if not _CHECKPOINT.value or not _DATASET.value:
        raise app.UsageError("--checkpoint and --dataset are required")
    out = search(
        _CHECKPOINT.value,
        _DATASET.value,
        _TEMPERATURES.value,
        num_problems=_NUM_PROBLEMS.value,
        samples=_SAMPLES.value,
        max_response_len=_MAX_LEN.value,
        instruction=_INSTRUCTION.value,
        accuracy_tolerance=_TOLERANCE.value,
        diversity_target=_DIVERSITY.value,
        seed=_SEED.value,
        think_policy=_THINK.value,
        backend=_BACKEND.value,
    )
    line = json.dumps(out, sort_keys=True)
    if _OUT.value:
        from polaris_jax.files import write_atomic

        write_atomic(_OUT.value, line + "\n")
    print(line)


if __name__ == "__main__":
    app.run(main)
