"""`package://NAME`: a model shipped as a PyPI package.

Two shapes: a package with `assemble(output_path)` builds one file, assembled once per machine into the cache and
verified by the package's checksum (later resolutions trust a sidecar that records the checksum with the file's
size and mtime); a package with `get_model_path()` already holds the model (a folder or a file) in site-packages.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
from pathlib import Path

from .cache import locked, sha256_of
from .errors import ArtifactError


def resolve_package(name: str, cache: Path) -> Path:
    name = name.strip("/")
    module_name = name.replace("-", "_")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise ArtifactError(f"package://{name}: the Python package '{name}' is not installed (pip install {name})") from None
    if callable(getattr(module, "assemble", None)):
        return _assembled(name, module, cache)
    if callable(getattr(module, "get_model_path", None)):
        path = Path(module.get_model_path())
        if not path.exists():
            raise ArtifactError(f"package://{name}: get_model_path() names {path}, which does not exist")
        return path.resolve()
    raise ArtifactError(
        f"package://{name}: the package has no assemble() and no get_model_path() function, so it does not ship a model"
    )


def _assembled(name: str, module, cache: Path) -> Path:
    try:
        version = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    file_name = getattr(module, "MODEL_NAME", None) or f"{module.__name__}.bin"
    expected = getattr(module, "EXPECTED_SHA256", None)

    folder = cache / "packages" / name / version
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / file_name
    sidecar = folder / (file_name + ".verified.json")
    with locked(folder):  # instances starting together assemble it once
        if _verified(target, sidecar, expected):
            return target
        partial = folder / (file_name + ".partial")
        partial.unlink(missing_ok=True)
        module.assemble(partial)
        with open(partial, "rb") as f:
            digest = sha256_of(f.fileno())
        if expected and digest != expected:
            partial.unlink(missing_ok=True)
            raise ArtifactError(f"package://{name}: the assembled file's sha256 {digest} is not the expected {expected}")
        os.replace(partial, target)
        stat = target.stat()
        sidecar.write_text(json.dumps({"sha256": digest, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}))
    return target


def _verified(target: Path, sidecar: Path, expected: str | None) -> bool:
    try:
        record = json.loads(sidecar.read_text())
        stat = target.stat()
    except (OSError, ValueError):
        return False
    same_file = record.get("size") == stat.st_size and record.get("mtime_ns") == stat.st_mtime_ns
    return same_file and (expected is None or record.get("sha256") == expected)
