"""``pyrobust data fetch`` / ``data list``: get the named datasets the way a user can, and say what is where.

Each file is downloaded from the dataset's canonical location, then from public mirrors in turn; a download that
breaks off resumes where it stopped (an HTTP range request) and is retried a few times with a growing pause. Nothing
is trusted until it is verified: the file's SHA-256 must be one pinned here for the published ``.gz``, or, because
mirrors recompress the files, the SHA-256 of its decompressed IDX bytes must be the pinned one (the decompressed size
is known exactly, so no more is ever inflated). A verified file is renamed into place atomically; a partial or bad one
never carries the final name. Files go to ``DIR/<name>/`` (default: the per-user data folder that named datasets
are searched in, ``~/.cache/pyrobust/data``), so ``--dataset mnist:test`` finds them with no further option.
"""

from __future__ import annotations

import errno
import fcntl
import gzip
import hashlib
import http.client
import os
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pyrobust.data.dataset import search_roots
from pyrobust.errors import DataError, OutputError, PyRobustError
from pyrobust.files import file_sha256
from pyrobust.validate import Number, check

SECONDS = Number(0, lo_open=True, unit="seconds")
MAX_DOWNLOAD_BYTES = 64 * 2**20  # the largest file (Fashion-MNIST training images) is 26 MB


@dataclass(frozen=True)
class RemoteFile:
    name: str
    content_size: int  # bytes of the decompressed IDX file
    content_sha256: str | None  # SHA-256 of the decompressed IDX bytes
    gz_sha256: frozenset[str] = frozenset()  # SHA-256 of published .gz files with this content


@dataclass(frozen=True)
class RemoteDataset:
    name: str
    mirrors: tuple[str, ...]  # base URLs, canonical first; a file's URL is base + name
    files: tuple[RemoteFile, ...]
    licence: str = ""
    # When set, the files come inside this archive (a .tar.gz, verified by its SHA-256), at ``member_prefix + name``:
    # only those members are read out, each verified, and the archive is removed.
    archive: RemoteFile | None = None
    member_prefix: str = ""


def _raw(name: str, size: int, sha256: str) -> RemoteFile:
    """A file stored as is (not gzip): verified by the SHA-256 of its bytes."""
    return RemoteFile(name, size, None, frozenset({sha256}))


def _idx(name: str, n: int, content_sha256: str | None, *gz: str) -> RemoteFile:
    size = 16 + n * 784 if "images" in name else 8 + n
    return RemoteFile(name, size, content_sha256, frozenset(gz))


