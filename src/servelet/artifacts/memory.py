"""A remote model file fetched straight into memory: a Linux memfd, which llama.cpp (or anything that opens a
path) reads as `/proc/self/fd/N`, and which child processes inherit, so one copy in memory serves every instance."""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

from .archives import is_archive
from .errors import ArtifactError
from .remote import fetch, is_remote, open_remote

# Sealed once written: no instance that inherits the file can change the bytes the others read.
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


@dataclass
class InMemoryArtifact:
    """The verified bytes of a remote file in an anonymous, sealed memory file."""

    fd: int
    size: int
    sha256: str
    name: str

    @property
    def path(self) -> str:
        """A path to the same bytes, for this process and any child given `fd` (pass_fds keeps its number)."""
        return f"/proc/self/fd/{self.fd}"

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def fetch_into_memory(uri: str) -> InMemoryArtifact:
    """Fetch an s3:// or http(s):// file (parallel ranged GETs) into a memfd; size and checksum verified."""
    if not is_remote(uri):
        raise ArtifactError(f"{uri}: only s3:// and http(s):// files are fetched into memory")
    with open_remote(uri) as obj:
        fd = os.memfd_create(f"servelet:{obj.name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            digest = fetch(obj, fd)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
        except BaseException:
            os.close(fd)
            raise
        return InMemoryArtifact(fd, os.fstat(fd).st_size, digest, obj.name)


@dataclass
class Materialized:
    """A model ready for instances: open `path`, after inheriting `fds` (empty when `path` is a plain file)."""

    path: str
    fds: tuple[int, ...] = ()
    artifact: InMemoryArtifact | None = None

    def close(self) -> None:
        self.fds = ()  # the numbers may be reused by other files: no process may be started with them again
        if self.artifact is not None:
            self.artifact.close()


def shared_in_memory(uri: str) -> bool:
    """Whether `materialize` fetches this URI into memory: a remote single file (an archive is unpacked on disk)."""
    return is_remote(uri) and not is_archive(uri)


def materialize(uri: str, cache: Path | None = None) -> Materialized:
    """Once per machine: a remote single file into memory (its fd for the instances), anything else into the cache."""
    if shared_in_memory(uri):
        artifact = fetch_into_memory(uri)
        return Materialized(artifact.path, (artifact.fd,), artifact)
    from .resolve import resolve_model

    return Materialized(str(resolve_model(uri, cache)))
