"""The rule that decides whether numba's compiled-kernel cache may be used (``perturbcore._jit.cache_problem``),
case by case, in this process (tests/kernels/test_numba_cache.py runs the whole thing in fresh processes with a planted
pickle). These run in the kernel-coverage pass of .ci/run too."""

from __future__ import annotations

import os
import stat

import pytest

from perturbcore import _jit
from perturbcore._jit import cache_dir, cache_problem


def test_where_the_cache_is(monkeypatch, tmp_path):
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("NUMBA_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "pyrobust" / "numba"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "pyrobust" / "numba"


def test_a_new_folder_is_created_private_and_accepted(tmp_path):
    folder = tmp_path / "a" / "b"
    assert cache_problem(folder) is None
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o700
    (folder / "k.nbi").write_bytes(b"x")
    (folder / "k.nbi").chmod(0o644)
    assert cache_problem(folder) is None  # readable by others is fine: only writing is a threat


def test_each_reason_to_refuse(tmp_path):
    (tmp_path / "file").write_text("x")
    assert "cannot be created" in cache_problem(tmp_path / "file" / "cache")
    assert cache_problem(tmp_path / "file") == "it is not a folder"
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    assert cache_problem(tmp_path / "link") == "it is a symbolic link"
    real.chmod(0o777)
    assert "others can write it (mode 0777)" in cache_problem(real)
    real.chmod(0o700)
    (real / "sub").mkdir()
    (real / "sub" / "x.nbc").write_bytes(b"x")
    (real / "sub" / "x.nbc").chmod(0o666)
    assert "others can write" in cache_problem(real) and "x.nbc" in cache_problem(real)
    (real / "sub" / "x.nbc").chmod(0o600)
    (real / "sub" / "planted").symlink_to("/etc/passwd")
    assert "planted is a symbolic link" in cache_problem(real)


def test_a_parent_others_can_write_is_refused_unless_sticky(tmp_path):
    parent = tmp_path / "shared"
    parent.mkdir()
    parent.chmod(0o777)
    assert "others can write its parent" in cache_problem(parent / "cache")
    parent.chmod(0o777 | stat.S_ISVTX)  # like /tmp: others cannot rename or remove what is yours
    assert cache_problem(parent / "cache") is None


def test_a_read_only_folder_is_refused(tmp_path, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o700)
    monkeypatch.setattr(_jit.os, "access", lambda path, mode: False)
    assert "cannot be written" in cache_problem(folder)


@pytest.mark.skipif(os.geteuid() != 0, reason="changing owners needs root (CI runs as root)")
def test_folders_and_files_of_another_user_are_refused(tmp_path):
    folder = tmp_path / "c"
    folder.mkdir(mode=0o700)
    (folder / "x.nbi").write_bytes(b"x")
    os.chown(folder / "x.nbi", 12345, 12345)
    assert "owned by user 12345, not by you" in cache_problem(folder)
    os.chown(folder, 12345, 12345)
    assert "it is owned by user 12345" in cache_problem(folder)
    parent = tmp_path / "p"
    parent.mkdir()
    os.chown(parent, 12345, 12345)
    assert "its parent" in cache_problem(parent / "cache") and "owned by user 12345" in cache_problem(parent / "cache")
