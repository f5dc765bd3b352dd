"""Train the paper's kind of small classifiers with torch and export them to ONNX (``pyrobust[train]``).

torch is imported only here, so evaluating and gating ONNX models never needs it.

Architectures:

* ``cnn``: a simple CNN of the kind the paper evaluates on MNIST: conv 3x3 (32) - ReLU - max-pool 2 - conv 3x3 (64)
  - ReLU - max-pool 2 - dense 128 - ReLU - dense (classes). The paper does not publish its exact network; this is
  the common two-convolution MNIST baseline.
* ``mlp``: flatten - dense 256 - ReLU - dense (classes).

The exported model takes float images ``N×C×H×W`` in [0, 1] (batch axis dynamic) and returns ``N×classes`` logits.
"""

from __future__ import annotations

import hashlib
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pyrobust.data.dataset import Dataset
from pyrobust.engine.loop import clean_predictions
from pyrobust.engine.runtime import OnnxModel
from pyrobust.errors import InvalidInput, MissingDependency, ModelError
from pyrobust.files import atomic_path, file_sha256
from pyrobust.types import NoiseSpec
from pyrobust.validate import Choice, Constraint, Integer, Number, check, declare

ARCHITECTURES = ("cnn", "mlp")


def _torch():
    try:
        import torch
    except ImportError:
        raise MissingDependency("training needs torch: pip install torch==2.13.0 'pyrobust[train]' "
                                "(install the pinned CPU build of torch first)") from None
    return torch


def build_model(architecture: str, image_shape: tuple[int, int, int], n_classes: int):
    """A fresh torch module for images (H, W, C)."""
    torch = _torch()
    nn = torch.nn
    h, w, c = image_shape
    if architecture == "cnn":
        if h < 10 or w < 10:
            raise InvalidInput(f"the cnn needs images of at least 10x10; got {h}x{w} (use --arch mlp)")
        fh, fw = ((h - 2) // 2 - 2) // 2, ((w - 2) // 2 - 2) // 2
        return nn.Sequential(
            nn.Conv2d(c, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * fh * fw, 128), nn.ReLU(), nn.Linear(128, n_classes),
        )
    if architecture == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(h * w * c, 256), nn.ReLU(), nn.Linear(256, n_classes))
    raise InvalidInput(f"architecture must be one of {', '.join(ARCHITECTURES)}; got {architecture!r}")


@dataclass(frozen=True)
class TrainReport:
    out: Path
    architecture: str
    epochs: int
    seed: int
    train_images: int
    train_accuracy: float
    losses: tuple[float, ...]
    parity_max_abs_diff: float
    seconds: float
    sha256: str
    test_accuracy: float | None = None  # clean accuracy of the exported model on ``test`` (onnxruntime)
    test_images: int | None = None


def _nchw(ds: Dataset, lo: int = 0, hi: int | None = None, mean=None, std=None) -> np.ndarray:
    x = ds.float_images(lo, hi)
    if mean is not None:
        x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)


def expectation_metadata(spec) -> dict:
    """ONNX metadata saying what input the model expects (pixel range, normalisation), which pyrobust reads back
    when it evaluates the model, so the options need not be repeated (and a mismatch is caught)."""
    meta = {"pyrobust.pixel_range": "0,255" if spec.pixel_range == 255 else "0,1"}
    if spec.mean is not None:
        meta["pyrobust.mean"] = ",".join(repr(float(v)) for v in spec.mean)
        meta["pyrobust.std"] = ",".join(repr(float(v)) for v in spec.std)
    return meta


TRAIN_CONSTRAINTS: dict[str, Constraint] = {
    "architecture": Choice(ARCHITECTURES),
    "epochs": Integer(1),
    "batch_size": Integer(1),
    "updates": Integer(1, none=True),
    "learning_rate": Number(0, lo_open=True),
}


def check_training(**settings) -> None:
    """The training settings :func:`train` takes, checked before torch is imported."""
    for name, value in settings.items():
        check(name, value, TRAIN_CONSTRAINTS[name])


declare("train", TRAIN_CONSTRAINTS, check_training)


