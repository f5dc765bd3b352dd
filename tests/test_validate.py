"""The validators, and the bad-input tests derived from every declared constraint: each value a constraint names
as refused is refused by the record or function that declares it, with one line saying what the value must be."""

from __future__ import annotations

import importlib
import math
import pkgutil

import pytest

import pyrobust
from pyrobust.errors import InvalidInput
from pyrobust.validate import DECLARED, Choice, Fraction, Integer, Number, check


def _declared() -> list[tuple[str, str, object]]:
    for m in pkgutil.walk_packages(pyrobust.__path__, prefix="pyrobust."):
        if not m.name.endswith("__main__"):
            importlib.import_module(m.name)
    return [(owner, name, bad) for owner, (constraints, _) in sorted(DECLARED.items())
            for name, constraint in constraints.items() for bad in constraint.refused()]


CASES = _declared()


def test_the_records_and_functions_declare_their_constraints():
    assert {"NoiseSpec", "RunOptions", "GatePolicy", "StudyConfig", "select_robust", "train", "memory_budget",
            "check_threads"} <= set(DECLARED)


@pytest.mark.parametrize("owner,name,bad", CASES, ids=[f"{o}.{n}={b!r}" for o, n, b in CASES])
def test_each_refused_value_is_refused_with_one_line(owner, name, bad):
    _, build = DECLARED[owner]
    with pytest.raises(InvalidInput) as info:
        build(**{name: bad})
    message = str(info.value)
    assert "\n" not in message and " must be " in message and message.endswith(f"got {bad!r}"), message


def test_the_defaults_pass():
    for owner, (_, build) in DECLARED.items():
        if owner in ("memory_budget", "check_threads"):
            continue
        build()


@pytest.mark.parametrize("constraint,good,bad,says", [
    (Integer(1), [1, 10**9], [0, -1, 1.0, True, None, "1"], "an integer >= 1"),
    (Integer(1, 100_000, hint="(the paper uses 250)"), [1, 100_000], [100_001],
     "an integer in [1, 100,000] (the paper"),
    (Integer(1, words=("auto",)), ["auto", 3], ["Auto", 0], "an integer >= 1 or auto"),
    (Integer(0, 2**64 - 1), [0, 2**64 - 1], [2**64], "an integer in [0, 2**64 - 1]"),
    (Integer(1, none=True), [None, 1], [0], "an integer >= 1"),
    (Number(0, lo_open=True, unit="seconds"), [0.1, 5], [0, -1, math.nan, math.inf, "5"], "a number of seconds > 0"),
    (Number(0.5, 1, hi_open=True), [0.5, 0.99], [1, 0.4], "a number in [0.5, 1)"),
    (Fraction(none=True), [0, 1, 0.5, None], [1.01, -0.1], "a fraction in [0, 1]"),
    (Choice(("a", "b")), ["a"], ["c", None, 1], "one of a, b"),
    (Choice((1, 255), none=True), [1, 255, None, 255.0], ["255", 2], "one of 1, 255"),
])
def test_constraints(constraint, good, bad, says):
    for v in good:
        assert check("x", v, constraint) == v
    for v in bad:
        with pytest.raises(InvalidInput, match=rf"^x must be {re_escape(says)}.*; got "):
            check("x", v, constraint)


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


def test_numpy_integers_are_integers():
    import numpy as np

    assert check("n", np.int64(3), Integer(1)) == 3
    with pytest.raises(InvalidInput):
        check("n", np.float64(3.0), Integer(1))
