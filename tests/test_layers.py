"""The layers the README lists are the folder list, and imports only ever point down them:

perturbcore (kernels) <- core (errors, types, stats, sequential) <- data and files (datasets, fetch, store/) <-
engine/ <- the commands (evaluation, gate, reproduce, replay, selection, training, compare, report, study_report,
cli). Function-level imports count too: a lazy import is still a dependency. Only ``__version__`` may be taken from
the package face."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = {"errors", "escape", "types", "stats", "sequential"}
DATA = {"datasets", "fetch", "images", "store"}


def _layer(module: str) -> int:
    parts = module.split(".")
    if parts[0] == "perturbcore":
        return 0
    if len(parts) == 1:  # the package face (lazy re-exports) stands above everything
        return 5
    if parts[1] in CORE:
        return 1
    if parts[1] in DATA:
        return 2
    if parts[1] == "engine":
        return 3
    return 4


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in ("pyrobust", "perturbcore"):
        for p in (ROOT / pkg).rglob("*.py"):
            name = ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            out[name] = p
    return out


def _arrows(mods: dict[str, Path]) -> set[tuple[str, str]]:
    edges = set()
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module == "pyrobust" and [a.name for a in node.names] == ["__version__"]:
                    continue
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            edges |= {(name, t) for t in targets if t in mods and t != name}
    return edges


def test_imports_point_down_the_layers():
    mods = _modules()
    upward = sorted(f"{a} -> {b}" for a, b in _arrows(mods)
                    if _layer(b) > _layer(a) and a not in ("pyrobust.__main__",))
    assert not upward, "imports that point up the layers:\n" + "\n".join(upward)


def test_the_kernels_never_import_the_package():
    mods = _modules()
    assert not [e for e in _arrows(mods) if e[0].startswith("perturbcore") and e[1].startswith("pyrobust")]


def test_the_readme_lists_the_folders():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Layout of the code"):]
    for folder in ("perturbcore/", "pyrobust/engine/", "pyrobust/store/"):
        assert f"`{folder}`" in section
    for path in sorted((ROOT / "pyrobust").rglob("*.py")):
        if path.name != "__init__.py" and path.name != "__main__.py":
            assert f"`{path.name}`" in section, f"{path.relative_to(ROOT)} is missing from the README's layout"


def test_every_package_folder_is_installed():
    """``pip install .`` (not editable) ships only the packages pyproject.toml lists: each folder must be there."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for pkg in ("pyrobust", "perturbcore")
             for p in (ROOT / pkg).rglob("__init__.py")}
    assert found <= listed, f"missing from [tool.setuptools] packages: {sorted(found - listed)}"
