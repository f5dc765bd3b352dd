"""Checkpoints, resumption and the folder lock of a long evaluation.

``checkpoint.npz`` holds the per-image state (results of finished images and the ``done`` mask) and the run's
fingerprint (model and data SHA-256, every noise setting) as a JSON string in a plain uint8 array, no pickles. It is
written atomically, so a run killed at any moment, SIGKILL included, leaves either the previous checkpoint or the
new one. Resuming refuses a checkpoint whose fingerprint differs from the run being started.

``.pyrobust.lock`` is held with ``flock`` for the whole run: a second run on the same folder refuses to start, and
the kernel releases the lock when the holder dies, however it dies.
"""

from __future__ import annotations

import errno
import fcntl
import io
import json
import os
import stat
from pathlib import Path

import numpy as np

from pyrobust.engine import RunState
from pyrobust.errors import DataError, InvalidInput, OutputError
from pyrobust.results import check_outcome_arrays, read_run_file, write_bytes_atomic

CHECKPOINT_FILE = "checkpoint.npz"
LOCK_FILE = ".pyrobust.lock"
CHECKPOINT_VERSION = 1


def fingerprint(*, model_sha256: str, dataset_sha256: str, count: int, spec: dict) -> dict:
    """What must not change between an interrupted run and its resumption (batch size and threads may)."""
    return {"version": CHECKPOINT_VERSION, "model_sha256": model_sha256, "dataset_sha256": dataset_sha256,
            "count": int(count), "spec": spec}


def save_checkpoint(folder: Path, state: RunState, fp: dict) -> None:
    meta = {"fingerprint": fp, "inferences": state.inferences, "noisy_inferences": state.noisy_inferences,
            "seconds": state.seconds, "sessions": state.sessions}
    buf = io.BytesIO()
    np.savez(buf, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
             **{name: getattr(state, name) for name in RunState.ARRAYS})
    write_bytes_atomic(folder / CHECKPOINT_FILE, buf.getvalue())


def checkpoint_fingerprint(folder: Path) -> dict:
    """The fingerprint a checkpoint was saved with (DataError when it cannot be read)."""
    path = folder / CHECKPOINT_FILE
    try:
        with np.load(io.BytesIO(read_run_file(path, what="checkpoint")), allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes().decode())
        return dict(meta["fingerprint"])
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: unreadable checkpoint ({type(exc).__name__})") from None


def load_checkpoint(folder: Path, fp: dict) -> RunState:
    """The saved state, if its fingerprint matches ``fp``; otherwise a one-line refusal naming what differs."""
    path = folder / CHECKPOINT_FILE
    raw = read_run_file(path, what="checkpoint")
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes().decode())
            arrays = {name: z[name] for name in RunState.ARRAYS}
    except Exception as exc:  # a checkpoint is ours, but a disk can still hand back garbage
        raise DataError(f"{path}: unreadable checkpoint ({type(exc).__name__}); pass overwrite=True to start over") \
            from None
    saved = meta.get("fingerprint", {})
    diffs = _differences(saved, fp)
    if diffs:
        raise InvalidInput(f"cannot resume the run in {folder}: {'; '.join(diffs)}. Resume with the same model, data "
                           "and settings, or pass overwrite=True to start over")
    state = RunState(fp["count"])
    for arr in arrays.values():
        if arr.shape != (fp["count"],):
            raise DataError(f"{path}: checkpoint arrays do not match the run; pass overwrite=True to start over")
    check_outcome_arrays(arrays, int(fp["spec"]["max_steps"]), f"{path} (pass overwrite=True to start over)")
    if arrays["done"].dtype != np.bool_:
        raise DataError(f"{path}: the 'done' mask is not boolean; pass overwrite=True to start over")
    for name, arr in arrays.items():
        getattr(state, name)[:] = arr
    counts = [meta.get(k, 0) for k in ("inferences", "noisy_inferences", "sessions")]
    seconds = meta.get("seconds", 0.0)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts) or \
            not isinstance(seconds, (int, float)) or not 0 <= seconds < 1e9:
        raise DataError(f"{path}: malformed counters in the checkpoint; pass overwrite=True to start over")
    state.inferences, state.noisy_inferences, state.sessions = counts
    state.seconds = float(seconds)
    return state


def _differences(saved: dict, now: dict) -> list[str]:
    out = []
    if saved.get("version") != now["version"]:
        return [f"checkpoint format {saved.get('version')!r}, this pyrobust writes {now['version']}"]
    for key, label in (("model_sha256", "the model"), ("dataset_sha256", "the data")):
        if saved.get(key) != now[key]:
            out.append(f"{label} changed (SHA-256 {str(saved.get(key))[:12]}… → {now[key][:12]}…)")
    if saved.get("count") != now["count"] and not out:
        out.append(f"image count {saved.get('count')} → {now['count']}")
    old, new = saved.get("spec", {}), now["spec"]
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            out.append(f"{key} {old.get(key)!r} → {new.get(key)!r}")
    return out


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``FOLDER/.pyrobust.lock`` for the life of a run.

    The holder removes the file when it is done (while still holding the lock), so finished folders carry no lock
    file. A run that opened the old file just before it went away finds, once it holds the lock, that the name no
    longer leads to the file it locked, and starts over with a fresh one: two runs never both believe they hold it.
    """

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / LOCK_FILE
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        for _ in range(100):
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise OutputError(f"{self.path.parent}: another pyrobust run (pid {holder}) is writing there; "
                                      "wait for it to finish or choose another output folder") from None
                raise
            try:
                same = os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                self.fd = fd
                return self
            os.close(fd)  # the previous holder removed this file as we locked it: lock the new one
        raise OutputError(f"{self.path}: the lock file keeps changing; is something else writing there?")

    def _open(self) -> int:
        try:
            # O_NOFOLLOW: a symbolic link planted at the lock's name (results folders travel as tarballs and shared
            # folders) must not let this open truncate or create a file elsewhere.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise OutputError(f"{self.path}: is a symbolic link; pyrobust never follows links inside an output "
                                  "folder. Remove it or choose another output folder") from None
            raise OutputError(f"{self.path.parent}: cannot write there ({exc.strerror}); choose a writable output "
                              "folder") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OutputError(f"{self.path}: is not a regular file; remove it or choose another output folder")
        return fd

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # while still locked: see the class docstring
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
