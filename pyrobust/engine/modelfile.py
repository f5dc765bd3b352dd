"""An ONNX file from elsewhere, read once and made self-contained before onnxruntime sees it.

onnxruntime is handed the model as bytes. Bytes have no folder, so onnxruntime resolves any external-data location
they still name against the *working directory*: a crafted model that keeps a tensor's data at ``.git/config`` has
that file read into its weights, and the file's bytes come back in the model's outputs (or in an error message).
onnx's own helpers look only at dense initializers and attribute tensors; a tensor can also live in a sparse
initializer, a sparse-tensor attribute, a ``Constant``'s ``sparse_value``, a subgraph of ``If``/``Loop``/``Scan``,
a model-local function or a training-info graph. So this module:

* finds **every** ``TensorProto`` in the model by walking the protobuf message tree itself (whatever field holds
  it, at any depth), not a list of places that can go stale with the next ONNX release;
* allows external data only in regular files beside the model (no absolute path, no ``..``, no symbolic link on
  the way, no hard-linked file), reads those files once, hashes them into the model's identity and copies their
  bytes into the tensors, so that nothing external is left for onnxruntime to resolve (checked again after);
* says which operator domains the model's nodes **use** (graph, subgraphs and functions), rather than which ones
  it declares: ``onnxruntime.quantization.quant_pre_process`` declares several it never uses.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

from pyrobust.errors import ModelError
from pyrobust.escape import field
from pyrobust.files import read_bounded

# Operator domains onnxruntime implements itself; anything else needs a custom-op library, which pyrobust never loads.
KNOWN_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "com.microsoft.nchwc",
                           "ai.onnx.training", "ai.onnx.preview.training", "com.ms.internal.nhwc"})
MODEL_MAX_BYTES = 2 * 2**30  # protobuf's limit for one ONNX file
EXTERNAL_MAX_BYTES = 4 * 2**30  # weights kept beside the model, all files together


def _messages(root) -> Iterator:
    """Every protobuf message below ``root`` (itself included), depth first, without recursion."""
    from google.protobuf.message import Message

    stack = [root]
    while stack:
        msg = stack.pop()
        yield msg
        for fd, value in msg.ListFields():
            if fd.message_type is None:
                continue
            if isinstance(value, Message):
                stack.append(value)
            elif fd.message_type.GetOptions().map_entry:
                stack.extend(v for v in value.values() if isinstance(v, Message))
            else:
                stack.extend(value)


def all_tensors(proto) -> Iterator:
    """Every ``onnx.TensorProto`` anywhere in ``proto`` (a ModelProto, or any part of one): initializers, the values
    and indices of sparse tensors, tensor and sparse-tensor attributes, and all of these inside subgraphs,
    functions and training-info graphs."""
    from onnx import TensorProto

    return (m for m in _messages(proto) if isinstance(m, TensorProto))


def _nodes(proto) -> Iterator:
    from onnx import NodeProto

    return (m for m in _messages(proto) if isinstance(m, NodeProto))


def used_domains(proto) -> set[str]:
    """The operator domains the model's nodes use (the main graph, every subgraph and every function body), less
    those of the model's own functions (a node calling a local function runs that function's nodes, which are
    counted themselves)."""
    local = {(f.domain, f.name) for f in proto.functions}
    return {n.domain for n in _nodes(proto) if (n.domain, n.op_type) not in local}


RANDOM_OPS = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
                        "Bernoulli"})


def random_operators(proto) -> list[str]:
    """The standard operators in the model (any graph or function) that draw random numbers at every run."""
    return sorted({n.op_type for n in _nodes(proto) if n.domain in ("", "ai.onnx") and n.op_type in RANDOM_OPS})


def unknown_domains(proto) -> list[str]:
    """Used operator domains onnxruntime does not implement itself (they need a custom-op library)."""
    return sorted(used_domains(proto) - KNOWN_DOMAINS)


def _external_info(tensor) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def _is_external(tensor) -> bool:
    from onnx import TensorProto

    return tensor.data_location == TensorProto.EXTERNAL or len(tensor.external_data) > 0


def check_external_data(proto, model_path: Path) -> None:
    """Refuse external-data tensors that could read outside the model's folder: absolute paths, ``..``, symbolic
    links anywhere on the way, hard links, or files that resolve elsewhere. Done here whatever onnx's version, since
    onnx's own checks were bypassed several times (CVE-2022-25882, CVE-2024-27318, CVE-2026-27489)."""
    from onnx import TensorProto

    base = model_path.resolve().parent
    for tensor in all_tensors(proto):
        if not _is_external(tensor):
            continue
        info = _external_info(tensor)
        loc = info.get("location", "")
        where = f"{model_path}: tensor '{field(tensor.name)}' keeps its data in '{field(loc)}'"
        if tensor.data_location != TensorProto.EXTERNAL:
            raise ModelError(f"{where} but is not marked as external; re-save the model with onnx.save")
        rel = Path(loc)
        if not loc or "\0" in loc or rel.is_absolute() or ".." in rel.parts:
            raise ModelError(f"{where}, outside the model's folder; pyrobust reads external data only from files "
                             "beside the model")
        walk = base
        for part in rel.parts:
            walk = walk / part
            if walk.is_symlink():
                raise ModelError(f"{where}, through a symbolic link; copy the data file beside the model")
        target = (base / rel).resolve()
        if base not in target.parents:
            raise ModelError(f"{where}, outside the model's folder; pyrobust reads external data only from files "
                             "beside the model")
        if not target.is_file():
            raise ModelError(f"{where}, which does not exist; keep the data file beside the model")
        if target.stat().st_nlink > 1:
            raise ModelError(f"{where}, a file with several hard links; copy the data file beside the model")
        for key in ("offset", "length"):
            if info.get(key) and not info[key].isdigit():
                raise ModelError(f"{where} with {key} '{field(info[key])}'; {key} must be a whole number of bytes")


