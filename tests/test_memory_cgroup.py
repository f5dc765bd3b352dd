"""The memory budget reads a container's cgroup limit (v2 ``memory.max``, v1 ``memory.limit_in_bytes``) as the
thread cap reads ``cpu.max``: a run that cannot fit is refused with a message, never killed by the kernel."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from pyrobust.machine import available_memory_bytes, cgroup_memory_available

pytestmark = pytest.mark.slow  # subprocesses, clusters, exports or long runs: not in the fast tier


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_v2_limit_less_usage(tmp_path):
    _write(tmp_path / "proc", "0::/job/step\n")
    _write(tmp_path / "cg" / "job" / "step" / "memory.max", "max\n")
    _write(tmp_path / "cg" / "job" / "memory.max", str(1 << 30))
    _write(tmp_path / "cg" / "job" / "memory.current", str(1 << 28))
    assert cgroup_memory_available(tmp_path / "cg", tmp_path / "proc") == (1 << 30) - (1 << 28)


def test_v1_limit_and_no_limit(tmp_path):
    _write(tmp_path / "proc", "4:memory:/ci\n1:cpu,cpuacct:/\n")
    _write(tmp_path / "cg" / "memory" / "ci" / "memory.limit_in_bytes", str(512 << 20))
    _write(tmp_path / "cg" / "memory" / "ci" / "memory.usage_in_bytes", str(100 << 20))
    _write(tmp_path / "cg" / "memory" / "memory.limit_in_bytes", "9223372036854771712")
    assert cgroup_memory_available(tmp_path / "cg", tmp_path / "proc") == 412 << 20
    _write(tmp_path / "cg" / "memory" / "ci" / "memory.limit_in_bytes", "9223372036854771712")
    assert cgroup_memory_available(tmp_path / "cg", tmp_path / "proc") is None


def test_a_namespaced_container_sees_its_limit_at_the_root(tmp_path):
    _write(tmp_path / "proc", "0::/\n")
    _write(tmp_path / "cg" / "memory.max", str(1 << 30))
    assert cgroup_memory_available(tmp_path / "cg", tmp_path / "proc") == 1 << 30
    assert available_memory_bytes(tmp_path / "cg") <= 1 << 30


def test_no_cgroup_files_means_no_limit(tmp_path):
    assert cgroup_memory_available(tmp_path / "nothing", tmp_path / "nothing") is None


def _memory_cgroup() -> Path | None:
    base = Path("/sys/fs/cgroup/memory")
    unified = Path("/sys/fs/cgroup")
    for root, limit in ((base, "memory.limit_in_bytes"), (unified, "memory.max")):
        folder = root / f"pyrobust-test-{uuid.uuid4().hex[:8]}"
        try:
            folder.mkdir()
        except OSError:
            continue
        if (folder / limit).exists():
            return folder
        folder.rmdir()
    return None


def _big_idx_folder(folder: Path, n: int = 20000, side: int = 224) -> Path:
    """An MNIST-named IDX folder of n black side x side images (1 GB of pixels, a few MB of gzip)."""
    import gzip
    import struct

    folder.mkdir()
    with gzip.open(folder / "t10k-images-idx3-ubyte.gz", "wb", compresslevel=1) as fh:
        fh.write(bytes([0, 0, 8, 3]) + struct.pack(">3I", n, side, side))
        block = bytes(side * side * 500)
        for _ in range(n // 500):
            fh.write(block)
    with gzip.open(folder / "t10k-labels-idx1-ubyte.gz", "wb") as fh:
        fh.write(bytes([0, 0, 8, 1]) + struct.pack(">I", n) + bytes(n))
    return folder


def test_a_run_that_cannot_fit_a_real_memory_cgroup_is_refused_not_killed(tmp_path):
    """In a real memory cgroup of 1 GiB, 20,000 images of 224x224 (1 GB of pixels) are refused from their header
    before they are loaded (exit 3, one line), where such a run used to be OOM-killed with no message."""
    if os.geteuid() != 0:
        pytest.skip("creating a memory cgroup needs root (CI runs as root)")
    folder = _memory_cgroup()
    if folder is None:
        pytest.skip("no writable memory cgroup hierarchy on this machine")
    try:
        limit = "memory.limit_in_bytes" if (folder / "memory.limit_in_bytes").exists() else "memory.max"
        (folder / limit).write_text(str(1 << 30))
        cmd = (f"echo $$ > {folder}/cgroup.procs && exec {sys.executable} -m pyrobust evaluate "
               f"pyrobust/assets/mnist-cnn.onnx --dataset {_big_idx_folder(tmp_path / 'big')}:test "
               f"--max-steps 1 --out {tmp_path / 'out'}")
        r = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=300,
                           cwd=Path(__file__).resolve().parents[1])
    finally:
        for _ in range(50):
            try:
                folder.rmdir()
                break
            except OSError:
                import time

                time.sleep(0.1)  # the process is gone; the kernel frees the group a moment later
    assert r.returncode == 3, (r.returncode, r.stderr)
    assert "more than the" in r.stderr and "MiB of memory allowed" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
