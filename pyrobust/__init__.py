"""pyrobust: how robust is an image classifier to random sparse (L0) noise?

Implements the protocol of "Robustness as Inherent Property of Datapoints" (Ilie, Popescu, Stefanescu, 2020) for
ONNX models run by onnxruntime on the CPU.
"""

from pyrobust.datasets import Dataset, from_arrays, load_dataset
from pyrobust.errors import DataError, InvalidInput, ModelError, OutputError, PyRobustError
from pyrobust.evaluation import Evaluation, NonFiniteOutputWarning, evaluate
from pyrobust.replay import replay
from pyrobust.results import load_results
from pyrobust.types import NONFINITE, ROBUST, NoiseSpec, Outcome

__version__ = "0.1.0"

__all__ = [
    "NONFINITE",
    "ROBUST",
    "DataError",
    "Dataset",
    "Evaluation",
    "InvalidInput",
    "ModelError",
    "NoiseSpec",
    "NonFiniteOutputWarning",
    "Outcome",
    "OutputError",
    "PyRobustError",
    "evaluate",
    "from_arrays",
    "load_dataset",
    "load_results",
    "replay",
]