def train(
    dataset: Dataset,
    *,
    out: str | os.PathLike,
    architecture: str = "cnn",
    epochs: int = 5,
    batch_size: int = 128,
    learning_rate: float = 1e-3,
    seed: int = 0,
    threads: int | None = None,
    n_classes: int | None = None,
    test: Dataset | None = None,
    mean=None,
    std=None,
    init_from: str | os.PathLike | None = None,
    updates: int | None = None,
    log=None,
) -> TrainReport:
    """Train ``architecture`` on ``dataset`` with Adam, export to ONNX at ``out`` and check torch and onnxruntime
    agree on a sample; with ``test``, also measure the exported model's clean accuracy on it. ``mean``/``std``
    (one value per channel) normalise the [0, 1] images; the model's metadata records them (and the pixel range), and
    ``evaluate`` applies them without being told. ``init_from``: start from the weights of that ONNX model (made by
    ``pyrobust train`` with the same architecture and classes: fine-tuning) instead of a fresh initialisation.
    ``updates``: train for exactly this many Adam steps (the shuffled epochs repeat as needed) instead of
    ``epochs`` passes, e.g. as many updates as the model being compared with. The same seed, data and settings give
    the same weights (with the same thread count and torch version)."""
    check_training(architecture=architecture, epochs=epochs, batch_size=batch_size, updates=updates,
                   learning_rate=learning_rate)
    out = _checked_out(out)
    torch = _torch()
    k = n_classes or dataset.n_classes
    norm = NoiseSpec(mean=None if mean is None else tuple(np.atleast_1d(mean)),
                     std=None if std is None else tuple(np.atleast_1d(std)), pixel_range=1)
    t0 = time.perf_counter()
    with _deterministic(torch, threads):
        torch.manual_seed(seed)  # the initialisation draws from torch's global generator: seeded first
        model = build_model(architecture, dataset.image_shape, k)
        if init_from is not None:
            load_weights(model, init_from)
        x_all = torch.from_numpy(_nchw(dataset, mean=norm.mean, std=norm.std))
        y_all = torch.from_numpy(dataset.labels)
        fit = _fit(torch, model, x_all, y_all, batch_size=batch_size, learning_rate=learning_rate, seed=seed,
                   epochs=epochs, updates=updates, log=log)
        train_acc = _accuracy(torch, model, x_all, y_all)
        export_onnx(model, dataset.image_shape, out, metadata={
            "pyrobust.architecture": architecture, "pyrobust.dataset": dataset.spec,
            "pyrobust.dataset_sha256": dataset.sha256, "pyrobust.seed": str(seed), "pyrobust.epochs": str(fit.epochs),
            "pyrobust.classes": str(k), "pyrobust.batch_size": str(batch_size),
            "pyrobust.learning_rate": repr(float(learning_rate)), "pyrobust.train_images": str(dataset.n),
            "pyrobust.updates": str(fit.updates),
            **({"pyrobust.init_from_sha256": file_sha256(init_from)} if init_from is not None else {}),
            # What else decides the weights: the same seed, data and settings give the same bytes only with the same
            # thread count and torch version (reductions split across threads round differently).
            "pyrobust.torch_version": torch.__version__, "pyrobust.threads": str(torch.get_num_threads()),
            "pyrobust.deterministic": "torch.use_deterministic_algorithms(True)",
            **expectation_metadata(norm),
        })
        diff = check_parity(model, out, _nchw(dataset, 0, min(dataset.n, 256), mean=norm.mean, std=norm.std))
    test_acc = None
    if test is not None:
        test_acc = float((clean_predictions(OnnxModel(out, threads=threads), test, NoiseSpec()) == test.labels).mean())
    return TrainReport(out=out, architecture=architecture, epochs=fit.epochs, seed=seed, train_images=dataset.n,
                       train_accuracy=train_acc, losses=fit.losses, parity_max_abs_diff=diff,
                       seconds=time.perf_counter() - t0, sha256=hashlib.sha256(out.read_bytes()).hexdigest(),
                       test_accuracy=test_acc, test_images=None if test is None else test.n)


