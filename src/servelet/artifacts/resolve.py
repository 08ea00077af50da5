"""Model URIs to a local file or folder the runtime opens: a path or `file://` (a file, a folder or an archive),
`package://NAME`, `s3://` and `http(s)://` (fetched once per machine into the cache), and `.tar.gz` archives from
any of them (unpacked once, safely). Any URI may end in `#sha256=HEX`, which the bytes must match."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote, urlparse

from .archives import is_archive, resolve_local_archive, resolve_remote_archive
from .cache import cache_dir, check_sha256, sha256_of, split_checksum
from .errors import ArtifactError, ArtifactMissing
from .packages import resolve_package
from .remote import REMOTE_SCHEMES, resolve_remote_file

SCHEMES = ("a local path", "file://", "package://", "s3://", "http(s)://")


def resolve_model(uri: str, cache: Path | None = None) -> Path:
    """The local file or folder a model URI names, fetching, assembling or unpacking it into the cache once."""
    if not uri or not uri.strip():
        raise ArtifactError("the model URI is empty")
    cache = cache or cache_dir()
    location, expected = split_checksum(uri)
    parsed = urlparse(location)
    if parsed.scheme in REMOTE_SCHEMES:
        return resolve_remote_archive(uri, cache) if is_archive(location) else resolve_remote_file(uri, cache)
    if parsed.scheme == "package":
        return _checked(resolve_package(parsed.netloc + parsed.path, cache), uri, expected)
    if parsed.scheme == "file":
        path = Path(unquote(parsed.path))
    elif parsed.scheme and len(parsed.scheme) > 1:  # one letter would be a Windows drive
        raise ArtifactError(f"unsupported model URI scheme '{parsed.scheme}://' in {uri!r} (supported: {', '.join(SCHEMES)})")
    else:
        path = Path(location).expanduser()
    if not path.exists():
        raise ArtifactMissing(f"model file not found: {uri!r} ({path} is not a file or a folder)")
    # abspath, not resolve(): /proc/self/fd/N (a model in memory) must stay that path, not its link target.
    path = Path(os.path.abspath(path))
    if path.is_file() and is_archive(path.name):
        return resolve_local_archive(path, uri, expected, cache)
    return _checked(path, uri, expected)


def _checked(path: Path, uri: str, expected: str | None) -> Path:
    """The path, once its bytes match the URI's #sha256= (when it has one)."""
    if expected is None:
        return path
    if not path.is_file():
        raise ArtifactError(f"{uri}: a #sha256= checksum verifies a file, and {path} is a folder")
    with open(path, "rb") as f:
        check_sha256(uri, sha256_of(f.fileno()), expected, "the URI's #sha256=")
    return path
