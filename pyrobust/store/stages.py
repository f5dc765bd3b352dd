"""Resumable stages: a stage whose recorded inputs match and whose outputs are intact is not redone.

``stages.json`` in the study folder records, per stage, the SHA-256 of its inputs (settings and the digests of the
files it reads), the SHA-256 of every output file, when it finished and how long it took. A stage runs again when its
inputs change (and everything downstream of it then sees new input digests), or when an output is missing or
altered. Work inside a stage may resume on its own (an evaluation continues from its checkpoint).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from pyrobust.files import file_sha256, write_json_atomic

__all__ = ["STAGES_FILE", "StageRunner", "file_sha256"]

STAGES_FILE = "stages.json"


def _digest(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


class StageRunner:
    """Runs named stages under ``root`` and keeps ``stages.json`` up to date after each one."""

    def __init__(self, root: Path, log: Callable[[str], None] | None = None) -> None:
        self.root = Path(root)
        self.log = log or (lambda line: None)
        path = self.root / STAGES_FILE
        try:
            self.records: dict = json.loads(path.read_text()) if path.exists() else {}
        except (OSError, ValueError):
            self.records = {}  # an unreadable record only costs a rerun

    def up_to_date(self, name: str, inputs: dict, outputs: list[Path]) -> bool:
        rec = self.records.get(name)
        if not rec or rec.get("inputs_sha256") != _digest(inputs):
            return False
        for p in outputs:
            rel = str(p.relative_to(self.root))
            if not p.is_file() or rec.get("outputs", {}).get(rel) != file_sha256(p):
                return False
        return True

    def run(self, name: str, title: str, *, inputs: dict, outputs: list[Path], fn: Callable[[bool], None]) -> dict:
        """Run ``fn(start_over)`` unless the stage is up to date. ``start_over`` is True when an earlier run of
        this stage had other inputs (its partial work must be discarded, not resumed)."""
        if self.up_to_date(name, inputs, outputs):
            rec = self.records[name]
            self.log(f"[{name}] {title}: up to date (took {rec['seconds']:.1f} s when it ran)")
            return rec
        previous = self.records.get(name)
        start_over = previous is not None and previous.get("inputs_sha256") != _digest(inputs)
        self.log(f"[{name}] {title}…")
        t0 = time.perf_counter()
        fn(start_over)
        seconds = time.perf_counter() - t0
        missing = [str(p) for p in outputs if not p.is_file()]
        if missing:
            raise RuntimeError(f"stage {name} did not write {', '.join(missing)}")
        rec = {"title": title, "inputs": inputs, "inputs_sha256": _digest(inputs), "seconds": seconds,
               "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "outputs": {str(p.relative_to(self.root)): file_sha256(p) for p in outputs}}
        self.records[name] = rec
        write_json_atomic(self.root / STAGES_FILE, self.records)
        self.log(f"[{name}] done in {seconds:.1f} s")
        return rec
