"""Remote model files (s3://, http(s)://): one HEAD, then parallel ranged GETs, each part written at its offset into
a file descriptor (a memfd or a cache file), then the size and sha256 verified.

A remote single file is fetched once per machine into the cache, keyed by its URI and the version its store reports
(ETag, checksum); instances starting together wait on one lock, so only the first one downloads.
"""

from __future__ import annotations

import os
import sys
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from urllib.parse import urlparse

from .cache import check_sha256, entry, locked, sha256_of, split_checksum
from .errors import ArtifactError

REMOTE_SCHEMES = ("s3", "http", "https")
PART_BYTES_ENV, DEFAULT_PART_BYTES = "SERVELET_DOWNLOAD_PART_BYTES", 16 * 1024 * 1024
CONCURRENCY_ENV, DEFAULT_CONCURRENCY = "SERVELET_DOWNLOAD_CONCURRENCY", 8
PART_ATTEMPTS = 3  # a part whose connection broke is fetched again from its start
CHUNK_BYTES = 1024 * 1024


class RemoteObject(ABC):
    """One remote file as its HEAD described it; `read` streams a byte range of it."""

    uri: str  # without its #sha256= fragment
    name: str  # the file name, for the cache and the progress bar
    size: int | None  # None: the server did not say
    version: str  # what changes when the content does (ETag, checksum, Last-Modified)
    ranges: bool  # whether it answers byte ranges (else one plain GET)
    stored_sha256: str | None = None  # hex, when the store keeps a whole-object checksum
    expected_sha256: str | None = None  # hex, from the URI's #sha256= fragment
    transient: tuple[type[BaseException], ...] = ()  # errors worth fetching a part again for

    @abstractmethod
    def read(self, start: int, end: int | None) -> Iterator[bytes]:
        """The bytes [start, end); `end` None reads to the end."""

    def close(self) -> None:
        pass

    def __enter__(self) -> RemoteObject:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def is_remote(uri: str) -> bool:
    return urlparse(uri).scheme in REMOTE_SCHEMES


def open_remote(uri: str) -> RemoteObject:
    """HEAD the object a remote URI names (ArtifactError if it is missing or unreachable)."""
    location, expected = split_checksum(uri)
    if urlparse(location).scheme == "s3":
        from .s3 import S3Object

        obj: RemoteObject = S3Object(location, concurrency=_setting(CONCURRENCY_ENV, DEFAULT_CONCURRENCY))
    else:
        from .http import HttpObject

        obj = HttpObject(location)
    obj.expected_sha256 = expected
    return obj


def fetch(obj: RemoteObject, fd: int) -> str:
    """Download the whole object into `fd` and verify it: its sha256 (hex)."""
    download(obj, fd)
    digest = sha256_of(fd)
    check_sha256(obj.uri, digest, obj.stored_sha256, "its store's ChecksumSHA256")
    check_sha256(obj.uri, digest, obj.expected_sha256, "the URI's #sha256=")
    return digest


def download(obj: RemoteObject, fd: int, part_bytes: int | None = None, concurrency: int | None = None) -> None:
    """Parallel ranged GETs, each part written at its offset (one plain GET where the server ignores ranges)."""
    part_bytes = part_bytes or _setting(PART_BYTES_ENV, DEFAULT_PART_BYTES)
    concurrency = concurrency or _setting(CONCURRENCY_ENV, DEFAULT_CONCURRENCY)
    if obj.size is not None:
        os.ftruncate(fd, obj.size)
    with Progress(obj.name, obj.size) as progress:
        if obj.size == 0:
            return
        if not obj.ranges or obj.size is None:
            _fetch_part(obj, fd, 0, obj.size, progress)
            return
        parts = [(start, min(start + part_bytes, obj.size)) for start in range(0, obj.size, part_bytes)]
        with ThreadPoolExecutor(min(concurrency, len(parts)), thread_name_prefix="servelet-fetch") as pool:
            futures = [pool.submit(_fetch_part, obj, fd, start, end, progress) for start, end in parts]
            try:
                for future in as_completed(futures):
                    future.result()
            finally:
                for future in futures:
                    future.cancel()  # one part failed: the rest need not start


def _fetch_part(obj: RemoteObject, fd: int, start: int, end: int | None, progress: Progress) -> None:
    for attempt in range(1, PART_ATTEMPTS + 1):
        offset = start
        try:
            for chunk in obj.read(start, end):
                _write_at(fd, chunk, offset)
                offset += len(chunk)
                progress.add(len(chunk))
        except obj.transient as exc:
            progress.add(start - offset)
            if attempt == PART_ATTEMPTS:
                raise ArtifactError(f"{obj.uri}: reading bytes {start}-{end} failed {attempt} times: {exc}") from exc
            continue
        if end is not None and offset != end:
            raise ArtifactError(
                f"{obj.uri}: got {offset - start} bytes for the range {start}-{end - 1} instead of {end - start} "
                "(did the object change while it was being fetched?)"
            )
        return


def _write_at(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def resolve_remote_file(uri: str, cache: Path) -> Path:
    """The remote file in the cache, downloaded by the first caller on this machine (the others wait, then reuse)."""
    with open_remote(uri) as obj:
        folder = entry(cache, "downloads", obj.uri, obj.version, str(obj.size), obj.expected_sha256 or "")
        target = folder / obj.name
        with locked(folder):
            if target.is_file() and (obj.size is None or target.stat().st_size == obj.size):
                return target
            partial = folder / (obj.name + ".partial")
            fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                fetch(obj, fd)
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
            finally:
                os.close(fd)
            os.replace(partial, target)  # complete and verified, or not there at all
        return target


class Progress:
    """A byte progress bar on a terminal (nothing in logs), safe to update from the fetching threads."""

    def __init__(self, name: str, total: int | None):
        from tqdm import tqdm

        self._bar = tqdm(
            total=total, desc=name, unit="B", unit_scale=True, unit_divisor=1024, leave=False,
            disable=not sys.stderr.isatty(),
        )
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self._bar.update(n)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self._bar.close()


def _setting(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ArtifactError(f"{name}={raw!r}: expected a positive whole number")
    return value
