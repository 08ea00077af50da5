"""llama.cpp's own `llama-server`, built once from the llama.cpp vendored in the llama-cpp-python sdist we pin.

The build lives in servelet's cache (`~/.cache/servelet/bench/`), never in the repository; it takes about
7-10 minutes on 2 cores and is reused by every later run.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import version
from pathlib import Path

from servelet.artifacts import cache_dir

BINDINGS = "llama-cpp-python"
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    # The prebuilt web UI would be downloaded at configure time; the benchmark needs no UI.
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_CURL=OFF",
)
CONTEXT_PER_SLOT = 2048  # the context servelet gives each sequence by default


def bench_cache() -> Path:
    return cache_dir() / "bench"


def binary_path(bindings_version: str) -> Path:
    return bench_cache() / f"build-{bindings_version}" / "bin" / "llama-server"


def ensure_binary() -> Path:
    """The `llama-server` binary for the installed bindings' llama.cpp, built first if it is missing."""
    bindings_version = version(BINDINGS)
    binary = binary_path(bindings_version)
    if binary.is_file():
        return binary
    source = bench_cache() / f"src-{bindings_version}"
    if not (source / "vendor" / "llama.cpp").is_dir():
        _fetch_sdist(bindings_version, source)
    _build(source / "vendor" / "llama.cpp", binary.parent.parent)
    return binary


def command(binary: Path, model: Path, port: int, threads: int, parallel: int) -> list[str]:
    """How the benchmark runs the server: `parallel` slots of CONTEXT_PER_SLOT tokens each."""
    return [
        str(binary),
        "-m", str(model),
        "-t", str(threads),
        "-tb", str(threads),
        "--parallel", str(parallel),
        "--ctx-size", str(parallel * CONTEXT_PER_SLOT),
        "--no-webui",
        "--host", "127.0.0.1",
        "--port", str(port),
    ]


def _fetch_sdist(bindings_version: str, source: Path) -> None:
    print(f"llama-server: downloading the {BINDINGS} {bindings_version} sdist into {bench_cache()}", flush=True)
    bench_cache().mkdir(parents=True, exist_ok=True)
    spec = f"{BINDINGS}=={bindings_version}"
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", spec, "-d", str(bench_cache())]
    subprocess.run(pip, check=True)
    archive = next(bench_cache().glob(f"llama_cpp_python-{bindings_version}.tar.gz"))
    # Extract beside the target and rename, so an interrupted extraction never looks like a finished one.
    with tempfile.TemporaryDirectory(dir=bench_cache()) as scratch:
        with tarfile.open(archive) as sdist:
            sdist.extractall(scratch, filter="data")
        (top,) = Path(scratch).iterdir()
        top.rename(source)


def _build(llama_cpp_source: Path, build: Path) -> None:
    print(f"llama-server: building {llama_cpp_source} into {build} (about 7-10 minutes on 2 cores)", flush=True)
    subprocess.run(["cmake", "-S", str(llama_cpp_source), "-B", str(build), *CMAKE_OPTIONS], check=True)
    # cmake prints "[ NN%]" lines as it goes: that is the progress report.
    subprocess.run(["cmake", "--build", str(build), "-j2", "--target", "llama-server"], check=True)
