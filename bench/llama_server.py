"""llama.cpp's own `llama-server`, built once from the llama.cpp vendored in the llama-cpp-python sdist we pin.

Two flavours, each built for this machine's CPU (the installed bindings' version carries servelet's build key,
which names the CPU's instruction sets, so a binary from another CPU is never reused):
- `stock`: the sdist as llama.cpp's users build it, natively, with AMX switched off (stock AMX code crashes on
  CPUs that have it; on CPUs without AMX the switch changes nothing);
- `patched`: servelet's patches and AMX choice (install/llama_build.py), the same source as servelet's engine.
The builds live in servelet's cache (`~/.cache/servelet/bench/`), never in the repository; each takes about
7-10 minutes on 2 cores and is reused by every later run.
"""

from __future__ import annotations

import importlib.util
import shutil
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
FLAVOURS = ("stock", "patched")

_spec = importlib.util.spec_from_file_location("llama_build", Path(__file__).resolve().parent.parent / "install" / "llama_build.py")
llama_build = sys.modules["llama_build"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
sys.modules[_spec.name] = llama_build  # dataclasses look their module up there while the class is made
_spec.loader.exec_module(llama_build)


def bench_cache() -> Path:
    return cache_dir() / "bench"


def binary_path(bindings_version: str, flavour: str) -> Path:
    return bench_cache() / f"build-{bindings_version}-{flavour}" / "bin" / "llama-server"


def ensure_binary(flavour: str = "stock") -> Path:
    """The `llama-server` binary of `flavour` for the installed bindings' llama.cpp, built first if it is missing."""
    bindings_version = version(BINDINGS)
    binary = binary_path(bindings_version, flavour)
    if binary.is_file():
        return binary
    public_version = bindings_version.split("+")[0]
    with tempfile.TemporaryDirectory(dir=_made(bench_cache())) as scratch:
        with tarfile.open(llama_build.fetch_sdist(public_version)) as sdist:
            sdist.extractall(scratch, filter="data")
        source = Path(scratch) / f"llama_cpp_python-{public_version}"
        amx_off = True
        if flavour == "patched":
            for patch in llama_build.PATCHES:
                subprocess.run(["patch", "-p1", "--forward", "--batch", "--quiet", "-i", str(patch)], cwd=source, check=True)
            amx_off = "+amx." not in bindings_version  # as the installed bindings were built
        flags = [f"-DCMAKE_C_FLAGS={llama_build.NO_AMX_COMPILE_FLAGS}",
                 f"-DCMAKE_CXX_FLAGS={llama_build.NO_AMX_COMPILE_FLAGS}"] if amx_off else []
        # A build stopped half-way left a CMake cache naming its own, deleted, source folder: start afresh.
        shutil.rmtree(binary.parent.parent, ignore_errors=True)
        _build(source / "vendor" / "llama.cpp", binary.parent.parent, flags)
    return binary


def _made(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


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


def _build(llama_cpp_source: Path, build: Path, flags: list[str]) -> None:
    print(f"llama-server: building {llama_cpp_source} into {build} {flags} (about 7-10 minutes on 2 cores)", flush=True)
    subprocess.run(["cmake", "-S", str(llama_cpp_source), "-B", str(build), *CMAKE_OPTIONS, *flags], check=True)
    # cmake prints "[ NN%]" lines as it goes: that is the progress report.
    subprocess.run(["cmake", "--build", str(build), "-j2", "--target", "llama-server"], check=True)