CATALOG: dict[str, RemoteDataset] = {
    "mnist": RemoteDataset(
        "mnist",
        ("https://yann.lecun.com/exdb/mnist/", "https://ossci-datasets.s3.amazonaws.com/mnist/",
         "https://storage.googleapis.com/cvdf-datasets/mnist/"),
        (
            _idx("train-images-idx3-ubyte.gz", 60000, None,
                 "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
            _idx("train-labels-idx1-ubyte.gz", 60000, None,
                 "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
            _idx("t10k-images-idx3-ubyte.gz", 10000,
                 "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
                 "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
            _idx("t10k-labels-idx1-ubyte.gz", 10000,
                 "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
                 "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
        ),
        "CC BY-SA 3.0, Y. LeCun, C. Cortes, C. J. C. Burges",
    ),
    "fashion-mnist": RemoteDataset(
        "fashion-mnist",
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
         "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"),
        (
            _idx("train-images-idx3-ubyte.gz", 60000,
                 "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
            _idx("train-labels-idx1-ubyte.gz", 60000,
                 "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
            _idx("t10k-images-idx3-ubyte.gz", 10000,
                 "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
            _idx("t10k-labels-idx1-ubyte.gz", 10000,
                 "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
        ),
        "MIT, Zalando Research",
    ),
    # CIFAR-10's binary version (no pickles), from the authors' page; the archive's and each batch's SHA-256 as
    # published with torchvision and TensorFlow Datasets (MD5 c32a1d4ab5d03f1284b67883e8d87530 on the authors' page).
    "cifar10": RemoteDataset(
        "cifar10",
        ("https://www.cs.toronto.edu/~kriz/",),
        (
            _raw("data_batch_1.bin", 30_730_000, "cee916563c9f80d84e3cc88e17fdc0941787f1244f00a67874d45b261883ada5"),
            _raw("data_batch_2.bin", 30_730_000, "a591ca11fa1708a91ee40f54b3da4784ccd871ecf2137de63f51ada8b3fa57ed"),
            _raw("data_batch_3.bin", 30_730_000, "bbe8596564c0f86427f876058170b84dac6670ddf06d79402899d93ceea26f67"),
            _raw("data_batch_4.bin", 30_730_000, "014e562d6e23c72197cc727519169a60359f5eccd8945ad5a09d710285ff4e48"),
            _raw("data_batch_5.bin", 30_730_000, "755304fc0b379caeae8c14f0dac912fbc7d6cd469eb67a1029a08a39453a9add"),
            _raw("test_batch.bin", 30_730_000, "8e2eb146ae340b09e24670f29cabc6326dba54da8789dab6768acf480273f65b"),
        ),
        "A. Krizhevsky, Learning Multiple Layers of Features from Tiny Images (2009)",
        archive=_raw("cifar-10-binary.tar.gz", 170_052_171,
                     "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"),
        member_prefix="cifar-10-batches-bin/",
    ),
}


@dataclass
class FetchedFile:
    path: Path
    sha256: str
    status: str  # "downloaded" or "present"
    url: str | None = None
    attempts: list[str] = field(default_factory=list)


def default_data_dir() -> Path:
    """The per-user data folder, one of the places named datasets are searched in."""
    return search_roots(None)[-2]


def verify(path: Path, spec: RemoteFile) -> tuple[bool, str]:
    """(matches, SHA-256 of the file): the published .gz, or a .gz whose decompressed bytes are the pinned ones."""
    digest = file_sha256(path)
    if digest in spec.gz_sha256:
        return True, digest
    if spec.content_sha256 is None:
        return False, digest
    h, size = hashlib.sha256(), 0
    try:
        with gzip.open(path, "rb") as fh:
            while size <= spec.content_size:
                block = fh.read(min(1 << 20, spec.content_size + 1 - size))
                if not block:
                    break
                h.update(block)
                size += len(block)
    except (OSError, EOFError, zlib.error):
        return False, digest
    return size == spec.content_size and h.hexdigest() == spec.content_sha256, digest


def fetch_dataset(name: str, *, dest: str | os.PathLike | None = None, catalog: dict[str, RemoteDataset] | None = None,
                  retries: int = 3, timeout: float = 30.0, backoff: float = 1.0, deadline: float = 900.0,
                  log: Callable[[str], None] | None = None) -> list[FetchedFile]:
    """Download (or find already present) every file of dataset ``name`` into ``dest/<name>/``, verified.

    ``timeout``: seconds any one connect or read may wait for the server; ``deadline``: seconds the whole fetch may
    take, retries included. A server that accepts and then sends a byte now and then (never idle long enough for a
    read timeout) is stopped by the deadline, with the files already verified kept."""
    catalog = CATALOG if catalog is None else catalog
    if name not in catalog:
        raise DataError(f"unknown dataset {name!r}; pyrobust can fetch {', '.join(sorted(catalog))}")
    if retries < 1:
        raise ValueError("retries must be >= 1")
    check("timeout", timeout, SECONDS)
    check("deadline", deadline, SECONDS)
    remote = catalog[name]
    until = time.monotonic() + float(deadline)
    log = log or (lambda line: None)
    folder = Path(dest if dest is not None else default_data_dir()) / name
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot create the data folder ({exc.strerror}); choose another --dir") from None
    out: list[FetchedFile] = []
    with _FolderLock(folder):
        try:
            return _fetch_all(remote, folder, out, retries=retries, timeout=timeout, backoff=backoff, log=log,
                              until=until)
        except _Deadline as exc:
            done = ", ".join(f.path.name for f in out) or "none"
            raise DataError(f"{name}: not fetched within the {deadline:g} s deadline ({exc}); files verified so far: "
                            f"{done}. The server is stalled or too slow: try again later, raise --deadline, or copy "
                            f"the files into {folder}") from None


def _fetch_all(remote: RemoteDataset, folder: Path, out: list, *, retries, timeout, backoff, log,
               until: float) -> list[FetchedFile]:
    """Every file of ``remote``, appended to ``out`` as it is verified (so a deadline can say what was kept)."""
    if remote.archive is not None:
        out += _fetch_from_archive(remote, folder, retries=retries, timeout=timeout, backoff=backoff, log=log,
                                   until=until)
        return out
    for spec in remote.files:
        out.append(_fetch_file(remote, spec, folder, retries=retries, timeout=timeout, backoff=backoff, log=log,
                               until=until))
    return out


def _fetch_from_archive(remote: RemoteDataset, folder: Path, *, retries, timeout, backoff, log,
                        until: float) -> list[FetchedFile]:
    """Files that are present and verified stay; otherwise the archive is downloaded and verified, exactly the
    expected members are read out of it (no other path is ever written), each verified, and the archive removed."""
    import tarfile

    present = []
    for spec in remote.files:
        final = folder / spec.name
        if os.path.lexists(final):
            if final.is_symlink() or not final.is_file():
                raise DataError(f"{final}: exists and is not a regular file; move it away or choose another --dir")
            ok, digest = verify(final, spec)
            if not ok:
                raise DataError(f"{final}: exists but is not the published file (SHA-256 {digest[:12]}…); move it "
                                "away or choose another --dir")
            present.append(FetchedFile(final, digest, "present"))
    if len(present) == len(remote.files):
        for f in present:
            log(f"{f.path}: present, verified (SHA-256 {f.sha256[:12]}…)")
        return present
    assert remote.archive is not None
    got = _fetch_file(remote, remote.archive, folder, retries=retries, timeout=timeout, backoff=backoff, log=log,
                      until=until)
    wanted = {remote.member_prefix + spec.name: spec for spec in remote.files}
    out = []
    try:
        with tarfile.open(got.path, "r:gz") as tar:
            for member in tar:
                want = wanted.get(member.name)
                if want is None:
                    continue
                spec = want
                if not member.isfile() or member.size != spec.content_size:
                    raise DataError(f"{got.path}: member {member.name} is not the published file; the archive is "
                                    "damaged")
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                digest = hashlib.sha256(data).hexdigest()
                if digest not in spec.gz_sha256:
                    raise DataError(f"{got.path}: member {member.name} has SHA-256 {digest[:12]}…, not the published "
                                    "one; the archive is damaged")
                final = folder / spec.name
                part = folder / f".{spec.name}.part"
                with open(os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644), "wb") as fh:
                    fh.write(data)
                os.replace(part, final)
                log(f"{final}: extracted from {got.path.name}, verified (SHA-256 {digest[:12]}…)")
                out.append(FetchedFile(final, digest, "downloaded", got.url))
                del wanted[member.name]
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{got.path}: cannot be read as a .tar.gz ({type(exc).__name__}); delete it and fetch again") \
            from None
    if wanted:
        raise DataError(f"{got.path}: lacks {', '.join(sorted(wanted))}; it is not the published archive")
    got.path.unlink(missing_ok=True)
    return out


def _fetch_file(remote: RemoteDataset, spec: RemoteFile, folder: Path, *, retries, timeout, backoff,
                log, until: float) -> FetchedFile:
    final = folder / spec.name
    if os.path.lexists(final):
        if final.is_symlink() or not final.is_file():
            raise DataError(f"{final}: exists and is not a regular file; move it away or choose another --dir")
        ok, digest = verify(final, spec)
        if ok:
            log(f"{final}: present, verified (SHA-256 {digest[:12]}…)")
            return FetchedFile(final, digest, "present")
        raise DataError(f"{final}: exists but is not the published file (SHA-256 {digest[:12]}…); move it away or "
                        "choose another --dir")
    part = folder / f".{spec.name}.part"
    attempts: list[str] = []
    for base in remote.mirrors:
        url = base + spec.name
        for attempt in range(1, retries + 1):
            try:
                _download(url, part, timeout=timeout, max_bytes=max(MAX_DOWNLOAD_BYTES, spec.content_size),
                          until=until)
            except _Retryable as exc:
                attempts.append(f"{url}: {exc}")
                log(f"{url}: {exc} (attempt {attempt} of {retries})")
                if attempt < retries:
                    time.sleep(max(0.0, min(backoff * 2 ** (attempt - 1), until - time.monotonic())))
                continue
            except _Fatal as exc:
                attempts.append(f"{url}: {exc}")
                log(f"{url}: {exc}; trying the next source")
                part.unlink(missing_ok=True)
                break
            ok, digest = verify(part, spec)
            if ok:
                os.replace(part, final)
                log(f"{final}: downloaded from {url}, verified (SHA-256 {digest[:12]}…)")
                return FetchedFile(final, digest, "downloaded", url, attempts)
            attempts.append(f"{url}: checksum mismatch (SHA-256 {digest[:12]}…)")
            log(f"{url}: checksum mismatch (SHA-256 {digest[:12]}…); discarded, trying the next source")
            part.unlink(missing_ok=True)
            break
        else:
            part.unlink(missing_ok=True)  # this source kept failing: the next one starts from zero
    raise DataError(f"{spec.name}: could not be downloaded and verified from any source ({'; '.join(attempts)}); "
                    f"check the network, or copy the file into {folder} by hand")


class _Retryable(Exception):
    """A broken connection or a server error: try again, resuming what arrived."""


class _Fatal(Exception):
    """This source does not have the file (404 and friends): go to the next source."""


class _Deadline(PyRobustError):
    """The whole fetch ran past its deadline: no further attempt is made."""

    exit_code = 3


def _download(url: str, part: Path, *, timeout: float, max_bytes: int = MAX_DOWNLOAD_BYTES,
              until: float | None = None) -> None:
    from pyrobust import __version__

    until = time.monotonic() + 3600.0 if until is None else until
    if time.monotonic() >= until:
        raise _Deadline("the fetch ran past its deadline")

    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": f"pyrobust/{__version__}"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        wait = max(0.1, min(timeout, until - time.monotonic()))
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=wait) as resp:
            if have and resp.status == 206:
                start = _range_start(resp.headers.get("Content-Range", ""))
                if start != have:
                    raise _Retryable(f"the server resumed at byte {start}, not {have}")
                mode = "ab"
            else:
                mode, have = "wb", 0
            length = resp.headers.get("Content-Length")
            expected = have + int(length) if length and length.isdigit() else None
            if expected is not None and expected > max_bytes:
                raise _Fatal(f"announces {expected:,} bytes, more than any file of these datasets")
            got = have
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_APPEND if mode == "ab" else
                                                                             os.O_TRUNC), 0o644)
            with os.fdopen(fd, mode) as fh:
                while True:
                    # read1: what one receive brings, so that a server dripping bytes slower than any read timeout
                    # is still stopped by the deadline (read(n) would wait for all n bytes)
                    block = resp.read1(1 << 16)
                    if not block:
                        break
                    if time.monotonic() >= until:
                        raise _Deadline(f"{url}: still downloading at the deadline ({got + len(block):,} bytes in)")
                    got += len(block)
                    if got > max_bytes:
                        raise _Fatal("sent more bytes than any file of these datasets has")
                    fh.write(block)
            if expected is not None and got != expected:
                raise _Retryable(f"the download broke off at {got:,} of {expected:,} bytes")
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the range asked for is past the end: start over
            part.unlink(missing_ok=True)
            raise _Retryable("the partial file did not fit the server's; starting over") from None
        if exc.code >= 500 or exc.code in (408, 429):
            raise _Retryable(f"server error {exc.code}") from None
        raise _Fatal(f"HTTP {exc.code}") from None
    except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as exc:
        reason = getattr(exc, "reason", None) or type(exc).__name__
        raise _Retryable(f"connection failed ({reason})") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OutputError(f"{part}: is a symbolic link; remove it") from None
        raise _Retryable(f"connection failed ({exc.strerror or type(exc).__name__})") from None


def _range_start(content_range: str) -> int | None:
    # "bytes 100-199/200"
    try:
        return int(content_range.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


class _FolderLock:
    """Two fetches into one folder would write the same partial files: the second waits for none, it refuses."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / ".pyrobust-fetch.lock"
        self.fd: int | None = None

    def __enter__(self):
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise OutputError(f"{self.path.parent}: another pyrobust data fetch is writing there") from None
            raise OutputError(f"{self.path.parent}: cannot lock the data folder ({exc.strerror})") from None
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.path.unlink(missing_ok=True)
            self.fd = None


@dataclass
class ListedFile:
    root: Path
    dataset: str
    name: str
    path: Path
    size: int
    sha256: str
    verified: bool


def list_data(data_dir: str | os.PathLike | None = None,
              catalog: dict[str, RemoteDataset] | None = None) -> tuple[list[Path], list[ListedFile]]:
    """The folders named datasets are searched in (in order) and every dataset file found there, checked."""
    catalog = CATALOG if catalog is None else catalog
    roots = search_roots(data_dir)
    found = []
    for root in roots:
        for name, remote in catalog.items():
            for spec in remote.files:
                for folder in (root / name, root) if root.name == name else (root / name,):
                    p = folder / spec.name
                    if p.is_file() and not p.is_symlink():
                        ok, digest = verify(p, spec)
                        found.append(ListedFile(root, name, spec.name, p, p.stat().st_size, digest, ok))
                        break
    return roots, found
