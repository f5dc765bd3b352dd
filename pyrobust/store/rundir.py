"""A run folder: its lock, its checkpoints, and the decision to start, resume or find the run complete.

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
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pyrobust.errors import (
    DataError,
    Interrupted,
    NonFiniteModel,
    OutputError,
    PyRobustError,
    ResumeMismatch,
)
from pyrobust.files import file_sha256, read_run_file, write_bytes_atomic
from pyrobust.machine import on_forced_exit
from pyrobust.store.results import (
    RUN_FILES,
    SUMMARY_FILE,
    check_margins,
    check_outcome_arrays,
    clear_run_files,
    load_results,
    run_files,
    write_results,
)
from pyrobust.types import RunRecord, RunState, differences

CHECKPOINT_FILE = "checkpoint.npz"
LOCK_FILE = ".pyrobust.lock"


_SAVE_LOCK = threading.RLock()  # one checkpoint write at a time: the main thread's, or the watchdog's last resort
_LAST_RESORT: list = []  # (folder, state, fp) of the runs in progress, for a process that must stop from outside


def save_checkpoint(folder: Path, state: RunState, fp: dict) -> None:
    with _SAVE_LOCK:
        _save_checkpoint(folder, state, fp)


def last_resort_save() -> str:
    """Called from the watchdog thread when the main thread is stuck inside one model operation past a deadline or
    a signal: save every run in progress (their states hold only finished images, and nothing updates them while
    onnxruntime runs) and say what was saved. The lock is kept, so no later write can start before the exit."""
    _SAVE_LOCK.acquire(timeout=10)
    saved = []
    for folder, state, fp in list(_LAST_RESORT):
        try:
            _save_checkpoint(folder, state, fp)
            saved.append(f"{state.n_done} of {state.n} images done, checkpoint saved in {folder}: run the same "
                         "command with resume=True to continue")
        except Exception as exc:  # pragma: no cover - a full disk at this very moment
            saved.append(f"the checkpoint in {folder} could not be saved ({type(exc).__name__})")
    return "; ".join(saved)


on_forced_exit(last_resort_save)


def _save_checkpoint(folder: Path, state: RunState, fp: dict) -> None:
    meta = {"fingerprint": fp, "inferences": state.inferences, "noisy_inferences": state.noisy_inferences,
            "seconds": state.seconds, "sessions": state.sessions}
    buf = io.BytesIO()
    np.savez(buf, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), clean_margin=state.clean_margin,
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
            # checkpoints from before failure counting hold neither counts nor margins (and cannot be of a
            # counting run: its fingerprint differs)
            arrays = {name: z[name] for name in RunState.ARRAYS if name in z.files or name != "failures"}
            margin = z["clean_margin"] if "clean_margin" in z.files else np.full(fp["count"], np.nan)
    except Exception as exc:  # a checkpoint is ours, but a disk can still hand back garbage
        raise DataError(f"{path}: unreadable checkpoint ({type(exc).__name__}); pass overwrite=True to start over") \
            from None
    saved = meta.get("fingerprint", {})
    diffs = differences(saved, fp)
    if diffs:
        raise ResumeMismatch(f"cannot resume the run in {folder}: {'; '.join(diffs)}. Resume with the same model, "
                             "data and settings, or pass overwrite=True to start over")
    state = RunState(fp["count"])
    for arr in arrays.values():
        if arr.shape != (fp["count"],):
            raise DataError(f"{path}: checkpoint arrays do not match the run; pass overwrite=True to start over")
    if not fp["spec"].get("count_failures"):  # the counts of a run that does not count are zeros, not read
        arrays.pop("failures", None)
    elif "failures" not in arrays:
        raise DataError(f"{path}: the checkpoint of a failure-counting run holds no counts; pass overwrite=True to "
                        "start over")
    check_outcome_arrays(arrays, int(fp["spec"]["max_steps"]), f"{path} (pass overwrite=True to start over)")
    check_margins(margin, fp["count"], f"{path} (pass overwrite=True to start over)")
    if arrays["done"].dtype != np.bool_:
        raise DataError(f"{path}: the 'done' mask is not boolean; pass overwrite=True to start over")
    for name, arr in arrays.items():
        getattr(state, name)[:] = arr
    state.clean_margin[:] = margin
    counts = [meta.get(k, 0) for k in ("inferences", "noisy_inferences", "sessions")]
    seconds = meta.get("seconds", 0.0)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts) or \
            not isinstance(seconds, (int, float)) or not 0 <= seconds < 1e9:
        raise DataError(f"{path}: malformed counters in the checkpoint; pass overwrite=True to start over")
    state.inferences, state.noisy_inferences, state.sessions = counts
    state.seconds = float(seconds)
    return state


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


# --------------------------------------------------------------------------------------------- the run folder
@dataclass(frozen=True)
class Fresh:
    """Nothing to continue: start a new run (an earlier run's files, with ``overwrite``, go when it finishes)."""


@dataclass(frozen=True)
class Resume:
    """Continue from a checkpoint."""

    state: RunState


@dataclass(frozen=True)
class Complete:
    """``resume`` found the same run finished: nothing to do."""

    record: RunRecord


def decide_start(out_dir: Path, fp: dict, *, overwrite: bool, resume: bool) -> Fresh | Resume | Complete:
    """What to do with what ``out_dir`` holds. A checkpoint comes first: an interrupted ``overwrite`` run leaves
    one beside the earlier run's results. Nothing is deleted here."""
    for name in (*RUN_FILES, CHECKPOINT_FILE):
        # a file is written by renaming a whole temporary file over its name: a folder there cannot be replaced
        if (out_dir / name).is_dir() and not (out_dir / name).is_symlink():
            raise OutputError(f"{out_dir / name}: is a folder where pyrobust writes a file; remove it or choose "
                              "another output folder")
    complete = os.path.lexists(out_dir / SUMMARY_FILE)
    unfinished = os.path.lexists(out_dir / CHECKPOINT_FILE)
    present = run_files(out_dir, (CHECKPOINT_FILE,))
    if resume and unfinished:
        return Resume(load_checkpoint(out_dir, fp))
    if resume and complete:
        record = load_results(out_dir)
        diffs = differences(record.fingerprint, fp)
        if diffs:
            raise ResumeMismatch(f"{out_dir} holds a finished run of another model, data or settings "
                                 f"({'; '.join(diffs)}); pass overwrite=True to replace it or choose another output "
                                 "folder")
        return Complete(record)
    if present and not overwrite and not resume:
        if unfinished:
            what = "an unfinished run (checkpoint.npz)" + (" beside an earlier run's results" if complete else "")
            hint = "pass resume=True to continue it, overwrite=True to start over,"
        else:
            what, hint = "a run's results", "pass overwrite=True to replace them"
        others = [f for f in present if f != CHECKPOINT_FILE]
        listed = f" ({', '.join(others)})" if others and not unfinished else ""
        raise OutputError(f"{out_dir}: already holds {what}{listed}; {hint} or choose another output folder")
    return Fresh()


@contextmanager
def checkpointed(out_dir: Path, state: RunState, fp: dict, *, resumed: bool):
    """Run the body with ``state`` checkpointed in ``out_dir``: yields the function to save it. Whatever stops the
    body, the folder is left usable: Ctrl-C saves the checkpoint (and says how to continue); an error after some
    images finished saves them; an error before any, or a model that gives only NaN, leaves no checkpoint."""
    save = lambda st=state: save_checkpoint(out_dir, st, fp)  # noqa: E731
    save()
    entry = (out_dir, state, fp)
    _LAST_RESORT.append(entry)
    try:
        yield save
    except KeyboardInterrupt:
        save()
        raise Interrupted(f"interrupted after {state.n_done} of {state.n} images; checkpoint saved in {out_dir}: run "
                          "the same command with resume=True to continue") from None
    except NonFiniteModel:
        (out_dir / CHECKPOINT_FILE).unlink(missing_ok=True)  # a run of a model that gives only NaN is void
        raise
    except PyRobustError as exc:
        if state.n_done == 0 and not resumed:  # never leave a checkpoint that silently blocks the next run
            (out_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
            raise
        save()
        raise type(exc)(f"{exc}; the {state.n_done} of {state.n} images finished before it are saved in {out_dir}: "
                        "fix the cause and run it again with resume=True") from None
    finally:
        if entry in _LAST_RESORT:
            _LAST_RESORT.remove(entry)


def finish_run(out_dir: Path, outcome, summary: dict) -> None:
    """Only now, with the new run complete, does an earlier run's output go (summary first, so the folder is never
    a mix that passes for complete); the checkpoint stays until the new results are written."""
    clear_run_files(out_dir)
    write_results(out_dir, outcome, summary)
    (out_dir / CHECKPOINT_FILE).unlink(missing_ok=True)


def holds_only_runs_of(folder: str | os.PathLike, model: str | os.PathLike, *, dataset: str) -> bool:
    """True when ``folder`` holds no run, or only a run (finished or not) of ``model`` on ``dataset``: what
    ``pyrobust demo`` may replace without being told to."""
    out = Path(folder)
    if not out.is_dir():
        return True
    sha = file_sha256(model)
    if os.path.lexists(out / CHECKPOINT_FILE):
        try:
            if checkpoint_fingerprint(out).get("model_sha256") != sha:
                return False
        except DataError:
            return False
    if os.path.lexists(out / SUMMARY_FILE):
        try:
            summary = json.loads(read_run_file(out / SUMMARY_FILE, what="summary", max_bytes=256 * 2**20))
            return summary["model"]["sha256"] == sha and summary["dataset"]["spec"] == dataset
        except (DataError, ValueError, KeyError, TypeError):
            return False
    return not run_files(out) or os.path.lexists(out / CHECKPOINT_FILE)
