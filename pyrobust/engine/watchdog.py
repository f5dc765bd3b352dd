"""Ctrl-C, SIGTERM and ``--timeout`` stay effective while onnxruntime runs.

Python runs signal handlers only between bytecodes of the main thread, so a model whose inference never ends (a
``Loop`` with an enormous trip count) would ignore SIGTERM and keep a CI runner waiting. While a command runs, the
:class:`Watchdog` listens on Python's signal wake-up descriptor (written by the C-level handler the moment a signal
arrives, whichever thread takes it) and watches the deadline from a thread of its own. When either fires it asks
every onnxruntime run in flight to stop (``RunOptions.terminate``, checked by onnxruntime between nodes and loop
iterations); the signal's own handler then raises ``KeyboardInterrupt`` in the main thread (for the deadline the
watchdog raises it), which saves its checkpoint and exits 130, as after Ctrl-C.

**One long operation.** onnxruntime checks ``terminate`` only between nodes: a single convolution or matrix product
that runs for minutes never sees it, and the main thread never leaves C code. So when the main thread has not
finished ``GRACE_SECONDS`` after the stop was asked for, the watchdog saves every run's checkpoint itself (the
state holds only finished images, and nothing writes it while onnxruntime runs), prints the one line the command
would have printed, and ends the process with exit code 130: the deadline holds inside one node, and
``--resume`` continues from the checkpoint.
"""

from __future__ import annotations

import _thread
import os
import select
import signal
import threading
import time
import weakref
from typing import Any

_ACTIVE_RUNS: weakref.WeakSet = weakref.WeakSet()  # RunOptions of the sessions that exist
GRACE_SECONDS = 10.0  # how long the main thread may take to stop by itself once asked (a loaded machine saving a
# large checkpoint needs a few seconds; a deadline overshoots by at most this)


def register_run_options(options) -> None:
    _ACTIVE_RUNS.add(options)


def terminate_runs() -> None:
    for options in list(_ACTIVE_RUNS):
        options.terminate = True


class Watchdog:
    """Within ``with Watchdog():`` SIGINT, SIGTERM and the deadline (``set_timeout``) stop onnxruntime runs in
    flight, and the main thread gets ``KeyboardInterrupt``. ``reason``: ``"timeout"``, ``"SIGTERM"``, ``"SIGINT"``
    or None."""

    def __init__(self, timeout: float | None = None) -> None:
        self.timeout = timeout
        self.reason: str | None = None
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pipe: tuple[int, int] | None = None
        self._previous_fd = -1
        self._previous_sigint: Any = None  # the SIGINT handler replaced for the run (it was not Python's)

    def set_timeout(self, seconds: float) -> None:
        """Arm (or re-arm) the deadline, counted from now."""
        self.timeout = seconds
        self._deadline = time.monotonic() + seconds

    def __enter__(self) -> Watchdog:
        if threading.current_thread() is threading.main_thread():
            r, w = os.pipe()
            os.set_blocking(r, False)
            os.set_blocking(w, False)
            self._previous_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
            self._pipe = (r, w)
            if not callable(signal.getsignal(signal.SIGINT)):
                # SIGINT ignored (a job started in the background by a shell, nohup) or not handled by Python: the
                # deadline's interrupt would do nothing, and Python code would run on until the last resort. Raise
                # it for the deadline only; a SIGINT from outside stays ignored, as the parent asked.
                self._previous_sigint = signal.signal(signal.SIGINT, self._deadline_interrupt)
        self._thread = threading.Thread(target=self._watch, name="pyrobust-watchdog", daemon=True)
        self._thread.start()
        return self

    def _deadline_interrupt(self, signo, frame) -> None:
        if self.reason == "timeout":
            raise KeyboardInterrupt

    def _watch(self) -> None:
        r = self._pipe[0] if self._pipe else None
        while not self._stop.is_set():
            wait = 0.2 if self._deadline is None else max(0.0, min(0.2, self._deadline - time.monotonic()))
            if r is not None:
                ready, _, _ = select.select([r], [], [], wait)
                if ready:
                    try:
                        data = os.read(r, 64)
                    except BlockingIOError:
                        data = b""
                    for signo in data:
                        if signo == signal.SIGINT and self._previous_sigint is not None:
                            continue  # SIGINT was ignored when the run started: it stays ignored
                        if signo in (signal.SIGINT, signal.SIGTERM):
                            # the signal's handler raises KeyboardInterrupt once the main thread leaves C code
                            self.reason = signal.Signals(signo).name
                            terminate_runs()
                            self._last_resort()
                            return
            else:
                time.sleep(wait)
            if self._deadline is not None and time.monotonic() >= self._deadline and not self._stop.is_set():
                self.reason = "timeout"
                terminate_runs()
                _thread.interrupt_main()
                self._last_resort()
                return

    def _last_resort(self) -> None:
        """Give the main thread ``GRACE_SECONDS`` to stop by itself; if it is still inside one operation, save the
        checkpoints from here and end the process (exit 130)."""
        if self._stop.wait(GRACE_SECONDS):
            return
        from pyrobust.escape import printable
        from pyrobust.machine import before_forced_exit

        what = before_forced_exit().replace("resume=True", "--resume")
        why = f"timed out after {self.timeout:g} s (--timeout)" if self.reason == "timeout" else \
            f"stopped by {self.reason}"
        line = (f"pyrobust: error: {why}; one operation of the model ran on {GRACE_SECONDS:g} s past it, so the "
                f"process was ended; {what}\n")
        try:
            os.write(2, printable(line.rstrip("\n")).encode("utf-8", "replace") + b"\n")
        finally:
            os._exit(130)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None
        if self._pipe is not None:
            signal.set_wakeup_fd(self._previous_fd)
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None
