"""The package's exceptions. The CLI alone turns them into exit codes and one line on stderr.

Exit codes (stable, documented in the README): 0 success, 1 a gate or check failed, 2 usage error (bad options),
3 bad input (a model or data file that cannot be used), 4 internal error.
"""

from __future__ import annotations


class PyRobustError(Exception):
    """Base of every error pyrobust raises on purpose."""

    exit_code = 4


class InvalidInput(PyRobustError, ValueError):
    """An option or argument outside what is allowed (exit code 2)."""

    exit_code = 2


class ModelError(PyRobustError):
    """A model file that cannot be loaded, or that is not a usable image classifier for the data (exit code 3)."""

    exit_code = 3


class DataError(PyRobustError):
    """A data file or dataset that is missing, malformed or does not fit (exit code 3)."""

    exit_code = 3


class OutputError(PyRobustError):
    """An output folder that cannot be written, or holds another run's results (exit code 2)."""

    exit_code = 2


class MissingDependency(PyRobustError):
    """An optional extra (e.g. ``pyrobust[train]``) is needed for this command (exit code 2)."""

    exit_code = 2


class ClassCountMismatch(ModelError, DataError):
    """The labels need more classes than the model scores: a model error and a data error at once (exit code 3)."""

    exit_code = 3


class Interrupted(PyRobustError):
    """The run was stopped (Ctrl-C or SIGTERM) after saving its checkpoint (exit code 130)."""

    exit_code = 130


class ClusterError(PyRobustError):
    """A Dask scheduler that cannot be reached or used (exit code 3)."""

    exit_code = 3


class ResumeMismatch(InvalidInput):
    """``resume`` found a checkpoint or finished run of another model, data or settings (exit code 2)."""

    exit_code = 2


class NonFiniteModel(ModelError):
    """Every output of the model is NaN or infinite: nothing can be measured (exit code 3)."""

    exit_code = 3
