"""Learning is asserted: a seeded tiny SFT + GRPO run must raise held-out pass@1 by a set margin.

configs/grpo_tiny.py:ci warm-starts a tiny Qwen3 on imperfect arithmetic traces (some skip a step,
some skip the thinking and guess), then runs 30 GRPO steps rewarded by the math verifier. Measured
on a 2-core CPU: 0.21 -> 0.45. The margin (0.10) leaves room for numeric drift across platforms,
while a trainer that does not learn (wrong sign, misaligned log-probs, advantages that ignore the
reward) stays at or below the starting accuracy.
"""

import importlib.util
import os

import pytest

from polaris_jax.tools import demo

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
MARGIN = 0.10


@pytest.mark.slow  # about 2-3 min each on 2 cores: `make test-slow`, which .ci/run also runs
@pytest.mark.parametrize("staleness", [0, 1], ids=["synchronous", "asynchronous_k1_tis"])
def test_grpo_raises_held_out_accuracy(tmp_path, staleness):
    """On the engine (the default backend); k = 1 streams rollouts while the learner updates."""
    spec = importlib.util.spec_from_file_location("grpo_tiny", os.path.join(ROOT, "configs", "grpo_tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("ci")
    config.rollout.max_staleness = staleness
    config.algo.off_policy = "tis" if staleness else "none"
    result = demo.run(config, str(tmp_path))
    assert result["accuracy_after"] - result["accuracy_before"] >= MARGIN, result
    assert result["grpo_final_reward_mean"] > result["accuracy_before"], result