def external_files(proto, model_path: Path) -> dict[str, bytes]:
    """The bytes of every external-data file the model references (already checked to sit beside it), read once."""
    base = model_path.resolve().parent
    out: dict[str, bytes] = {}
    total = 0
    for tensor in all_tensors(proto):
        if not _is_external(tensor):
            continue
        loc = _external_info(tensor)["location"]
        if loc not in out:
            out[loc] = read_bounded(base / loc, what="external-data file", max_bytes=EXTERNAL_MAX_BYTES - total,
                                    follow_symlinks=False, error=ModelError, hint=" for a model's external data")
            total += len(out[loc])
    return out


def inline_external(proto, files: dict[str, bytes]) -> None:
    """Put the external tensors' bytes (those read and hashed) into the model itself, then check that no tensor
    anywhere still names external data (onnxruntime would resolve it against the working directory)."""
    from onnx import TensorProto

    for tensor in all_tensors(proto):
        if not _is_external(tensor):
            continue
        info = _external_info(tensor)
        blob = files[info["location"]]
        offset = int(info.get("offset") or 0)
        length = int(info["length"]) if info.get("length") else len(blob) - offset
        if offset + length > len(blob):
            raise ModelError(f"tensor '{field(tensor.name)}' points past the end of {field(info['location'])}")
        tensor.raw_data = blob[offset: offset + length]
        del tensor.external_data[:]
        tensor.data_location = TensorProto.DEFAULT
    left = [t.name for t in all_tensors(proto) if _is_external(t)]
    if left:  # pragma: no cover - every tensor the walk finds was inlined above
        raise ModelError(f"tensor '{field(left[0])}' still names external data after inlining; refusing the model")


def model_digest(data: bytes, external: dict[str, bytes]) -> str:
    """The model's SHA-256: of the .onnx file alone when it keeps its weights inside (the file's own SHA-256), else
    of the .onnx and every external-data file by name, so a swapped weight file changes it."""
    h = hashlib.sha256(data)
    for loc in sorted(external):
        h.update(b"\0" + loc.encode() + b"\0" + hashlib.sha256(external[loc]).digest())
    return h.hexdigest()


def first_line(exc: BaseException) -> str:
    """The first line of an onnx or onnxruntime message (they put pages of context in them), printable and cut
    short: such messages can quote the model's own strings and tensor bytes, so no more than a line is echoed."""
    text = str(exc).strip()
    return field(text.splitlines()[0]) if text else type(exc).__name__
