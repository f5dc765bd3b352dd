"""``pyrobust data fetch`` against a local HTTP server (no internet is needed or used): good files, a wrong
checksum, a truncated download, a server error, an interrupted download that resumes, and ``data list``."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pyrobust.cli import main
from pyrobust.data.fetch import CATALOG, RemoteDataset, RemoteFile, fetch_dataset, verify
from pyrobust.data.load import load_dataset
from pyrobust.errors import DataError, OutputError
from tests.builders import idx_bytes

N = 6


def _files() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    raw = {"t10k-images-idx3-ubyte.gz": idx_bytes(rng.integers(0, 256, (N, 28, 28), dtype=np.uint8)),
           "t10k-labels-idx1-ubyte.gz": idx_bytes(np.arange(N, dtype=np.uint8) % 3)}
    return raw


RAW = _files()
GZ = {name: gzip.compress(data, mtime=0) for name, data in RAW.items()}
REGZ = {name: gzip.compress(data, compresslevel=1, mtime=12345) for name, data in RAW.items()}  # a mirror's copy


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests: list[tuple[str, str | None]] = []
        self.flaky_seen: set[str] = set()


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output clean
        pass

    def do_GET(self):  # noqa: N802 - http.server's name
        mode, name = self.path.strip("/").split("/", 1)
        self.server.requests.append((self.path, self.headers.get("Range")))
        if mode == "err":
            self.send_error(500)
            return
        if mode == "silent":  # accepts the connection, then never answers
            time.sleep(8)
            return
        if mode == "drip" and name in GZ:  # answers, then a byte every 0.1 s: never idle long enough to time out
            self.send_response(200)
            self.send_header("Content-Length", str(len(GZ[name])))
            self.end_headers()
            for b in GZ[name]:
                self.wfile.write(bytes([b]))
                self.wfile.flush()
                time.sleep(0.1)
            return
        if mode == "missing" or name not in GZ:
            self.send_error(404)
            return
        body = {"good": GZ, "regz": REGZ, "trunc": GZ, "flaky": GZ}.get(mode, GZ)[name]
        if mode == "bad":
            body = gzip.compress(RAW[name][:-1] + b"\x01", mtime=0)
        start = 0
        rng = self.headers.get("Range")
        if rng and mode in ("good", "flaky"):
            start = int(rng.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if mode == "trunc" or (mode == "flaky" and name not in self.server.flaky_seen):
            self.server.flaky_seen.add(name)
            self.wfile.write(body[start:start + (len(body) - start) // 2])  # then the connection drops
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body[start:])


@pytest.fixture()
def server():
    srv = Server()
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _catalog(server, *modes, by_content=True) -> dict[str, RemoteDataset]:
    base = f"http://127.0.0.1:{server.server_address[1]}"
    files = tuple(RemoteFile(name, len(RAW[name]), hashlib.sha256(RAW[name]).hexdigest() if by_content else None,
                             frozenset() if by_content else frozenset({hashlib.sha256(GZ[name]).hexdigest()}))
                  for name in RAW)
    return {"tiny": RemoteDataset("tiny", tuple(f"{base}/{m}/" for m in modes), files)}


FAST = dict(retries=2, backoff=0.0, timeout=5)


@pytest.mark.slow
def test_good_files_are_downloaded_verified_and_usable(server, tmp_path):
    got = fetch_dataset("tiny", dest=tmp_path, catalog=_catalog(server, "good"), **FAST)
    assert [f.status for f in got] == ["downloaded"] * 2
    for f in got:
        assert f.path.read_bytes() == GZ[f.path.name] and f.sha256 == hashlib.sha256(GZ[f.path.name]).hexdigest()
    ds = load_dataset(str(tmp_path / "tiny") + ":test")
    assert ds.n == N and sorted(p.name for p in (tmp_path / "tiny").iterdir()) == sorted(RAW)  # no leftovers
    again = fetch_dataset("tiny", dest=tmp_path, catalog=_catalog(server, "good"), **FAST)
    assert [f.status for f in again] == ["present"] * 2


@pytest.mark.slow
def test_published_gz_hash_or_recompressed_content_both_verify(server, tmp_path):
    got = fetch_dataset("tiny", dest=tmp_path / "a", catalog=_catalog(server, "good", by_content=False), **FAST)
    assert all(f.status == "downloaded" for f in got)
    # a mirror that recompressed the files: other .gz bytes, the same IDX content
    got = fetch_dataset("tiny", dest=tmp_path / "b", catalog=_catalog(server, "regz"), **FAST)
    assert all(f.path.read_bytes() == REGZ[f.path.name] for f in got)
    with pytest.raises(DataError, match="from any source"):  # without a content hash, recompressed is refused
        fetch_dataset("tiny", dest=tmp_path / "c", catalog=_catalog(server, "regz", by_content=False), **FAST)


@pytest.mark.slow
def test_a_wrong_checksum_is_discarded_and_the_next_source_used(server, tmp_path):
    got = fetch_dataset("tiny", dest=tmp_path, catalog=_catalog(server, "bad", "good"), **FAST)
    assert all(f.url.split("/")[-2] == "good" and "checksum mismatch" in f.attempts[0] for f in got)
    with pytest.raises(DataError, match="checksum mismatch") as exc:
        fetch_dataset("tiny", dest=tmp_path / "x", catalog=_catalog(server, "bad"), **FAST)
    assert "copy the file into" in str(exc.value)
    assert not any((tmp_path / "x" / "tiny").iterdir())  # nothing half-written or unverified under any name


@pytest.mark.slow
def test_server_errors_are_retried_then_the_next_source(server, tmp_path):
    got = fetch_dataset("tiny", dest=tmp_path, catalog=_catalog(server, "err", "missing", "good"), **FAST)
    assert all("server error 500" in f.attempts[0] and "HTTP 404" in f.attempts[2] for f in got)
    assert sum(p.startswith("/err/") for p, _ in server.requests) == 2 * 2  # two tries per file
    with pytest.raises(DataError, match="server error 500"):
        fetch_dataset("tiny", dest=tmp_path / "x", catalog=_catalog(server, "err"), **FAST)


@pytest.mark.slow
def test_a_truncated_download_is_never_accepted(server, tmp_path):
    with pytest.raises(DataError, match="broke off"):
        fetch_dataset("tiny", dest=tmp_path, catalog=_catalog(server, "trunc"), **FAST)
    assert not any((tmp_path / "tiny").iterdir())


def test_an_interrupted_download_resumes_where_it_stopped(server, tmp_path):
    got = fetch_dataset("tiny", dest=tmp_path, catalog=_catalog(server, "flaky"), **FAST)
    assert all(f.status == "downloaded" and f.path.read_bytes() == GZ[f.path.name] for f in got)
    ranges = [r for p, r in server.requests if r]
    assert len(ranges) == 2 and all(r.startswith("bytes=") and r != "bytes=0-" for r in ranges)


@pytest.mark.slow
def test_an_existing_different_file_is_not_overwritten(server, tmp_path):
    (tmp_path / "tiny").mkdir()
    mine = tmp_path / "tiny" / "t10k-images-idx3-ubyte.gz"
    mine.write_bytes(b"my own file")
    with pytest.raises(DataError, match="exists but is not the published file"):
        fetch_dataset("tiny", dest=tmp_path, catalog=_catalog(server, "good"), **FAST)
    assert mine.read_bytes() == b"my own file"


def test_unknown_dataset_and_unwritable_folder(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'cifar'"):
        fetch_dataset("cifar", dest=tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="cannot create the data folder"):
        fetch_dataset("mnist", dest=tmp_path / "file")


@pytest.mark.slow
def test_cli_fetch_and_list(server, tmp_path, monkeypatch, capsys):
    import pyrobust.data.fetch as fetch

    monkeypatch.setitem(fetch.CATALOG, "mnist", _catalog(server, "good")["tiny"])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("PYROBUST_DATA", raising=False)
    capsys.readouterr()
    assert main(["data", "find", "mnist:test"]) == 3  # what a CI step asks before it fetches
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dataset mnist:test not found" in err and "t10k-images-idx3-ubyte.gz" in err
    assert main(["data", "fetch", "mnist"]) == 0
    out = capsys.readouterr().out
    assert "downloaded" in out and "use --dataset mnist:test" in out
    assert main(["data", "find", "mnist:test"]) == 0
    assert capsys.readouterr().out.startswith(f"mnist:test: {N:,} images 28x28x1,")
    assert main(["data", "find", "mnist:nope"]) == 2  # a split that does not exist is a usage error
    assert (tmp_path / "cache" / "pyrobust" / "data" / "mnist" / "t10k-labels-idx1-ubyte.gz").is_file()
    assert load_dataset("mnist:test").n == N  # found where named datasets are searched, with no option
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert out.count("verified") == 2 and str(tmp_path / "cache" / "pyrobust" / "data") in out
    assert main(["data", "fetch", "cifar"]) == 2
    monkeypatch.setitem(fetch.CATALOG, "mnist", _catalog(server, "err")["tiny"])
    monkeypatch.setattr(fetch, "fetch_dataset", functools.partial(fetch_dataset, retries=1, backoff=0.0))
    assert main(["data", "fetch", "mnist", "--dir", str(tmp_path / "other")]) == 3
    assert "could not be downloaded and verified" in capsys.readouterr().err


def test_pinned_checksums_match_the_shared_files(shared_data):
    """The pinned content hashes are those of the real files (MNIST test set, all of Fashion-MNIST)."""
    for name in ("mnist", "fashion-mnist"):
        for spec in CATALOG[name].files:
            path = Path(shared_data) / name / spec.name
            if name == "mnist" and spec.name.startswith("train"):
                assert not verify(path, spec)[0]  # the shared training files are a 5k subset, not the published set
                continue
            assert verify(path, spec)[0], path


@pytest.mark.slow
def test_a_dripping_server_is_stopped_by_the_deadline(server, tmp_path):
    start = time.monotonic()
    with pytest.raises(DataError, match=r"not fetched within the 1.5 s deadline .*still downloading at the deadline"):
        fetch_dataset("tiny", dest=tmp_path, catalog=_catalog(server, "drip"), retries=2, backoff=0.0, timeout=5,
                      deadline=1.5)
    assert time.monotonic() - start < 4  # the read timeout (5 s) never fired: the deadline did
    assert not any(p.name in RAW for p in (tmp_path / "tiny").iterdir())


@pytest.mark.slow
def test_a_silent_server_times_out_and_the_next_source_is_used(server, tmp_path):
    start = time.monotonic()
    got = fetch_dataset("tiny", dest=tmp_path, catalog=_catalog(server, "silent", "good"), retries=1, backoff=0.0,
                        timeout=0.5, deadline=30)
    assert [f.status for f in got] == ["downloaded"] * 2 and time.monotonic() - start < 5
    assert "timed out" in got[0].attempts[0] or "connection failed" in got[0].attempts[0]


@pytest.mark.slow
def test_the_cli_gives_one_line_at_the_deadline(server, tmp_path, monkeypatch, capsys):
    from pyrobust.data import fetch

    monkeypatch.setattr(fetch, "CATALOG", _catalog(server, "drip") | {"mnist": _catalog(server, "drip")["tiny"]})
    code = main(["data", "fetch", "mnist", "--dir", str(tmp_path), "--deadline", "1", "--timeout", "5"])
    err = capsys.readouterr().err
    assert code == 3 and "deadline" in err and "raise --deadline" in err
    assert [line for line in err.splitlines() if "error" in line] == [err.splitlines()[-1]]
    assert main(["data", "fetch", "mnist", "--dir", str(tmp_path), "--deadline", "0"]) == 2
