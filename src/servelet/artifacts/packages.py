"""`package://NAME`: a model shipped as a PyPI package that exposes `assemble(output_path)`.

The file is assembled once per machine into the cache and verified by the package's checksum; later
resolutions trust a sidecar that records the checksum with the file's size and mtime.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import importlib.metadata
import json
import os
from pathlib import Path


def resolve_package(name: str, cache: Path, error: type[Exception]) -> Path:
    name = name.strip("/")
    module_name = name.replace("-", "_")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise error(f"package://{name}: the Python package '{name}' is not installed (pip install {name})") from None
    assemble = getattr(module, "assemble", None)
    if not callable(assemble):
        raise error(f"package://{name}: the package has no assemble() function, so it does not ship a model")
    try:
        version = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    file_name = getattr(module, "MODEL_NAME", None) or f"{module_name}.bin"
    expected = getattr(module, "EXPECTED_SHA256", None)

    folder = cache / "packages" / name / version
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / file_name
    sidecar = folder / (file_name + ".verified.json")
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # instances starting together assemble it once
        if _verified(target, sidecar, expected):
            return target
        partial = folder / (file_name + ".partial")
        partial.unlink(missing_ok=True)
        assemble(partial)
        digest = _sha256(partial)
        if expected and digest != expected:
            partial.unlink(missing_ok=True)
            raise error(f"package://{name}: the assembled file's sha256 {digest} is not the expected {expected}")
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
