"""Is a model's final answer mathematically the same as the gold answer?

Built on math-verify (pinned in pyproject.toml) with the gold passed first, as its `verify`
is asymmetric. Both sides are wrapped in one `\\boxed{}` so math-verify sees exactly one
candidate each; its any-of-many matching is what let a subset of a "find all" answer pass.
Around it, guards for the known failure modes:

- LaTeX it cannot parse (`\\mathrm{e}`) used to fall back to a truncated string or to a
  number found inside the formula, so `1 - 1/e` matched `1 + 1/e`: we normalise the common
  cases and, when either side still does not parse, require the full strings to agree;
- expressions whose evaluation never ends (`9^{9^{9^{9}}}`) are refused before sympy sees
  them (see guards.py);
- division by zero (`zoo`, `nan`) never matches;
- a true verdict on two numbers must also agree to a relative tolerance: math-verify's
  absolute rounding and `evalf(chop=True)` call 1/2^99 equal to 1/2^98;
- "find all" answers must have as many elements as the gold set.

Nothing here has a timeout: it runs inside VerifierPool workers, which enforce one.
"""

from __future__ import annotations

import functools
import logging
import re
from typing import NamedTuple

import sympy
from math_verify import LatexExtractionConfig, parse, verify

from polaris_jax.rewards import guards

# math-verify warns once that we run it without its signal-based timeout; that is deliberate.
logging.getLogger("math_verify").setLevel(logging.ERROR)

_LATEX_ONLY = [LatexExtractionConfig()]
_SCIENTIFIC = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+))[eE]([-+]?\d+)\s*$")
_ROMAN_CONST = re.compile(r"\\(?:mathrm|mathit|operatorname|rm)\s*\{\s*([A-Za-z])\s*\}")
_TRAILING_DOT = re.compile(r"(?<=\d)\.(?!\d)")
_THOUSANDS = re.compile(r"^\s*[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?\s*$")
_WRAPPER = re.compile(r"^\\(?:text|textbf|mathrm|mathbf|textrm)\s*\{(.*)\}$", re.DOTALL)
_ELLIPSIS = re.compile(r"\\[lc]?dots|\.\.\.|…")
_SPACES = re.compile(r"\s+|\\[,;:! ]|~")

# Relative tolerance for a numeric verdict: exact forms must agree to evalf noise, and a
# float answer as closely as math-verify's 6-decimal rounding lets it at magnitude 1.
_REL_TOL_EXACT = 1e-12
_REL_TOL_FLOAT = 1e-6


class Verdict(NamedTuple):
    equal: bool
    reason: str  # string_match | math_match | mismatch | unparsed | refused: ... | ...


def normalize_answer(text: str) -> str:
    """Surface clean-up applied to gold and prediction alike before parsing."""
    previous = None
    while text != previous:  # "$x$." and "x.$" alike
        previous = text
        text = text.strip().strip("$")
        if text.endswith(".") and not text.endswith(".."):
            text = text[:-1]
    while (inner := _WRAPPER.match(text)) is not None and _balanced(inner.group(1)):
        text = inner.group(1).strip()
    text = _ROMAN_CONST.sub(r"\1", text)
    text = text.replace("\\!", "").replace("{,}", ",")
    if _THOUSANDS.match(text):
        text = text.replace(",", "")
    if (sci := _SCIENTIFIC.match(text)) is not None:
        text = f"{sci.group(1)} \\times 10^{{{sci.group(2)}}}"
    return _TRAILING_DOT.sub("", text)


def _balanced(text: str) -> bool:
    depth = 0
    for i, ch in enumerate(text):
        if ch == "{" and (i == 0 or text[i - 1] != "\\"):
            depth += 1
        elif ch == "}" and (i == 0 or text[i - 1] != "\\"):
            depth -= 1
            if depth < 0:
                return False
    return depth == 0


def string_key(text: str) -> str:
    """A whitespace- and case-insensitive key for comparing answers as plain strings."""
    text = normalize_answer(text)
    text = text.replace("\\left", "").replace("\\right", "").replace("\\dfrac", "\\frac")
    return _SPACES.sub("", text).lower()


