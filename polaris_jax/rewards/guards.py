"""Cheap checks on parsed answers that keep sympy away from work it cannot finish.

`verify` evaluates what it is given: `9^{9^{9^{9}}}` or `(10^{10})!` would run until the
process is killed. The pool's timeout is the last line of defence; these bounds reject such
answers in microseconds, so a hostile batch costs nothing and never trips the timeout.
"""

from __future__ import annotations

import math

import sympy
from sympy.matrices import MatrixBase

MAX_NODES = 2_000
# An exact integer of 10^5 digits is cheap for sympy; 10^6 digits and up is where
# multiplication, printing and simplify start to take seconds.
MAX_DIGITS = 100_000
# log10 of the largest exponent or factorial argument we agree to evaluate.
MAX_EXPONENT_DIGITS = 6

_UNBOUNDED = math.inf


def _children(expr) -> tuple:
    if isinstance(expr, MatrixBase):
        return tuple(expr)
    if isinstance(expr, sympy.Basic):
        return expr.args
    return ()


def count_nodes(expr, limit: int = MAX_NODES) -> int:
    """Number of nodes in the expression tree, counting stops just past `limit`."""
    stack = [expr]
    seen = 0
    while stack and seen <= limit:
        node = stack.pop()
        seen += 1
        stack.extend(_children(node))
    return seen


def _integer_digits(value: int) -> float:
    value = abs(value)
    return 1.0 if value < 10 else value.bit_length() * math.log10(2) + 1


def digits_bound(expr) -> float:
    """An upper bound on the decimal digits of the number `expr` would evaluate to.

    Symbols count as one digit: the concern is the numeric work sympy does, not the value
    a variable might take. Returns inf for power towers and huge factorials.
    """
    if isinstance(expr, MatrixBase) or not isinstance(expr, sympy.Basic):
        return max((digits_bound(child) for child in _children(expr)), default=1.0)
    if expr.is_Integer:
        return _integer_digits(int(expr))
    if expr.is_Rational:
        return max(_integer_digits(int(expr.p)), _integer_digits(int(expr.q)))
    if expr.is_Float:
        _, _, exponent, bit_count = expr._mpf_
        return 1.0 + abs(exponent + bit_count) * math.log10(2)
    if expr.is_Atom:
        return 1.0
    if isinstance(expr, sympy.Pow):
        return _pow_digits(expr.base, expr.exp)
    if isinstance(expr, (sympy.factorial, sympy.factorial2, sympy.subfactorial, sympy.gamma)):
        return _factorial_digits(expr.args[0])
    if isinstance(expr, sympy.Mul):
        return sum(digits_bound(arg) for arg in expr.args)
    return max((digits_bound(arg) for arg in expr.args), default=1.0) + 1.0


def _magnitude(expr) -> float | None:
    """|value| of a small numeric expression, or None when it is symbolic or too big."""
    if not isinstance(expr, sympy.Basic) or expr.free_symbols:
        return None
    if digits_bound(expr) > MAX_EXPONENT_DIGITS:
        return None
    try:
        return abs(complex(expr.evalf(15)))
    except (TypeError, ValueError, ArithmeticError):
        return None


def _pow_digits(base, exp) -> float:
    if isinstance(base, sympy.Basic) and base.is_number and base in (0, 1, -1):
        return 1.0
    if isinstance(exp, sympy.Basic) and exp.free_symbols:
        # A symbolic exponent stays unevaluated; only its own size matters.
        exp_digits = digits_bound(exp)
        return _UNBOUNDED if exp_digits > MAX_EXPONENT_DIGITS else digits_bound(base) + exp_digits
    exponent = _magnitude(exp)
    if exponent is None:
        return _UNBOUNDED
    base_size = _magnitude(base)
    if base_size is not None and base_size > 0:
        return 1.0 + abs(math.log10(base_size)) * max(exponent, 1.0)
    # Symbolic base: expanding (x + 1)^n costs about n times the size of the base.
    return digits_bound(base) * max(exponent, 1.0)


def _factorial_digits(arg) -> float:
    n = _magnitude(arg)
    if n is None:
        return 1.0 if isinstance(arg, sympy.Basic) and arg.free_symbols and digits_bound(arg) <= 3 else _UNBOUNDED
    return 1.0 + n * math.log10(max(n, 2.0))


def too_costly(expr) -> str | None:
    """Why evaluating `expr` is refused, or None when it is safe to hand to sympy."""
    if count_nodes(expr) > MAX_NODES:
        return f"more than {MAX_NODES} expression nodes"
    try:
        digits = digits_bound(expr)
    except RecursionError:
        return "expression nested too deeply"
    if digits > MAX_DIGITS:
        return f"value may exceed {MAX_DIGITS} digits (power tower or huge factorial)"
    return None


def is_undefined(expr) -> bool:
    """True when the expression contains complex infinity or NaN (e.g. a division by zero)."""
    if isinstance(expr, MatrixBase):
        return any(is_undefined(entry) for entry in expr)
    if not isinstance(expr, sympy.Basic):
        return False
    return expr.has(sympy.zoo) or expr.has(sympy.nan)
