"""One validator per kind of value, declared next to the value it checks.

In the spirit of scikit-learn's declarative parameter constraints (``_param_validation``): a record or function
declares, per parameter, an :class:`Integer`, a :class:`Number` (``Fraction`` for shares) or a :class:`Choice`,
and :func:`check` (one value) or :func:`check_fields` (every declared field of a record) refuses a bad value with
pyrobust's one-line :class:`~pyrobust.errors.InvalidInput`, the remedy in the message::

    max_steps must be an integer in [1, 100,000] (the paper uses 250); got 0

Each constraint also names values it must refuse (:meth:`Integer.refused`), so the bad-input tests are derived from
the declarations (``tests/test_validate.py``): a constraint added here is tested without another line of test.
Core: imports only ``errors``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pyrobust.errors import InvalidInput


def _is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _fmt(v) -> str:
    if v == 2**64 - 1:
        return "2**64 - 1"
    if isinstance(v, int) and v >= 2**30 and v & (v - 1) == 0:
        return f"2**{v.bit_length() - 1}"
    if isinstance(v, int) and abs(v) >= 10_000:
        return f"{v:,}"
    return f"{v:g}" if isinstance(v, float) else str(v)


@dataclass(frozen=True)
class Integer:
    """An integer in [lo, hi] (either end open-ended when None); ``none``: None is allowed too; ``words``: strings
    allowed besides (``("auto",)``); ``hint``: the remedy, said after the range."""

    lo: int | None = None
    hi: int | None = None
    none: bool = False
    words: tuple[str, ...] = ()
    hint: str = ""

    def describe(self) -> str:
        if self.lo is not None and self.hi is not None:
            what = f"an integer in [{_fmt(self.lo)}, {_fmt(self.hi)}]"
        elif self.lo is not None:
            what = f"an integer >= {_fmt(self.lo)}"
        elif self.hi is not None:
            what = f"an integer <= {_fmt(self.hi)}"
        else:
            what = "an integer"
        return what + "".join(f" or {w}" for w in self.words)

    def accepts(self, value) -> bool:
        if value is None:
            return self.none
        if isinstance(value, str):
            return value in self.words
        return _is_integer(value) and (self.lo is None or value >= self.lo) and (self.hi is None or value <= self.hi)

    def refused(self) -> list:
        out: list = [1.5, True, "many"]
        if self.lo is not None:
            out.append(self.lo - 1)
        if self.hi is not None:
            out.append(self.hi + 1)
        if not self.none:
            out.append(None)
        return out


@dataclass(frozen=True)
class Number:
    """A finite real number between ``lo`` and ``hi`` (each end open or closed, None: no bound); ``unit`` is said
    with it ("seconds", "MiB"); ``none``: None is allowed too."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    unit: str = ""
    none: bool = False
    hint: str = ""
    kind: str = "a number"

    def describe(self) -> str:
        what = f"{self.kind} of {self.unit}" if self.unit else self.kind
        if self.lo is not None and self.hi is not None:
            return (f"{what} in {'(' if self.lo_open else '['}{_fmt(self.lo)}, {_fmt(self.hi)}"
                    f"{')' if self.hi_open else ']'}")
        if self.lo is not None:
            return f"{what} {'>' if self.lo_open else '>='} {_fmt(self.lo)}"
        if self.hi is not None:
            return f"{what} {'<' if self.hi_open else '<='} {_fmt(self.hi)}"
        return f"a finite {what.removeprefix('a ')}"

    def accepts(self, value) -> bool:
        if value is None:
            return self.none
        if not _is_number(value) or not math.isfinite(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return not (self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi))

    def refused(self) -> list:
        out: list = [math.nan, math.inf, True, "many"]
        if self.lo is not None:
            out.append(self.lo if self.lo_open else self.lo - 1)
        if self.hi is not None:
            out.append(self.hi if self.hi_open else self.hi + 1)
        if not self.none:
            out.append(None)
        return out


def Fraction(*, lo_open: bool = False, hi_open: bool = False, none: bool = False, hint: str = "") -> Number:  # noqa: N802
    """A share in [0, 1] (ends open as asked)."""
    return Number(0, 1, lo_open=lo_open, hi_open=hi_open, none=none, hint=hint, kind="a fraction")


@dataclass(frozen=True)
class Choice:
    """One of ``options`` (exactly: ``1`` is not ``"1"``); ``none``: None too."""

    options: tuple
    none: bool = False
    hint: str = ""

    def describe(self) -> str:
        return "one of " + ", ".join(str(o) for o in self.options)

    def accepts(self, value) -> bool:
        if value is None:
            return self.none
        if isinstance(value, str):
            return value in [o for o in self.options if isinstance(o, str)]
        return _is_number(value) and value in [o for o in self.options if _is_number(o)]

    def refused(self) -> list:
        out: list = ["not-an-option", 1.5]
        if not self.none:
            out.append(None)
        return out


Constraint = Integer | Number | Choice


def check(name: str, value, constraint: Constraint):
    """``value`` when ``constraint`` accepts it; else :class:`InvalidInput` saying what ``name`` must be, the
    remedy and what was given."""
    if constraint.accepts(value):
        return value
    hint = f" {constraint.hint}" if constraint.hint and not constraint.hint.startswith((",", ";")) else \
        constraint.hint
    raise InvalidInput(f"{name} must be {constraint.describe()}{hint}; got {value!r}")


def check_fields(record, constraints: dict[str, Constraint]) -> None:
    """Every field of ``record`` that ``constraints`` declares, in declaration order."""
    for name, constraint in constraints.items():
        check(name, getattr(record, name), constraint)


# What declares constraints, for the tests derived from them: owner -> (constraints, a call that builds or checks
# the owner with the given keyword values, raising InvalidInput for a bad one).
DECLARED: dict[str, tuple[dict[str, Constraint], Callable[..., Any]]] = {}


def declare(owner: str, constraints: dict[str, Constraint], build: Callable[..., Any]) -> dict[str, Constraint]:
    """Record ``owner``'s constraints and how to exercise them (``build(**{name: value})``); returns the
    constraints, so a module can keep them as a constant."""
    DECLARED[owner] = (constraints, build)
    return constraints
