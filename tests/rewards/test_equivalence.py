"""Equivalence classes through math-verify plus our guards (run in-process: no hostile input here)."""

import pytest

from polaris_jax.rewards.equivalence import answers_equivalent, normalize_answer, string_key

pytestmark = pytest.mark.timeout(120)

EQUIVALENT = [
    # fractions and decimals
    (r"\frac{1}{2}", "0.5"),
    (r"\frac12", r"\dfrac{1}{2}"),
    ("0.5", "1/2"),
    (r"-\frac{3}{4}", "-0.75"),
    # radicals and symbolic forms
    (r"3\sqrt{3}", r"\sqrt{27}"),
    (r"\frac{x+2}{7}", r"\frac{x}{7}+\frac{2}{7}"),
    (r"1-\frac{1}{\mathrm{e}}", r"1-\frac{1}{e}"),
    # sets and "find all" in any order
    (r"\{1, 2\}", r"\{2, 1\}"),
    ("-2, 1", "1, -2"),
    (r"1331 \text{ and } 1728", "1728, 1331"),
    # intervals and unions
    ("[1, 2)", r"\left[1,2\right)"),
    (r"(-\infty, 1) \cup (2, \infty)", r"(-\infty,1)\cup(2,\infty)"),
    # tuples / points
    (r"\left( 3, \frac{\pi}{2} \right)", r"(3, \frac{\pi}{2})"),
    # matrices
    (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\begin{pmatrix}1\\2\end{pmatrix}"),
    # units, degrees, currency, percent
    (r"5 \text{ cm}", "5"),
    (r"30^\circ", "30"),
    (r"\$32,\!348", "32348"),
    (r"10\%", "10"),
    # thousands separators and scientific notation
    ("1,000", "1000"),
    ("4.5e33", r"4.5 \times 10^{33}"),
    # \text{} answers
    (r"\text{(C)}", "C"),
    (r"\text{Evelyn}", "Evelyn"),
    # equations
    ("y = -2x", "y=-2x"),
    # zero-padded AIME answers (Polaris parquet)
    ("025", "25"),
]

NOT_EQUIVALENT = [
    # the known false match through unsupported LaTeX
    (r"1-\frac{1}{e}", r"1+\frac{1}{e}"),
    (r"1 - \frac{1}{\mathrm{e}}", r"1 + \frac{1}{\mathrm{e}}"),
    # a subset of a "find all" answer
    (r"1331 \text{ and } 1728", "1728"),
    ("1, 2, 3", "1, 2"),
    (r"x=1 \text{ or } x=2", "x=2"),
    (r"\pm 2021", "2021"),
    # tiny numbers that absolute rounding would call equal
    (r"\frac{1}{2^{99}}", r"\frac{1}{2^{98}}"),
    (r"\frac{1}{2004!}", r"\frac{1}{2006!}"),
    ("3e-8", "5e-8"),
    # ordered pairs are ordered
    ("(1,2)", "(2,1)"),
    (r"\text{(C)}", r"\text{(D)}"),
    # division by zero, huge values, ellipses
    ("2", r"\frac{4}{0}"),
    ("5", r"9^{9^{9^{9}}}"),
    ("1, 2, \\ldots, n", "1, 3, 5, \\ldots, 2n-1"),
    # plainly different
    ("204", "205"),
    (r"\frac{1}{576}", r"\frac{1}{575}"),
]


@pytest.mark.parametrize("gold, answer", EQUIVALENT)
def test_equivalent(gold, answer):
    verdict = answers_equivalent(gold, answer)
    assert verdict.equal, verdict.reason


@pytest.mark.parametrize("gold, answer", EQUIVALENT[:8])
def test_equivalent_without_the_string_shortcut(gold, answer):
    verdict = answers_equivalent(gold, answer, string_shortcut=False)
    assert verdict.equal, verdict.reason


@pytest.mark.parametrize("gold, answer", NOT_EQUIVALENT)
def test_not_equivalent(gold, answer):
    verdict = answers_equivalent(gold, answer)
    assert not verdict.equal, verdict.reason


def test_reasons_name_the_guard():
    assert "division by zero" in answers_equivalent("2", r"\frac{1}{0}").reason
    assert "refused answer" in answers_equivalent("5", r"9^{9^{9^{9}}}").reason
    assert "refused answer" in answers_equivalent("5", r"(10^{10})!").reason
    assert "refused answer" in answers_equivalent("5", r"2^{2^{30}}").reason
    assert "relative tolerance" in answers_equivalent(r"\frac{1}{2^{99}}", r"\frac{1}{2^{98}}").reason


def test_unparseable_answers_compare_as_whole_strings():
    # math-verify cannot parse this gold; only the identical string may match it
    gold = "np.arcsin(10/13)"
    assert answers_equivalent(gold, "np.arcsin(10/13)").equal
    assert not answers_equivalent(gold, "np.arcsin(10/12)").equal


def test_identical_huge_answer_matches_as_a_string():
    assert answers_equivalent(r"9^{9^{9^{9}}}", r"9^{9^{9^{9}}}").equal


def test_large_but_safe_numbers_are_still_compared():
    assert answers_equivalent(r"2^{25} \cdot 26!", str(2**25 * 403291461126605635584000000)).equal
    assert answers_equivalent("2^{2005}", str(2**2005)).equal


def test_normalisation():
    assert normalize_answer(r"$\text{(B)}$.") == "(B)"
    assert normalize_answer("1,234,567") == "1234567"
    assert normalize_answer("-1./3") == "-1/3"
    assert string_key(r"\left( 1, 2 \right)") == string_key("(1,2)")
