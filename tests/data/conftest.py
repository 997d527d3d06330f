"""Shared fixtures for the data tests: the real Qwen tokenizers, built once per session."""

import pytest

from polaris_jax.data.tokenizer import qwen_tokenizer_offline


@pytest.fixture(scope="session")
def qwen3_tok():
    return qwen_tokenizer_offline("qwen3")


@pytest.fixture(scope="session")
def r1_tok():
    return qwen_tokenizer_offline("r1_distill_qwen")