def _checked_out(out: str | os.PathLike) -> Path:
    path = Path(out)
    if path.suffix != ".onnx":
        raise InvalidInput(f"the model is written as ONNX: --out must end in .onnx; got {path}")
    if not path.parent.is_dir():
        raise InvalidInput(f"{path.parent}: folder does not exist; create it or choose another --out")
    return path


@contextmanager
def _deterministic(torch, threads: int | None):
    """torch with ``threads`` threads and deterministic algorithms inside; as it was outside."""
    previous_threads = torch.get_num_threads()
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads or previous_threads)
    try:
        torch.use_deterministic_algorithms(True)
        yield
    finally:
        torch.set_num_threads(previous_threads)
        torch.use_deterministic_algorithms(previous_deterministic)


@dataclass(frozen=True)
class _Fit:
    losses: tuple[float, ...]  # mean training loss of each epoch
    epochs: int
    updates: int  # Adam steps taken


def _fit(torch, model, x_all, y_all, *, batch_size: int, learning_rate: float, seed: int, epochs: int,
         updates: int | None, log) -> _Fit:
    """Adam on shuffled mini-batches (the shuffle seeded apart from the initialisation): ``epochs`` passes, or
    exactly ``updates`` steps with the passes repeated as needed."""
    n = int(y_all.shape[0])
    opt = torch.optim.Adam(model.parameters(), lr=learning_rate)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    per_epoch = -(-n // batch_size)
    n_epochs = int(epochs) if updates is None else -(-int(updates) // per_epoch)
    steps = 0
    for epoch in range(n_epochs):
        order = torch.randperm(n, generator=gen)
        total, seen = 0.0, 0
        for lo in range(0, n, batch_size):
            if updates is not None and steps >= updates:
                break
            steps += 1
            idx = order[lo: lo + batch_size]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x_all[idx]), y_all[idx])
            loss.backward()
            opt.step()
            total += float(loss.detach()) * idx.numel()
            seen += idx.numel()
        losses.append(total / seen)
        if log:
            log(f"epoch {epoch + 1}/{n_epochs}: loss {losses[-1]:.4f}")
    model.eval()
    return _Fit(tuple(losses), n_epochs, steps)


def _accuracy(torch, model, x_all, y_all) -> float:
    with torch.no_grad():
        preds = torch.cat([model(x_all[lo: lo + 1024]).argmax(1) for lo in range(0, int(y_all.shape[0]), 1024)])
    return float((preds == y_all).double().mean())


def _with_image_input(torch, module):
    """Wrap ``module`` so the exported graph's input is called ``image``."""

    class Classifier(torch.nn.Module):  # type: ignore[name-defined]  # torch is a parameter: imported on demand
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, image):
            return self.net(image)

    return Classifier(module).eval()


def export_onnx(module, image_shape: tuple[int, int, int], out: Path, *, metadata: dict | None = None) -> None:
    """Export ``module`` (taking N×C×H×W) to ``out`` with a dynamic batch axis, atomically."""
    import logging

    import onnx

    torch = _torch()
    h, w, c = image_shape
    wrapped = _with_image_input(torch, module)
    example = (torch.zeros(2, c, h, w),)
    with atomic_path(out) as tmp, warnings.catch_warnings():
        # The exporter's own chatter (deprecations in torch internals, torchvision ops it skips): nothing a user
        # can act on.
        warnings.simplefilter("ignore")
        registration = logging.getLogger("torch.onnx._internal.exporter._registration")
        level = registration.level
        registration.setLevel(logging.ERROR)
        program = torch.onnx.export(
            wrapped, example, dynamo=True, input_names=["image"], output_names=["logits"],
            dynamic_shapes={"image": {0: torch.export.Dim("batch", min=1)}}, external_data=False, verbose=False,
        )
        proto = program.model_proto
        for key, value in (metadata or {}).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save_model(proto, str(tmp))
        registration.setLevel(level)


