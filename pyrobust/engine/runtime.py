"""A loaded ONNX classifier: an onnxruntime session on the CPU with explicit providers and threads, and the
adapter from pyrobust's flat image buffers to whatever input layout the model declares.

Threads: numba's kernels and onnxruntime's intra-op pool run one after the other on the same cores. Spinning
onnxruntime workers (its default) keep burning those cores while numba runs, and numba's workers then fight them;
the session is therefore created with ``session.intra_op.allow_spinning = 0`` unless asked otherwise
(``benchmarks/test_bench_engine.py::test_thread_pools`` measures both settings)."""

from __future__ import annotations

import hashlib
import os
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from pyrobust.engine.modelfile import (
    MODEL_MAX_BYTES,
    check_external_data,
    external_files,
    first_line,
    inline_external,
    model_digest,
    random_operators,
    unknown_domains,
)
from pyrobust.engine.watchdog import register_run_options
from pyrobust.errors import ClassCountMismatch, ModelError
from pyrobust.escape import field
from pyrobust.files import read_bounded
from pyrobust.machine import check_threads

LAYOUTS = ("NCHW", "NHWC", "NHW", "NF")
_INPUT_DTYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
                 # integer pixels (deployment models often take uint8): fed whole numbers in 0..255
                 "tensor(uint8)": np.uint8, "tensor(uint16)": np.uint16, "tensor(int16)": np.int16,
                 "tensor(int32)": np.int32, "tensor(int64)": np.int64}


_FLOAT_TENSORS = ("tensor(float)", "tensor(double)", "tensor(float16)")
_INT_TENSORS = ("tensor(int64)", "tensor(int32)", "tensor(int16)", "tensor(int8)", "tensor(uint8)", "tensor(uint16)",
                "tensor(uint32)", "tensor(uint64)")


class LabelsDisagreeWarning(UserWarning):
    """The model's own label output does not match the argmax of the scores pyrobust uses."""


def _dim_ok(declared, actual: int) -> bool:
    return not isinstance(declared, int) or declared == actual


@dataclass(frozen=True)
class Binding:
    """How images of shape (H, W, C) feed this model."""

    layout: str  # one of LAYOUTS
    input_shape: tuple[int, ...]  # the shape of one image as the model wants it
    channels_first: bool  # flat buffers hold channel planes (only NCHW with C > 1)
    fixed_batch: int | None  # the model's batch size when it is not dynamic
    scores: int | None = None  # class scores per image, as the probe found: every later batch must give as many


def describe_shape(shape) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, int) else (d or "?") for d in shape) + "]"


