"""The folders are the layers, imports only ever point down them, and no two modules import each other, even
through others:

0. ``perturbcore/`` (the kernels)
1. the core, at the top of ``pyrobust/``: errors, escape, types, stats, sequential, files, machine, validate
2. ``data/`` (the dataset type, the readers, the dispatcher, downloads)
3. ``engine/`` and ``store/``, siblings that never import each other
4. the single-run commands at the top of ``pyrobust/`` (evaluation, replay, report, compare, agreement, training)
   and ``gate/``
5. ``study/`` (the paper's whole study, the multi-seed study, the selection of robust images, its report)
6. ``cli.py``
7. the package face (``pyrobust/__init__.py``, lazy names) and ``__main__.py``

Function-level imports count too: a lazy import is still a dependency. Only ``__version__`` may be taken from the
package face. A module at the top of ``pyrobust/`` that is none of the core, the commands or ``cli`` fails the test.
"""

from __future__ import annotations

import ast
import functools
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = {"errors", "escape", "types", "stats", "sequential", "files", "machine", "validate"}
COMMANDS = {"evaluation", "replay", "report", "compare", "agreement", "training", "profiles", "severity"}
FOLDERS = {"data": 2, "engine": 3, "store": 3, "gate": 4, "study": 5}
SIBLINGS = {"engine", "store"}


def layer(module: str) -> int:
    parts = module.split(".")
    if parts[0] == "perturbcore":
        return 0
    if len(parts) == 1 or parts[1] == "__main__":
        return 7
    top = parts[1]
    if len(parts) >= 2 and top in FOLDERS:
        return FOLDERS[top]
    if top in CORE:
        return 1
    if top in COMMANDS:
        return 4
    if top == "cli":
        return 6
    raise AssertionError(f"{module}: a module at the top of pyrobust/ must be core ({', '.join(sorted(CORE))}), a "
                         f"single-run command ({', '.join(sorted(COMMANDS))}) or cli; put it in its layer's folder")


@functools.cache
def modules(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for pkg in ("pyrobust", "perturbcore"):
        for p in (root / pkg).rglob("*.py"):
            name = ".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
            out[name] = p
    return out


def arrows(mods: dict[str, Path]) -> set[tuple[str, str]]:
    """(importer, imported) for every import of a module of ours, at any depth of the file."""
    return set(_arrows(tuple(sorted(mods.items()))))


@functools.cache
def _arrows(items: tuple[tuple[str, Path], ...]) -> frozenset[tuple[str, str]]:
    mods = dict(items)
    edges = set()
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module == "pyrobust" and [a.name for a in node.names] == ["__version__"]:
                    continue
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                           for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            edges |= {(name, t) for t in targets if t in mods and t != name}
    return frozenset(edges)


def cycles(edges: set[tuple[str, str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    graph: dict[str, list[str]] = {}
    for a, b in edges:
        graph.setdefault(a, []).append(b)
        graph.setdefault(b, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_layer():
    for name in modules():
        layer(name)


def test_imports_point_down_the_layers():
    upward = sorted(f"{a} -> {b}" for a, b in arrows(modules()) if layer(b) > layer(a))
    assert not upward, "imports that point up the layers:\n" + "\n".join(upward)


def test_the_engine_and_the_store_never_import_each_other():
    across = sorted(f"{a} -> {b}" for a, b in arrows(modules())
                    if a.split(".")[1:2] != b.split(".")[1:2]
                    and {a.split(".")[1:2][0] if "." in a else "", b.split(".")[1:2][0] if "." in b else ""}
                    == SIBLINGS)
    assert not across, "imports between the siblings engine/ and store/:\n" + "\n".join(across)


def test_no_import_circles():
    found = cycles(arrows(modules()))
    assert not found, "modules that import each other (through others too):\n" + "\n".join(map(" <-> ".join, found))


def test_the_layer_checks_can_fail(tmp_path):
    """The checks see a circle, an upward arrow and a stray top-level module in a planted tree."""
    for pkg, files in {"perturbcore": {"__init__": ""},
                       "pyrobust": {"__init__": "", "errors": "import pyrobust.evaluation\n",
                                    "evaluation": "from pyrobust.errors import x\n", "stray": ""}}.items():
        (tmp_path / pkg).mkdir()
        for f, text in files.items():
            (tmp_path / pkg / f"{f}.py").write_text(text)
    mods = modules(tmp_path)
    edges = arrows(mods)
    assert cycles(edges) == [["pyrobust.errors", "pyrobust.evaluation"]]
    assert layer("pyrobust.evaluation") > layer("pyrobust.errors")
    with pytest.raises(AssertionError, match="stray: a module at the top"):
        layer("pyrobust.stray")


def test_the_kernels_never_import_the_package():
    assert not [e for e in arrows(modules()) if e[0].startswith("perturbcore") and e[1].startswith("pyrobust")]


def test_the_readme_lists_the_folders():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Layout of the code"):]
    for folder in ("perturbcore/", *(f"pyrobust/{f}/" for f in FOLDERS)):
        assert f"`{folder}`" in section, f"{folder} is missing from the README's layout"
    for path in sorted((ROOT / "pyrobust").rglob("*.py")):
        if path.name != "__init__.py" and path.name != "__main__.py":
            assert f"`{path.name}`" in section, f"{path.relative_to(ROOT)} is missing from the README's layout"


def test_every_package_folder_is_installed():
    """``pip install .`` (not editable) ships only the packages pyproject.toml lists: each folder must be there."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for pkg in ("pyrobust", "perturbcore")
             for p in (ROOT / pkg).rglob("__init__.py")}
    assert found <= listed, f"missing from [tool.setuptools] packages: {sorted(found - listed)}"
