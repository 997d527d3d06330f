"""Every gold answer of every shipped benchmark verifies against a completion that boxes it."""

import functools

import pytest

from polaris_jax.data.benchmarks import benchmark_names, load_benchmark
from polaris_jax.rewards.equivalence import answers_equivalent

pytestmark = pytest.mark.timeout(300)

# Minerva golds that math-verify cannot turn into sympy; they can only match as strings.
STRING_ONLY_GOLDS = {
    "np.arcsin(10/13)",
    r"\frac{dM}{dt}=\frac{10^{5} L_{\odot}}{0.007 c^{2} M_{\odot}^{6}} M^{6}",
    r"\hbar \omega(v+1 / 2)-\frac{E_{0}^{2} e^{2}}{2 m \omega^{2}}",
    "E_{1},E_{2}",
    r"m_{p} c^{2}\left(\gamma^{2}-1\right) \sin ^{2} \theta",  # \gamma parses as the gamma function
}


@pytest.fixture(scope="module")
def golds():
    rows = [row for name in benchmark_names() for row in load_benchmark(name)]
    assert len(rows) == 2281, "the shipped benchmark files hold 2,281 problems"
    return [row["answer"] for row in rows]


def test_every_gold_verifies_against_its_boxed_self(pool, golds):
    completions = [f"<think>\nreasoning\n</think>\nSo the final answer is $\\boxed{{{gold}}}$." for gold in golds]
    scores = pool.score_async(completions, golds).result(timeout=240)
    failures = [(gold, s.reason) for gold, s in zip(golds, scores) if s.reward != 1.0]
    assert not failures, failures[:10]


def test_every_gold_parses_and_verifies_mathematically(pool, golds):
    # Without the string shortcut: each gold goes through math-verify's parser and verify.
    check = functools.partial(answers_equivalent, string_shortcut=False)
    verdicts = pool.map_async(check, [(g, g) for g in golds], on_failure=lambda r: r).result(timeout=240)
    failures = {g: v for g, v in zip(golds, verdicts) if not getattr(v, "equal", False)}
    assert set(failures) == STRING_ONLY_GOLDS, failures
