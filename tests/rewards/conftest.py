"""One verifier pool for the reward tests (workers take a second or two to import sympy)."""

import pytest

from polaris_jax.rewards import VerifierPool


@pytest.fixture(scope="package")
def pool():
    with VerifierPool(num_workers=2, timeout_s=5.0) as verifier_pool:
        yield verifier_pool
