"""`.tar.gz` model archives in SageMaker's `model.tar.gz` layout (weights at the top, optional `code/inference.py`
and `code/requirements.txt`), unpacked once per machine into the cache.

Unpacking is safe: a member with an absolute path or a `..`, a link that is absolute or has a `..`, a device file,
or sizes over the limits is refused, naming the member and why. Links may only point down: checking where a `..`
leads is unsound (a later link changes what an earlier one resolves to, and os.path.realpath stops resolving past
PATH_MAX while the kernel does not), whereas downward links provably stay in the folder. The archive is unpacked
into a temporary folder beside its cache entry and renamed into place only when every member is in, so nothing is
written outside that folder and nothing half-unpacked is ever used.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse

from .cache import check_sha256, entry, locked, sha256_of, split_checksum
from .errors import ArtifactError
from .remote import RemoteObject, fetch, open_remote

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz")
MAX_TOTAL_ENV = "SERVELET_MAX_ARCHIVE_BYTES"
MAX_MEMBER_ENV = "SERVELET_MAX_ARCHIVE_MEMBER_BYTES"
DEFAULT_MAX_TOTAL_BYTES = 128 * 1024**3


@dataclass(frozen=True)
class ArchiveLimits:
    """The most an archive may unpack to, in all and per member (bytes)."""

    total_bytes: int
    member_bytes: int

    @classmethod
    def from_env(cls) -> ArchiveLimits:
        total = _limit(MAX_TOTAL_ENV, DEFAULT_MAX_TOTAL_BYTES)
        return cls(total, _limit(MAX_MEMBER_ENV, total))


def is_archive(uri: str) -> bool:
    location, _ = split_checksum(uri)
    path = urlparse(location).path if "://" in location else location
    return path.lower().endswith(ARCHIVE_SUFFIXES)


def resolve_remote_archive(uri: str, cache: Path) -> Path:
    """An s3:// or http(s):// archive, fetched and unpacked once per version of the object."""
    with open_remote(uri) as obj:
        folder = entry(cache, "archives", obj.uri, obj.version, obj.expected_sha256 or "")
        return _unpacked_once(folder, _stem(obj.name), uri, lambda: _downloaded(obj, folder))


def resolve_local_archive(path: Path, uri: str, expected_sha256: str | None, cache: Path) -> Path:
    """A local archive, unpacked once per content (its sha256)."""
    with open(path, "rb") as f:
        digest = sha256_of(f.fileno())
    check_sha256(uri, digest, expected_sha256, "the URI's #sha256=")
    folder = entry(cache, "archives", str(path), digest)
    return _unpacked_once(folder, _stem(path.name), uri, lambda: open(path, "rb"))


def _unpacked_once(folder: Path, name: str, origin: str, open_archive: Callable[[], AbstractContextManager[BinaryIO]]) -> Path:
    target = folder / name
    with locked(folder):
        if target.is_dir():
            return target
        for stale in folder.glob(".unpacking-*"):  # left by a process killed while unpacking (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=".unpacking-", dir=folder))
        try:
            with open_archive() as archive:
                unpack(archive, work, origin)
            work.chmod(0o755)  # mkdtemp's folder is private; the model folder is read like any other
            os.rename(work, target)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    return target


@contextmanager
def _downloaded(obj: RemoteObject, folder: Path):
    """The remote archive in an unnamed temporary file beside its cache entry (gone when closed)."""
    with tempfile.TemporaryFile(dir=folder) as f:
        fetch(obj, f.fileno())
        yield f


def unpack(archive: BinaryIO, into: Path, origin: str, limits: ArchiveLimits | None = None) -> None:
    """Unpack a (gzipped) tar into the folder `into`, checking each member before anything of it is written."""
    limits = limits or ArchiveLimits.from_env()
    total, current = 0, ""

    def admit(member: tarfile.TarInfo, destination: str) -> tarfile.TarInfo:
        nonlocal total, current
        total, current = total + (member.size if member.isreg() else 0), member.name
        why = _refusal(member, limits, total)
        if why is None:
            try:  # Python's own rules too: they also resolve links already unpacked
                return tarfile.data_filter(member, destination)
            except tarfile.FilterError as exc:
                why = str(exc)
        raise ArtifactError(f"{origin}: refused the archive member {member.name!r}: {why}")

    try:
        with tarfile.open(fileobj=archive, mode="r:*") as tar:
            tar.extractall(into, filter=admit)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise ArtifactError(f"{origin}: not a readable .tar.gz archive: {exc}") from None
    except OSError as exc:  # members that clash (a file, then a folder of that name; a link loop; no name), a full disk
        raise ArtifactError(f"{origin}: cannot unpack the archive member {current!r}: {exc.strerror or exc}") from None


def _refusal(member: tarfile.TarInfo, limits: ArchiveLimits, total: int) -> str | None:
    """Why the member may not be unpacked, or None."""
    name = member.name
    if name.startswith("/"):
        return "it has an absolute path"
    if ".." in name.split("/"):
        return "its path has a '..' component, which would put it outside the model folder"
    if member.issym() or member.islnk():
        kind = "symbolic link" if member.issym() else "hard link"
        if member.linkname.startswith("/"):
            return f"it is a {kind} to the absolute path {member.linkname!r}"
        if ".." in member.linkname.split("/"):
            return f"it is a {kind} to {member.linkname!r}, which could lead outside the model folder (links may only point down, without '..')"
    elif member.ischr() or member.isblk():
        return "it is a device file"
    elif not (member.isreg() or member.isdir()):
        return "it is not a file, a folder or a link"
    if member.isreg() and member.size > limits.member_bytes:
        return f"it is {member.size} bytes, over the limit of {limits.member_bytes} per member ({MAX_MEMBER_ENV})"
    if total > limits.total_bytes:
        return f"the members so far add up to {total} bytes, over the limit of {limits.total_bytes} ({MAX_TOTAL_ENV})"
    return None


def _stem(file_name: str) -> str:
    for suffix in ARCHIVE_SUFFIXES:
        if file_name.lower().endswith(suffix):
            stem = file_name[: -len(suffix)]
            return "model" if stem in ("", ".", "..") else stem  # '..tar.gz' must not name the cache entry's parent
    return file_name


def _limit(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise ArtifactError(f"{name}={raw!r}: expected a positive number of bytes")
    return int(raw)