@functools.lru_cache(maxsize=4096)
def parse_answer(text: str):
    """The sympy form of a (normalised) answer, or None when math-verify cannot parse it."""
    try:
        parsed = parse(
            "\\boxed{" + text + "}",
            extraction_config=_LATEX_ONLY,
            fallback_mode="no_fallback",
            parsing_timeout=None,
        )
    except Exception:  # math-verify raises whatever sympy raises on odd input
        return None
    for candidate in parsed:
        if not isinstance(candidate, str):
            return candidate
    return None


def _numeric_value(expr):
    if not isinstance(expr, sympy.Basic) or not expr.is_number or expr.has(sympy.UnevaluatedExpr):
        return None  # UnevaluatedExpr marks a percentage, which math-verify compares its own way
    value = expr.evalf(30)
    return value if value.is_number and value.is_finite else None


def _numbers_close(gold, answer) -> bool:
    """True unless both are plain numbers that differ beyond the relative tolerance."""
    gold_value, answer_value = _numeric_value(gold), _numeric_value(answer)
    if gold_value is None or answer_value is None:
        return True
    has_float = gold.has(sympy.Float) or answer.has(sympy.Float)
    tolerance = _REL_TOL_FLOAT if has_float else _REL_TOL_EXACT
    scale = max(abs(gold_value), abs(answer_value))
    return bool(abs(gold_value - answer_value) <= tolerance * scale)


def _elements(expr) -> tuple | None:
    """The members of a set-like answer (a set, a tuple, `x = {..}`), else None."""
    if isinstance(expr, sympy.Eq) and isinstance(expr.rhs, (sympy.FiniteSet, sympy.Tuple)):
        expr = expr.rhs
    if isinstance(expr, (sympy.FiniteSet, sympy.Tuple)):
        return tuple(expr.args)
    return None


def _same_cardinality(gold, answer) -> bool:
    gold_items = _elements(gold)
    if gold_items is None or len(gold_items) < 2:
        return True
    answer_items = _elements(answer)
    return answer_items is not None and len(answer_items) == len(gold_items)


def answers_equivalent(gold: str, answer: str, *, string_shortcut: bool = True) -> Verdict:
    """Whether `answer` is mathematically the gold answer. Gold first; both are strings.

    With `string_shortcut`, answers that agree as normalised strings match without sympy
    (always sound, and the only option when neither side parses).
    """
    if string_shortcut and string_key(gold) == string_key(answer):
        return Verdict(True, "string_match")
    if _ELLIPSIS.search(gold) or _ELLIPSIS.search(answer):
        return Verdict(False, "mismatch: ellipsis answers compare only as strings")
    gold_expr = parse_answer(normalize_answer(gold))
    answer_expr = parse_answer(normalize_answer(answer))
    if gold_expr is None or answer_expr is None:
        side = "gold" if gold_expr is None else "answer"
        return Verdict(False, f"unparsed {side}; strings differ")
    for side, expr in (("gold", gold_expr), ("answer", answer_expr)):
        if (why := guards.too_costly(expr)) is not None:
            return Verdict(False, f"refused {side}: {why}")
    if guards.is_undefined(gold_expr):
        return Verdict(False, "unusable gold: it parses to an undefined value; strings differ")
    if guards.is_undefined(answer_expr):
        return Verdict(False, "mismatch: answer is undefined (division by zero)")
    if gold_expr == answer_expr:  # structurally identical: no need to simplify
        return Verdict(True, "math_match")
    try:
        equal = verify(gold_expr, answer_expr, timeout_seconds=None)
        if equal and not _same_cardinality(gold_expr, answer_expr):
            return Verdict(False, "mismatch: different number of elements than the gold set")
        if equal and not _numbers_close(gold_expr, answer_expr):
            return Verdict(False, "mismatch: numbers differ beyond relative tolerance")
    except Exception as error:  # sympy can raise almost anything on adversarial input
        return Verdict(False, f"error: {type(error).__name__}")
    return Verdict(bool(equal), "math_match" if equal else "mismatch")
