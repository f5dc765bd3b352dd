"""``evaluate``: load a model and a dataset, run the protocol, write results and the report."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from pyrobust.datasets import Dataset, load_dataset
from pyrobust.engine import Progress, bind_model, check_spec_for_data, run_protocol
from pyrobust.errors import InvalidInput
from pyrobust.report import write_report
from pyrobust.results import build_summary, prepare_out_dir, write_results
from pyrobust.runtime import OnnxModel
from pyrobust.types import NoiseSpec, Outcome


class NonFiniteOutputWarning(UserWarning):
    """The model returned NaN or infinity for some inputs; those images count as failures with their own status."""


@dataclass(frozen=True)
class Evaluation:
    outcome: Outcome
    summary: dict
    out: Path | None


def evaluate(
    model: str | os.PathLike | OnnxModel,
    dataset: str | Dataset,
    *,
    pixels: int = 28,
    max_steps: int = 250,
    low: float = 0.0,
    high: float = 1.0,
    scheme: str = "uniform",
    mode: str = "restart",
    seed: int = 0,
    mean=None,
    std=None,
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    start: int | None = None,
    stop: int | None = None,
    batch_size: int = 256,
    threads: int | None = None,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    report: bool = True,
    progress: Progress | None = None,
) -> Evaluation:
    """Measure how robust ``model`` is to random L0 noise on ``dataset``.

    ``model`` is an ONNX file (or a loaded :class:`~pyrobust.runtime.OnnxModel`); ``dataset`` a spec such as
    ``"mnist:test"`` (see :func:`pyrobust.datasets.load_dataset`) or a :class:`~pyrobust.datasets.Dataset`.
    With ``out``, writes ``results.npz``, ``summary.json`` and (``report``) the four PNG figures there.
    Every input is checked before any work starts.
    """
    spec = NoiseSpec(pixels=pixels, max_steps=max_steps, low=low, high=high, scheme=scheme, mode=mode, seed=seed,
                     mean=tuple(mean) if mean is not None else None, std=tuple(std) if std is not None else None)
    if batch_size is None or isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise InvalidInput(f"batch_size must be an integer >= 1; got {batch_size!r}")
    if threads is not None and (int(threads) != threads or threads < 1):
        raise InvalidInput(f"threads must be an integer >= 1; got {threads!r}")
    if isinstance(dataset, Dataset):
        ds = dataset.select(start=start, stop=stop, limit=limit)
        ds_spec = ds.spec
    else:
        ds_spec = dataset
        ds = load_dataset(dataset, data_dir=data_dir, start=start, stop=stop, limit=limit)
    check_spec_for_data(spec, ds.image_shape)
    m = model if isinstance(model, OnnxModel) else OnnxModel(model, threads=threads)
    bind_model(m, ds, spec)  # every model and shape error surfaces before any output is touched
    out_dir = prepare_out_dir(out, overwrite=overwrite) if out is not None else None

    outcome = run_protocol(m, ds, spec, batch_size=int(batch_size), progress=progress)
    summary = build_summary(
        outcome, spec=spec, n_classes=max(ds.n_classes, 1),
        model={"path": str(Path(m.path).resolve()), "name": Path(m.path).stem, "sha256": m.sha256,
               "input": m.input.name, "input_shape": m.input_shape, "layout": m.binding.layout,
               "fixed_batch": m.binding.fixed_batch},
        dataset={"spec": ds_spec, "name": ds.name, "split": ds.split, "source": ds.source,
                 "data_dir": str(Path(data_dir).resolve()) if data_dir is not None else None,
                 "sha256": ds.sha256, "start": start, "stop": stop, "limit": limit,
                 "first_index": int(ds.index[0]), "last_index": int(ds.index[-1])},
        settings={"batch_size": int(batch_size), "threads": m.threads, "kernel_threads": 1,
                  "ort_spinning": m.spinning},
    )
    nonfinite = summary["metrics"]["nonfinite_outputs"]
    if nonfinite:
        warnings.warn(f"{nonfinite} image(s) got NaN or infinite model outputs; they count as failures with "
                      "label -2 (non-finite)", NonFiniteOutputWarning, stacklevel=2)
    if out_dir is not None:
        if report:
            write_report(out_dir, outcome, summary, ds)
        write_results(out_dir, outcome, summary)
    return Evaluation(outcome=outcome, summary=summary, out=out_dir)
