"""pyrobust: how robust is an image classifier to random sparse (L0) noise?

Implements the protocol of "Robustness as Inherent Property of Datapoints" (Ilie, Popescu, Stefanescu, 2020) for
ONNX models run by onnxruntime on the CPU.
"""

import importlib
import sys
import types

__version__ = "0.1.0"

# The package face is lazy: `import pyrobust` (and `pyrobust --help`) does not load numpy, numba, onnxruntime or
# matplotlib; each name below is imported from its module the first time it is used.
_LAZY = {
    "Dataset": "pyrobust.data.dataset", "from_arrays": "pyrobust.data.dataset",
    "bundled_sample": "pyrobust.data.load", "load_dataset": "pyrobust.data.load", "save_npz": "pyrobust.data.load",
    "DataError": "pyrobust.errors", "InvalidInput": "pyrobust.errors", "ModelError": "pyrobust.errors",
    "OutputError": "pyrobust.errors", "PyRobustError": "pyrobust.errors",
    "Evaluation": "pyrobust.evaluation", "NonFiniteOutputWarning": "pyrobust.evaluation",
    "evaluate": "pyrobust.evaluation",
    "load_results": "pyrobust.store.results",
    "Profile": "pyrobust.profiles", "profile": "pyrobust.profiles",
    "FailureSeverity": "pyrobust.severity", "failure_severity": "pyrobust.severity",
    "NONFINITE": "pyrobust.types", "ROBUST": "pyrobust.types", "NoiseSpec": "pyrobust.types",
    "Outcome": "pyrobust.types",
}
# Modules reachable as attributes of the package (``pyrobust.runtime.OnnxModel``): the short name and the module.
_SUBMODULES = {
    "data": "pyrobust.data", "datasets": "pyrobust.data.load", "errors": "pyrobust.errors",
    "evaluation": "pyrobust.evaluation", "fetch": "pyrobust.data.fetch", "gate": "pyrobust.gate",
    "results": "pyrobust.store.results", "runtime": "pyrobust.engine.runtime", "sequential": "pyrobust.sequential",
    "stats": "pyrobust.stats", "types": "pyrobust.types",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(_SUBMODULES[name])
    raise AttributeError(f"module 'pyrobust' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, *_SUBMODULES, "replay"})


__all__ = [
    "NONFINITE",
    "ROBUST",
    "DataError",
    "Dataset",
    "Evaluation",
    "FailureSeverity",
    "InvalidInput",
    "ModelError",
    "NoiseSpec",
    "NonFiniteOutputWarning",
    "Outcome",
    "OutputError",
    "Profile",
    "PyRobustError",
    "evaluate",
    "failure_severity",
    "from_arrays",
    "bundled_sample",
    "load_dataset",
    "load_results",
    "profile",
    "replay",
    "save_npz",
]


class _Package(types.ModuleType):
    """``pyrobust.replay`` is the function, though a submodule has the same name: importing the submodule binds it
    on the package, which this setter declines (``from pyrobust.replay import ...`` still finds the module)."""

    @property
    def replay(self):
        from pyrobust.replay import replay

        return replay

    @replay.setter
    def replay(self, value) -> None:
        pass


sys.modules[__name__].__class__ = _Package

