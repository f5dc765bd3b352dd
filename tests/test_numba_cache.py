"""numba's compiled kernels go to a per-user cache, never beside the installed sources (a ``__pycache__`` left in
``site-packages/perturbcore`` after an uninstall shadows a later editable install as a namespace package)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import perturbcore

PACKAGE = Path(perturbcore.__file__).parent
RUN_KERNEL = ("import numpy as np, perturbcore; "
              "perturbcore.predict(np.zeros((2, 3), np.float32)); "
              "import numba; print(numba.config.CACHE_DIR)")


def _run(env_extra: dict, tmp_path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME")}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", RUN_KERNEL], env=env, capture_output=True, text=True, check=True,
                          cwd=tmp_path).stdout.strip()


def _index_files(folder: Path) -> set[Path]:
    return set(folder.rglob("*.nbi")) if folder.exists() else set()


def test_cache_goes_to_the_user_cache(tmp_path):
    before = _index_files(PACKAGE)
    where = _run({"XDG_CACHE_HOME": str(tmp_path / "xdg")}, tmp_path)
    assert where == str(tmp_path / "xdg" / "pyrobust" / "numba")
    assert _index_files(tmp_path / "xdg" / "pyrobust" / "numba")  # the kernel's cache index is there
    assert _index_files(PACKAGE) == before  # and nothing new beside the sources


def test_numba_cache_dir_is_honoured(tmp_path):
    where = _run({"NUMBA_CACHE_DIR": str(tmp_path / "mine"), "XDG_CACHE_HOME": str(tmp_path / "xdg")}, tmp_path)
    assert where == str(tmp_path / "mine") and _index_files(tmp_path / "mine")
    assert not (tmp_path / "xdg").exists()
