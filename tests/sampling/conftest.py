"""Shared fixtures: golden tiny models (loaded once) and their greedy-generation references; a compile counter."""

import contextlib

import jax.monitoring
import numpy as np
import pytest

from polaris_jax.models import load_hf
from tests.conftest import GOLDEN_DIR

PARITY_MODELS = ("qwen2", "qwen3_tied", "qwen3_untied", "qwen3_moe", "qwen3_yarn")


class Golden:
    def __init__(self, name: str):
        self.config, self.params = load_hf(GOLDEN_DIR / name, dtype="float32")
        arrays = np.load(GOLDEN_DIR / name / "golden.npz")
        mask_bt = arrays["gen_attention_mask"].astype(bool)
        self.prompts = [row[m].tolist() for row, m in zip(arrays["gen_prompt_ids"], mask_bt)]
        self.new_ids = [row.tolist() for row in arrays["gen_new_ids"]]  # transformers' greedy generate()


_LOADED: dict = {}


def golden(name: str) -> Golden:
    if name not in _LOADED:
        _LOADED[name] = Golden(name)
    return _LOADED[name]


@pytest.fixture(scope="session")
def tied():
    """The model most functional tests share, so they share compiled programs too."""
    return golden("qwen3_tied")


def spy_decode_batches(set_attribute) -> list:
    """Wraps `decode_loop.decode` (through `set_attribute`, e.g. monkeypatch.setattr) to record the decode
    batch of every call; returns that list."""
    from polaris_jax.sampling import decode_loop

    batches, original = [], decode_loop.decode

    def spy(config, params, state, *args, **kwargs):
        batches.append(state.done_b.shape[0])
        return original(config, params, state, *args, **kwargs)

    set_attribute(decode_loop, "decode", spy)
    return batches


@pytest.fixture
def decode_batches(monkeypatch):
    """The decode batch of every `decode_loop.decode` call made in the test."""
    return spy_decode_batches(monkeypatch.setattr)


_COMPILE_EVENTS = ("/jax/core/compile/backend_compile_duration", "/jax/core/compile/jaxpr_trace_duration")
_compiles = {"on": False, "events": []}


def _listen(name, duration, **kwargs):
    if _compiles["on"] and name in _COMPILE_EVENTS:
        _compiles["events"].append((name, kwargs.get("fun_name")))


jax.monitoring.register_event_duration_secs_listener(_listen)


@contextlib.contextmanager
def compilations():
    """Yields the list of (event, function) of every trace or compile that happens inside the block."""
    _compiles["events"] = events = []
    _compiles["on"] = True
    try:
        yield events
    finally:
        _compiles["on"] = False
