"""The package face: every lazy name and every submodule it names resolves, ``__all__`` is complete and ``dir()``
shows it all, and every module of the package imports on its own (no hidden order between them)."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
import types

import pytest

import pyrobust


def test_every_name_in_all_resolves():
    for name in pyrobust.__all__:
        assert getattr(pyrobust, name) is not None, name


def test_all_is_complete():
    public = {*pyrobust._LAZY, "replay"}
    assert set(pyrobust.__all__) == public
    assert sorted(pyrobust.__all__) == sorted(set(pyrobust.__all__))  # no name twice


@pytest.mark.parametrize("name", sorted(pyrobust._LAZY))
def test_each_lazy_name_comes_from_its_module(name):
    module = importlib.import_module(pyrobust._LAZY[name])
    assert getattr(pyrobust, name) is getattr(module, name)


@pytest.mark.parametrize("name", sorted(pyrobust._SUBMODULES))
def test_each_submodule_name_is_a_module(name):
    """``pyrobust.results`` and ``pyrobust.runtime`` once raised ModuleNotFoundError: each short name is a module."""
    value = getattr(pyrobust, name)
    assert isinstance(value, types.ModuleType) and value.__name__ == pyrobust._SUBMODULES[name]


def test_dir_shows_the_face_and_unknown_names_are_refused():
    shown = dir(pyrobust)
    assert set(pyrobust.__all__) <= set(shown) and set(pyrobust._SUBMODULES) <= set(shown)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        pyrobust.nope  # noqa: B018


def test_replay_is_the_function_even_after_its_module_is_imported():
    import pyrobust.replay as module  # noqa: F401

    assert callable(pyrobust.replay) and pyrobust.replay.__name__ == "replay"


def _all_modules() -> list[str]:
    found = []
    for pkg in (pyrobust, importlib.import_module("perturbcore")):
        found.append(pkg.__name__)
        found += [m.name for m in pkgutil.walk_packages(pkg.__path__, prefix=f"{pkg.__name__}.")]
    return sorted(found)


@pytest.mark.slow
def test_every_module_imports_on_its_own():
    """Each module imported first in a fresh interpreter: an import that works only after another module was
    loaded (a hidden circle) fails here."""
    code = "import importlib, sys\nimportlib.import_module(sys.argv[1])\n"
    names = [n for n in _all_modules() if not n.endswith("__main__")]
    failures = []
    for name in names:
        r = subprocess.run([sys.executable, "-c", code, name], capture_output=True, text=True, timeout=120)
        if r.returncode:
            failures.append(f"{name}: {r.stderr.strip().splitlines()[-1]}")
    assert len(names) > 40 and not failures, "\n".join(failures)

