"""Model URIs: a local path, `file://PATH`, or `package://NAME` (a model shipped as a PyPI package)."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote, urlparse

from .packages import resolve_package


class ArtifactError(ValueError):
    """The model URI cannot be resolved; the message says why and what would work."""


SCHEMES = ("package://", "file://", "a local path")


def cache_dir() -> Path:
    """servelet's cache folder: $SERVELET_CACHE_DIR, else $XDG_CACHE_HOME/servelet, else ~/.cache/servelet."""
    explicit = os.environ.get("SERVELET_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "servelet"


def resolve_model(uri: str, cache: Path | None = None) -> Path:
    """The local file a model URI names, fetching or assembling it into the cache once."""
    if not uri or not uri.strip():
        raise ArtifactError("the model URI is empty")
    parsed = urlparse(uri)
    if parsed.scheme == "package":
        return resolve_package(parsed.netloc + parsed.path, cache or cache_dir(), ArtifactError)
    if parsed.scheme == "file":
        return _existing(Path(unquote(parsed.path)), uri)
    if parsed.scheme and len(parsed.scheme) > 1:  # one letter would be a Windows drive
        raise ArtifactError(f"unsupported model URI scheme '{parsed.scheme}://' in {uri!r} (supported: {', '.join(SCHEMES)})")
    return _existing(Path(uri).expanduser(), uri)


def _existing(path: Path, uri: str) -> Path:
    if not path.is_file():
        raise ArtifactError(f"model file not found: {uri!r} ({path} is not a file)")
    return path.resolve()
