"""Shared by the loop tests: run every jitted train step under `jax.transfer_guard("disallow")`.

A loop must place its batches explicitly (`put_batch`, `put_update_batch`); an implicit host -> device
copy inside a step call (a numpy array, a Python scalar turned into an array) then fails the test.
"""

import contextlib

import jax
import pytest


def _guarded(make):
    def make_guarded(*args, **kwargs):
        step = make(*args, **kwargs)

        def guarded_step(*step_args, **step_kwargs):
            with jax.transfer_guard("disallow"):
                return step(*step_args, **step_kwargs)

        return guarded_step

    return make_guarded


@contextlib.contextmanager
def guarded_train_steps():
    """Within this block, the SFT and GRPO loops' jitted steps run under transfer_guard("disallow")."""
    from polaris_jax.train.grpo import step as grpo_step
    from polaris_jax.train.sft import loop as sft_loop

    patch = pytest.MonkeyPatch()
    patch.setattr(sft_loop, "make_sft_step", _guarded(sft_loop.make_sft_step))
    patch.setattr(grpo_step, "make_grpo_update", _guarded(grpo_step.make_grpo_update))
    try:
        yield
    finally:
        patch.undo()