class OnnxModel:
    """An ONNX image classifier run by onnxruntime on the CPU.

    The file (and its external-data files) is read **once**: those bytes are hashed, checked and given to
    onnxruntime, so what the record says ran is what ran, even if the file is swapped meanwhile. ``copy()`` opens
    more sessions from the same bytes."""

    sha256: str
    external_data: list[dict]
    _bytes: bytes

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None, spinning: bool = False,
                 custom_ops: str | os.PathLike | None = None, output: str | None = None,
                 _from: OnnxModel | None = None) -> None:
        import onnx

        self.path = Path(path)
        self.output_name = output
        self.custom_ops = custom_ops
        self.threads = check_threads(threads)
        self.spinning = spinning
        if _from is not None:
            self.sha256, self.external_data, self._bytes = _from.sha256, _from.external_data, _from._bytes
            self._start_session()
            return
        data = read_bounded(self.path, what="model file", max_bytes=MODEL_MAX_BYTES, error=ModelError,
                            hint=" (one ONNX file holds at most 2 GiB; keep larger weights as external data)")
        try:
            proto = onnx.load_model_from_string(data)
        except Exception as exc:  # protobuf raises DecodeError and friends, not a common base
            raise ModelError(f"{self.path}: not an ONNX model ({type(exc).__name__}); export one with "
                             "torch.onnx.export or pyrobust train") from None
        if not proto.graph.node and not proto.graph.output:
            raise ModelError(f"{self.path}: not an ONNX model (no graph); export one with torch.onnx.export")
        unknown = unknown_domains(proto)
        if unknown and custom_ops is None:
            raise ModelError(f"{self.path}: uses custom operator domain(s) {field(', '.join(unknown))}, which "
                             "onnxruntime does not implement; pyrobust loads a custom-op library only when you name it "
                             "(--custom-ops LIB)")
        randomness = random_operators(proto)
        if randomness:
            raise ModelError(f"{self.path}: the model draws random numbers ({field(', '.join(randomness))}), so the "
                             "same input can get another prediction each time and no result could be replayed; "
                             "export it in inference mode, without random operators")
        check_external_data(proto, self.path)
        external = external_files(proto, self.path)
        self.sha256 = model_digest(data, external)
        self.external_data = [{"location": loc, "sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}
                              for loc, blob in sorted(external.items())]
        if external:
            inline_external(proto, external)
            if proto.ByteSize() >= MODEL_MAX_BYTES:
                raise ModelError(f"{self.path}: the model with its external data is over 2 GiB, more than pyrobust "
                                 "loads")
            data = proto.SerializeToString()
        try:
            onnx.checker.check_model(proto)
        except Exception as exc:
            raise ModelError(f"{self.path}: invalid ONNX model ({first_line(exc)})") from None
        self._bytes = data
        self._start_session()

    @property
    def model_bytes(self) -> bytes:
        """The model as onnxruntime loaded it: the file's bytes, external data inlined (what the record's SHA-256
        vouches for, read once)."""
        return self._bytes

    def copy(self, *, threads: int | None = None) -> OnnxModel:
        """Another session of the same model bytes (for parallel sessions), not re-read from the file."""
        return OnnxModel(self.path, threads=threads, spinning=self.spinning, custom_ops=self.custom_ops,
                         output=self.output_name, _from=self)

    def _start_session(self) -> None:
        import onnxruntime as ort

        ort.set_default_logger_severity(4)  # errors reach the user as pyrobust's one line, not onnxruntime's log
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 4  # errors reach the user as pyrobust's one line, not onnxruntime's log
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")
        if self.custom_ops is not None:
            lib = Path(self.custom_ops)
            if not lib.is_file():
                raise ModelError(f"{lib}: custom-op library not found")
            try:
                opts.register_custom_ops_library(str(lib))
            except Exception as exc:
                raise ModelError(f"{lib}: onnxruntime cannot load this custom-op library ({first_line(exc)})") \
                    from None
        self._run_options = ort.RunOptions()
        self._run_options.log_severity_level = 4
        register_run_options(self._run_options)  # Ctrl-C, SIGTERM and --timeout can stop a run in flight
        try:
            self.session = ort.InferenceSession(self._bytes, sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ModelError(f"{self.path}: onnxruntime cannot load the model ({first_line(exc)})") from None
        self._describe()

    def _describe(self) -> None:
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            names = ", ".join(f"{i.name} {describe_shape(i.shape)}" for i in inputs)
            raise ModelError(f"{self.path}: the model has {len(inputs)} inputs ({names}); pyrobust needs exactly one "
                             "image input")
        self.input = inputs[0]
        if self.input.type not in _INPUT_DTYPES:
            raise ModelError(f"{self.path}: input '{self.input.name}' has type {self.input.type}; pyrobust feeds "
                             "float images (tensor(float), tensor(double), tensor(float16)) or integer pixels in "
                             "0..255 (tensor(uint8), tensor(int32), ...)")
        self.input_dtype = _INPUT_DTYPES[self.input.type]
        self.integer_input = self.input.type not in _FLOAT_TENSORS
        self.output, self.zipmap, self.label_output = choose_output(self.session.get_outputs(), self.output_name,
                                                                     str(self.path))
        self.label_agreement: float | None = None  # share of probe rows where the label output matches the argmax

    @property
    def expects(self) -> dict:
        """What the model's pyrobust metadata says it takes: ``pixel_range`` (1 or 255) and ``mean``/``std``
        (tuples), where stated (``pyrobust train`` and ``evaluate`` of a torch module write them)."""
        meta = self.session.get_modelmeta().custom_metadata_map
        out: dict = {}
        try:
            if meta.get("pyrobust.pixel_range") in ("0,1", "0,255"):
                out["pixel_range"] = 1 if meta["pyrobust.pixel_range"] == "0,1" else 255
            if meta.get("pyrobust.mean") and meta.get("pyrobust.std"):
                out["mean"] = tuple(float(v) for v in meta["pyrobust.mean"].split(","))
                out["std"] = tuple(float(v) for v in meta["pyrobust.std"].split(","))
        except ValueError:
            raise ModelError(f"{self.path}: malformed pyrobust metadata (pyrobust.mean / pyrobust.std must be "
                             "comma-separated numbers); fix or remove it") from None
        return out

    # ------------------------------------------------------------------------------------------------------ layout
    @property
    def input_shape(self) -> list:
        return [d if isinstance(d, int) and d > 0 else None for d in self.input.shape]

    def bind(self, image_shape: tuple[int, int, int], *, n_classes: int,
             probe: np.ndarray | None = None) -> BoundModel:
        """This model bound to images of ``image_shape`` (H, W, C): how they feed its input, checked by running
        ``probe`` (float32 images (m, H, W, C), default zeros) twice, which must give the same scores, at least
        ``n_classes`` of them per image. Only a :class:`BoundModel` runs images."""
        binding = self._binding_for(image_shape, n_classes)
        h, w, c = image_shape
        trial = BoundModel(self, binding)
        x = np.zeros((1, h, w, c), np.float32) if probe is None else probe[:1]
        if binding.fixed_batch is None:
            x = np.repeat(x, 2, axis=0)  # two rows, so an output that ignores the batch size shows here
        scores = trial.run(trial.to_flat(x))
        self.label_agreement = trial.check_label_output(trial.to_flat(x), scores)
        again = trial.run(trial.to_flat(x))
        if again.shape != scores.shape or not np.array_equal(again, scores, equal_nan=True):
            raise ModelError(f"{self.path}: the model gives other scores for the same input when run again (random "
                             "operators, or state kept between runs); its results could not be replayed or compared. "
                             "Export it in inference mode, without random operators")
        if scores.shape[1] < n_classes:
            raise ClassCountMismatch(f"{self.path}: the model outputs {scores.shape[1]} classes but the labels need "
                             f"{n_classes} (0..{n_classes - 1}); use a model trained on this dataset")
        return BoundModel(self, replace(binding, scores=int(scores.shape[1])))

    def _binding_for(self, image_shape: tuple[int, int, int], n_classes: int) -> Binding:
        """How images of ``image_shape`` feed the input, from the declared shapes alone."""
        h, w, c = image_shape
        dims = self.input_shape
        batch = dims[0] if dims else None
        rest = dims[1:]
        want = f"N×C×H×W, N×H×W×C, N×H×W or N×(H·W) for images of {h}×{w}×{c}"
        binding = None
        if len(dims) == 4:
            if all(_dim_ok(d, a) for d, a in zip(rest, (c, h, w), strict=True)):
                binding = Binding("NCHW", (c, h, w), c > 1, batch)
            elif all(_dim_ok(d, a) for d, a in zip(rest, (h, w, c), strict=True)):
                binding = Binding("NHWC", (h, w, c), False, batch)
        elif len(dims) == 3 and c == 1 and all(_dim_ok(d, a) for d, a in zip(rest, (h, w), strict=True)):
            binding = Binding("NHW", (h, w), False, batch)
        elif len(dims) == 2 and _dim_ok(rest[0], h * w * c):
            binding = Binding("NF", (h * w * c,), False, batch)
        if binding is None:
            raise ModelError(f"{self.path}: input '{self.input.name}' has shape {describe_shape(self.input.shape)}, "
                             f"which does not fit the data: pyrobust needs {want}")
        out_shape = None if self.zipmap else self.output.shape
        if out_shape and len(out_shape) != 2:
            raise ModelError(f"{self.path}: output '{self.output.name}' has shape {describe_shape(out_shape)}; "
                             "pyrobust needs N×classes scores (logits or probabilities)")
        if out_shape and isinstance(out_shape[1], int) and out_shape[1] < n_classes:
            raise ClassCountMismatch(f"{self.path}: the model outputs {out_shape[1]} classes but the labels need "
                             f"{n_classes} (0..{n_classes - 1}); use a model trained on this dataset")
        return binding


class BoundModel:
    """A loaded :class:`OnnxModel` bound to the data's image shape (:meth:`OnnxModel.bind`): the only kind of model
    that runs images. ``binding`` says how images feed the input and how many scores every batch must give; what
    the loaded model knows (``path``, ``sha256``, ``threads``, ``expects``, ...) is read through."""

    _SHARED = frozenset({"path", "sha256", "external_data", "model_bytes", "threads", "spinning", "custom_ops",
                         "output_name", "input", "output", "zipmap", "label_output", "input_dtype", "integer_input",
                         "expects", "input_shape", "session", "label_agreement"})

    def __init__(self, model: OnnxModel, binding: Binding) -> None:
        self.model = model
        self.binding = binding

    def __getattr__(self, name: str):
        if name in BoundModel._SHARED:
            return getattr(self.model, name)
        raise AttributeError(f"'BoundModel' object has no attribute {name!r}")

    def __repr__(self) -> str:
        return f"BoundModel({self.model.path}, {self.binding.layout} {list(self.binding.input_shape)})"

    def copy(self, *, threads: int | None = None) -> BoundModel:
        """Another session of the same model bytes with the same binding (for parallel sessions)."""
        return BoundModel(self.model.copy(threads=threads), self.binding)

    def _shaped(self, flat: np.ndarray) -> np.ndarray:
        x = flat.reshape((flat.shape[0], *self.binding.input_shape))
        if self.model.input_dtype is not np.float32:
            x = x.astype(self.model.input_dtype)  # integer inputs get whole numbers: the cast is exact
        return x

    def to_flat(self, images: np.ndarray) -> np.ndarray:
        """Images (m, H, W, C) float32 -> flat (m, D) buffer in the model's memory layout."""
        m = images.shape[0]
        if self.binding.channels_first:
            images = images.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(images, dtype=np.float32).reshape(m, -1)

    def check_label_output(self, flat: np.ndarray, scores: np.ndarray) -> float | None:
        """The share of rows where a label output beside the scores (scikit-learn exports have one) agrees with their
        argmax (None without one); below 1 the user is warned that the scores are not what the model predicts from."""
        model = self.model
        if model.label_output is None:
            return None
        x = self._shaped(flat)
        labels = np.asarray(model.session.run([model.label_output.name], {model.input.name: x},
                                              model._run_options)[0])
        labels = labels.reshape(labels.shape[0], -1)[:, 0] if labels.ndim else labels
        agree = float(np.mean(labels.astype(np.int64) == np.argmax(scores, axis=1))) if scores.size else 1.0
        if agree < 1.0:
            warnings.warn(f"{model.path}: the model's label output '{model.label_output.name}' differs from the argmax "
                          f"of '{model.output.name}' on {1 - agree:.0%} of the probe images; pyrobust scores with "
                          f"'{model.output.name}': pass --output to choose other scores", LabelsDisagreeWarning,
                          stacklevel=4)
        return agree

    # --------------------------------------------------------------------------------------------------------- run
    def _run_once(self, x: np.ndarray) -> np.ndarray:
        model = self.model
        try:
            out = model.session.run([model.output.name], {model.input.name: x}, model._run_options)[0]
        except Exception as exc:
            if model._run_options.terminate:
                # Stopped by the watchdog: the pending signal handler (or the watchdog's interrupt) raises
                # KeyboardInterrupt at the next bytecode, here, and not later inside the checkpoint save.
                time.sleep(0.05)
                raise KeyboardInterrupt from None
            raise ModelError(f"{model.path}: onnxruntime failed to run the model ({first_line(exc)})") from None
        if model.zipmap:
            out = zipmap_scores(out, model.path)
        if out.ndim != 2 or out.shape[0] != x.shape[0]:
            raise ModelError(f"{model.path}: for a batch of {x.shape[0]} images output '{model.output.name}' has "
                             f"shape {list(out.shape)}; pyrobust needs one row of class scores per image (--output "
                             "picks another output)")
        if out.dtype.kind != "f":
            raise ModelError(f"{model.path}: output '{model.output.name}' holds {out.dtype} values; pyrobust needs "
                             "float class scores (logits or probabilities), not labels")
        want = self.binding.scores
        if want is not None and out.shape[1] != want:
            raise ModelError(f"{model.path}: for a batch of {x.shape[0]} images the model gave {out.shape[1]} class "
                             f"scores per image, but {want} on the probe; a model whose class count changes with its "
                             "input cannot be evaluated")
        return out

    def run(self, flat: np.ndarray) -> np.ndarray:
        """Scores (m, K) for a flat (m, D) float32 buffer; splits and pads for a model with a fixed batch size."""
        m = flat.shape[0]
        x = self._shaped(flat)
        k = self.binding.fixed_batch
        if k is None or k == m:
            return self._run_once(x)
        parts = []
        for lo in range(0, m, k):
            chunk = x[lo: lo + k]
            if chunk.shape[0] < k:
                pad = np.repeat(chunk[-1:], k - chunk.shape[0], axis=0)
                chunk = np.concatenate([chunk, pad])
            parts.append(self._run_once(chunk)[: min(k, m - lo)])
        return np.concatenate(parts)

    def memory_per_image(self, small: int = 8, large: int = 64) -> float:
        """Bytes of onnxruntime working memory per image in a batch (bound model), an estimate for the memory check:
        the larger of the model's four largest intermediate tensors per image together (from onnx shape inference:
        onnxruntime reuses buffers, so only a few are alive at once) and the growth of the resident set from a
        batch of ``small`` images to one of ``large``."""
        return max(self._tensor_bytes_per_image(), self._measured_bytes_per_image(small, large))

    def _tensor_bytes_per_image(self) -> float:
        import onnx

        try:
            proto = onnx.shape_inference.infer_shapes(onnx.load_model_from_string(self.model.model_bytes))
        except Exception:  # shape inference is best effort: the measurement still stands
            return 0.0
        sizes = []
        for vi in proto.graph.value_info:
            t = vi.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
            if not dims or any(d is None for d in dims[1:]):
                continue  # unknown sizes: left to the measurement
            size = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).itemsize if t.elem_type else 4
            rest = [int(d) for d in dims[1:] if d is not None]  # all known: checked above
            per = int(np.prod(rest, dtype=np.int64)) if dims[0] is None or dims[0] > 1 else \
                int(np.prod(rest, dtype=np.int64)) * int(dims[0])
            sizes.append(per * size)
        return float(sum(sorted(sizes)[-4:]))

    def _measured_bytes_per_image(self, small: int, large: int) -> float:
        def resident() -> int | None:
            try:
                with open("/proc/self/statm") as fh:
                    return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            except (OSError, ValueError, IndexError):
                return None

        d = int(np.prod(self.binding.input_shape))
        self.run(np.zeros((small, d), np.float32))
        before = resident()
        self.run(np.zeros((large, d), np.float32))
        after = resident()
        if before is None or after is None:
            return 0.0
        return max(0.0, (after - before) / (large - small))


def _is_zipmap(o) -> bool:
    return o.type.startswith("seq(map(")


def choose_output(outputs, name: str | None, path: str):
    """(scores output, is a ZipMap, label output or None). ``name`` picks the scores; without it they are chosen only
    when that is unambiguous: the one float N×C tensor, else the one ZipMap (a sequence of class -> score maps).
    Integer outputs are labels, never scores."""
    listed = "; ".join(f"'{o.name}' {o.type} {describe_shape(o.shape)}" for o in outputs)
    labels = [o for o in outputs if o.type in _INT_TENSORS and len(o.shape or [None]) <= 2]
    if name is not None:
        found = [o for o in outputs if o.name == name]
        if not found:
            raise ModelError(f"{path}: no output named '{name}'; the model's outputs are: {listed}")
        o = found[0]
        if o.type in _INT_TENSORS:
            raise ModelError(f"{path}: output '{name}' holds integer labels ({o.type}), not scores; pick the "
                             f"probabilities or logits with --output (outputs: {listed})")
        if not (o.type in _FLOAT_TENSORS or _is_zipmap(o)):
            raise ModelError(f"{path}: output '{name}' is {o.type}; pyrobust needs float scores N×classes or a "
                             f"ZipMap of them (outputs: {listed})")
        label = next((x for x in labels if x.name != name), None)
        return o, _is_zipmap(o), label
    floats = [o for o in outputs if o.type in _FLOAT_TENSORS and (not o.shape or len(o.shape) == 2)]
    zipmaps = [o for o in outputs if _is_zipmap(o)]
    if len(floats) > 1:
        raise ModelError(f"{path}: {len(floats)} outputs could be class scores ({listed}); pass --output NAME "
                         "(output= in Python) to say which")
    if floats:
        return floats[0], False, labels[0] if labels else None
    if len(zipmaps) == 1:
        return zipmaps[0], True, labels[0] if labels else None
    if len(zipmaps) > 1:
        raise ModelError(f"{path}: several ZipMap outputs ({listed}); pass --output NAME to say which")
    if len(outputs) == 1 and outputs[0].type in _FLOAT_TENSORS:
        return outputs[0], False, None  # a float output of another rank: bind() names the problem
    raise ModelError(f"{path}: no output holds class scores (float N×classes or a ZipMap); the outputs are: {listed}. "
                     "pyrobust needs scores (logits or probabilities), not only labels")


def zipmap_scores(maps, path) -> np.ndarray:
    """A ZipMap (a list of {class: score} dicts, one per image) as float32 scores N×C, column k for class k."""
    if not isinstance(maps, list):
        raise ModelError(f"{path}: the ZipMap output is not a sequence of maps")
    if not maps:
        return np.empty((0, 1), np.float32)
    keys = list(maps[0].keys())
    if not all(isinstance(k, (int, np.integer)) for k in keys):
        raise ModelError(f"{path}: the ZipMap's classes are {type(keys[0]).__name__} labels; pyrobust needs integer "
                         "class labels 0..C-1 (export the classifier with integer classes)")
    classes = sorted(int(k) for k in keys)
    if classes[0] < 0:
        raise ModelError(f"{path}: the ZipMap has negative class labels; pyrobust needs 0..C-1")
    out = np.full((len(maps), classes[-1] + 1), -np.inf, np.float32)
    for i, m in enumerate(maps):
        for k, v in m.items():
            out[i, int(k)] = v
    return out
