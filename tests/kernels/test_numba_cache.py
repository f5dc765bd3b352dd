"""numba's compiled kernels go to a per-user cache, never beside the installed sources (a ``__pycache__`` left in
``site-packages/perturbcore`` after an uninstall shadows a later editable install as a namespace package)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import perturbcore

pytestmark = pytest.mark.slow  # subprocesses, clusters, exports or long runs: not in the fast tier

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


# ------------------------------------------------------------------------------------ the cache is executable code
MARKER = "planted-code-ran"
EVIL = ("import os, pickle, numba\n"
        "class Evil:\n"
        "    def __reduce__(self):\n"
        f"        return (os.system, ('touch {MARKER}',))\n"
        "def plant(folder):\n"
        "    for index in folder.rglob('*.nbi'):\n"
        "        index.write_bytes(pickle.dumps(numba.__version__) + pickle.dumps(Evil()))\n")


def _kernel_run(cache: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME")}
    env["NUMBA_CACHE_DIR"] = str(cache)
    return subprocess.run([sys.executable, "-W", "default", "-c", RUN_KERNEL], env=env, capture_output=True,
                          text=True, cwd=cwd)


def _planted_cache(tmp_path: Path) -> Path:
    """A cache filled by a real run, then every index replaced by a pickle that runs a command when loaded."""
    cache = tmp_path / "cache"
    assert _kernel_run(cache, tmp_path).returncode == 0
    assert _index_files(cache)
    namespace: dict = {}
    exec(EVIL, namespace)
    namespace["plant"](cache)
    return cache


def test_a_planted_index_runs_code_from_a_cache_only_its_owner_can_write(tmp_path):
    """The threat is real: numba loads the pickle of a cache that passes every check (so a cache restored from
    somewhere others can write is code they run: the README says so)."""
    cache = _planted_cache(tmp_path)
    _kernel_run(cache, tmp_path)
    assert (tmp_path / MARKER).exists()


@pytest.mark.parametrize("how", ["group-writable folder", "world-writable file", "file of another user",
                                 "symlinked folder", "subfolder of another user"])
def test_a_cache_others_could_have_written_is_not_loaded(tmp_path, how):
    cache = _planted_cache(tmp_path)
    use = cache
    if how == "group-writable folder":
        cache.chmod(0o770)
    elif how == "world-writable file":
        next(cache.rglob("*.nbi")).chmod(0o666)
    elif how == "file of another user":
        if os.geteuid() != 0:
            pytest.skip("changing a file's owner needs root (CI runs as root)")
        os.chown(next(cache.rglob("*.nbi")), 12345, 12345)
    elif how == "symlinked folder":
        use = tmp_path / "link"
        use.symlink_to(cache)
    else:
        if os.geteuid() != 0:
            pytest.skip("changing a folder's owner needs root (CI runs as root)")
        os.chown(next(p for p in cache.iterdir() if p.is_dir()), 12345, 12345)
    r = _kernel_run(use, tmp_path)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / MARKER).exists()
    assert "KernelCacheWarning" in r.stderr and "is not used" in r.stderr and "executable code" in r.stderr
    assert r.stdout.strip() == str(use)


def test_a_new_cache_folder_is_private(tmp_path):
    cache = tmp_path / "a" / "b" / "numba"
    assert _kernel_run(cache, tmp_path).returncode == 0
    for p in (tmp_path / "a", tmp_path / "a" / "b", cache):
        assert stat.S_IMODE(p.stat().st_mode) == 0o700


def test_a_cache_that_cannot_be_created_falls_back_to_memory(tmp_path):
    (tmp_path / "home").write_text("a file where a folder would be")
    r = _kernel_run(tmp_path / "home" / ".cache" / "numba", tmp_path)
    assert r.returncode == 0, r.stderr
    assert "cannot be created" in r.stderr and "compiled in memory" in r.stderr


def test_a_read_only_home_falls_back_to_memory(tmp_path):
    """A read-only file system (a container's read-only $HOME): the kernels run, with one warning."""
    home = tmp_path / "ro-home"
    home.mkdir()
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"]).returncode != 0:
        pytest.skip("needs unshare -m to mount a read-only file system (CI runs as root, where it works)")
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME")}
    env["HOME"] = str(home)
    script = (f"mount -t tmpfs -o ro,size=1m tmpfs {home} && "
              f"{sys.executable} -W default -c '{RUN_KERNEL}'")
    r = subprocess.run(["unshare", "-m", "sh", "-c", script], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "cannot be created" in r.stderr or "cannot be written" in r.stderr
