"""The machine's model cache: one folder per artifact, keyed by what identifies its content, filled under a lock
so that instances starting together fetch or unpack it once."""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import ArtifactError

CHECKSUM_FRAGMENT = re.compile(r"#sha256=([0-9a-fA-F]{64})$")


def cache_dir() -> Path:
    """servelet's cache folder: $SERVELET_CACHE_DIR, else $XDG_CACHE_HOME/servelet, else ~/.cache/servelet."""
    explicit = os.environ.get("SERVELET_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "servelet"


def entry(cache: Path, kind: str, *identity: str) -> Path:
    """The folder of one cached artifact; a new identity (URI, ETag, checksum) gets a new folder."""
    key = hashlib.sha256("\n".join(identity).encode()).hexdigest()[:32]
    folder = cache / kind / key
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold the folder's lock: one process fills it, the others wait and then find it filled."""
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def split_checksum(uri: str) -> tuple[str, str | None]:
    """`URI#sha256=HEX` (pip's convention) -> (URI, hex digest); any other URI -> (URI, None)."""
    found = CHECKSUM_FRAGMENT.search(uri)
    if found is None:
        return uri, None
    return uri[: found.start()], found.group(1).lower()


def sha256_of(fd: int) -> str:
    """The sha256 of a whole file, read through a read-only mapping (no copy into Python)."""
    size = os.fstat(fd).st_size
    if size == 0:
        return hashlib.sha256().hexdigest()
    with mmap.mmap(fd, size, prot=mmap.PROT_READ) as view:
        return hashlib.sha256(view).hexdigest()


def check_sha256(uri: str, actual: str, expected: str | None, source: str) -> None:
    if expected is not None and actual != expected:
        raise ArtifactError(f"{uri}: checksum mismatch: its sha256 is {actual}, but {source} says {expected}")