def check_parity(module, path: Path, sample_nchw: np.ndarray, *, atol: float = 1e-4) -> float:
    """Max absolute difference between torch and onnxruntime logits on ``sample_nchw``; ModelError beyond ``atol``
    or if any prediction differs."""
    import onnxruntime as ort

    torch = _torch()
    with torch.no_grad():
        expected = module(torch.from_numpy(sample_nchw)).numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: sample_nchw})[0]
    diff = float(np.max(np.abs(expected - got)))
    scale = max(1.0, float(np.max(np.abs(expected))))
    if diff > atol * scale or not np.array_equal(expected.argmax(1), got.argmax(1)):
        raise ModelError(f"{path}: torch and onnxruntime disagree (max |diff| {diff:.3g}); the export is not faithful")
    return diff


def training_settings(model_path: str | os.PathLike) -> dict:
    """The settings a model was trained with, from the ONNX metadata ``pyrobust train`` writes."""
    import onnx

    try:
        proto = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:
        raise ModelError(f"{model_path}: cannot read the model ({type(exc).__name__})") from None
    meta = {p.key.removeprefix("pyrobust."): p.value for p in proto.metadata_props if p.key.startswith("pyrobust.")}
    needed = ("architecture", "epochs", "seed", "classes")
    if not all(k in meta for k in needed):
        raise ModelError(f"{model_path}: has no pyrobust training metadata; retrain needs a model made by "
                         "pyrobust train (or give --arch, --epochs and --seed to pyrobust train instead)")
    settings = {"architecture": meta["architecture"], "epochs": int(meta["epochs"]), "seed": int(meta["seed"]),
                "n_classes": int(meta["classes"]), "batch_size": int(meta.get("batch_size", 128)),
                "learning_rate": float(meta.get("learning_rate", 1e-3))}
    if meta.get("mean") and meta.get("std"):  # the same normalisation as the model it is like
        settings["mean"] = tuple(float(v) for v in meta["mean"].split(","))
        settings["std"] = tuple(float(v) for v in meta["std"].split(","))
    return settings


def retrain(dataset: Dataset, *, like: str | os.PathLike, out: str | os.PathLike, threads: int | None = None,
            finetune: bool = False, same_updates: bool = False, log=None, **overrides) -> TrainReport:
    """Train the architecture of ``like`` with its recorded settings (``overrides`` replace some) on ``dataset``.
    ``finetune``: start from ``like``'s weights instead of a fresh initialisation. ``same_updates``: as many Adam
    steps as ``like`` took (its epochs over its own, larger, training set), not as many epochs."""
    settings = {**training_settings(like), **{k: v for k, v in overrides.items() if v is not None}}
    if same_updates:
        settings["updates"] = training_updates(like)
    if finetune:
        settings["init_from"] = like
    return train(dataset, out=out, threads=threads, log=log, **settings)


def training_updates(model_path: str | os.PathLike) -> int:
    """The Adam steps a model made by ``pyrobust train`` took (recorded, or from its epochs, images and batch)."""
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(model_path), load_external_data=False).metadata_props}
    try:
        if "pyrobust.updates" in meta:
            return int(meta["pyrobust.updates"])
        return int(meta["pyrobust.epochs"]) * -(-int(meta["pyrobust.train_images"]) // int(meta["pyrobust.batch_size"]))
    except (KeyError, ValueError):
        raise ModelError(f"{model_path}: its metadata does not say how many updates it was trained with; "
                         "same_updates needs a model made by pyrobust train") from None


def load_weights(module, path: str | os.PathLike) -> None:
    """Copy the weights of the ONNX model at ``path`` (exported by pyrobust, so its initializers are named
    ``net.<parameter>``) into ``module``; any missing, extra or differently shaped tensor is refused."""
    import onnx
    import torch
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    weights = {t.name.removeprefix("net."): numpy_helper.to_array(t) for t in proto.graph.initializer
               if t.name.startswith("net.")}
    state = module.state_dict()
    if set(weights) != set(state) or any(tuple(weights[k].shape) != tuple(v.shape) for k, v in state.items()):
        raise ModelError(f"{path}: its weights do not fit this architecture (fine-tuning needs a model made by "
                         "pyrobust train with the same --arch, image size and classes)")
    module.load_state_dict({k: torch.from_numpy(np.array(weights[k])) for k in state})
