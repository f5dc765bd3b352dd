"""``docs/notebook.ipynb`` runs: every code cell in order, in one namespace, from the repository's root (no
Jupyter needed); the values its text promises hold."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest
from matplotlib.figure import Figure

pytestmark = pytest.mark.slow  # subprocesses, clusters, exports or long runs: not in the fast tier

ROOT = Path(__file__).resolve().parents[1]


def test_example_notebook_runs(monkeypatch):
    nb = json.loads((ROOT / "docs" / "notebook.ipynb").read_text())
    assert nb["nbformat"] == 4
    monkeypatch.chdir(ROOT)
    ns: dict = {}
    figures = 0
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        assert not cell.get("outputs"), "commit the notebook without outputs"
        tree = ast.parse("".join(cell["source"]))
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        exec(compile(tree, "notebook", "exec"), ns)  # as Jupyter runs a cell: the statements,
        if last is not None:  # then the value of a final expression, which it displays
            value = eval(compile(ast.Expression(last.value), "notebook", "eval"), ns)
            figures += isinstance(value, Figure)
    ev = ns["ev"]
    assert ev.summary["metrics"]["images"] == 500 and 0.5 < ev.robust_fraction < 1
    assert ns["r"].matches and figures == 3
    assert os.getcwd() == str(ROOT)
