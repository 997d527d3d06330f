"""Checkpointer: keep-N, LoRA-only saves, data iterator state, clear errors for missing checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polaris_jax.train import checkpoint


class _Counter:
    """Stands in for the grain iterator: get_state / set_state of a JSON dict."""

    def __init__(self):
        self.position = 0

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = state["position"]


def _state(value: float):
    return {
        "params": {"w_lora_a": jnp.full((3,), value), "w": None},
        "frozen": {"w_lora_a": None, "w": jnp.full((4, 2), 7.0)},
        "opt_state": (jnp.full((3,), value * 2),),
        "step": jnp.int32(value),
        "rng": jax.random.PRNGKey(0),
    }


def test_keep_n_and_lora_only_round_trip(tmp_path):
    ckpt = checkpoint.Checkpointer(str(tmp_path), every=2, keep=2, async_save=True, lora_only=True)
    for step in range(1, 7):
        ckpt.maybe_save(step, _state(step), None)
    ckpt.wait()
    assert ckpt.all_steps() == [4, 6]
    assert not (tmp_path / "6" / "state" / "frozen").exists()
    template = _state(0.0)
    template["frozen"]["w"] = jnp.full((4, 2), -1.0)  # what the run reloads from its base checkpoint
    restored = ckpt.restore_latest(template)
    np.testing.assert_array_equal(restored["params"]["w_lora_a"], np.full(3, 6.0))
    np.testing.assert_array_equal(restored["opt_state"][0], np.full(3, 12.0))
    assert int(restored["step"]) == 6
    np.testing.assert_array_equal(restored["frozen"]["w"], template["frozen"]["w"])
    ckpt.close()


def test_missing_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoint.open_existing(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no finished checkpoint"):
        checkpoint.open_existing(str(tmp_path / "empty"))
    ckpt = checkpoint.Checkpointer(str(tmp_path / "run"))
    assert ckpt.restore_latest(_state(0.0)) is None
    with pytest.raises(FileNotFoundError, match="no checkpoint for step 5 .* available steps: none"):
        ckpt.restore(5, _state(0.0))
    ckpt.close()
