"""llama-cpp-python as its users get it, for bench/engine.py's `llama-stock` system.

On a CPU with AMX the installed bindings are servelet's AMX build, so the in-process `llama` system is not the
stock peer. This one is: the pinned sdist, unpatched, compiled natively with AMX off (stock AMX crashes), i.e.
`pip install llama-cpp-python` minus the crash. install/llama_build.py builds it (variant "stock", cached under a
key naming this CPU's instruction sets, about 8 minutes on 2 cores, once) and it is installed into a virtual
environment of its own in the bench cache, where bench/llama_sequential.py answers the requests in a worker.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from typing import IO

from llama_sequential import RequestTiming
from llama_server import bench_cache, llama_build

WORKER = Path(__file__).resolve().with_name("llama_sequential.py")


def stock_version() -> str:
    return llama_build.describe("stock").wheel_version


def stock_python() -> Path:
    """The stock environment's Python, made first (its wheel built or taken from the cache) when it is missing."""
    build = llama_build.describe("stock")
    venv = bench_cache() / f"venv-{build.wheel_version}"
    python = venv / "bin" / "python"
    if python.is_file() and llama_build.installed_version(str(python)) == build.wheel_version:
        return python
    wheel = llama_build.obtain(build)
    print(f"llama-stock: making {venv} with {wheel.name}", flush=True)
    shutil.rmtree(venv, ignore_errors=True)  # what an interrupted run left
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # The wheel pulls in its own requirements; numpy is pinned to this environment's, so only the bindings differ.
    numpy = f"numpy=={version('numpy')}"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", str(wheel), numpy], check=True)
    return python


def worker_command(python: Path, model: Path, threads: int, context_tokens: int) -> list[str]:
    return [str(python), str(WORKER), str(model), str(threads), str(context_tokens)]


class WorkerLlama:
    """Hands each batch to the worker and reads back its timings, taken there as the in-process system takes them."""

    def __init__(self, process: subprocess.Popen, log: IO[bytes]):
        self.process, self.log = process, log
        ready = self._reply()
        print(f"  llama-cpp-python {ready['ready']}: {ready['system_info']}", flush=True)

    def run_batch(self, prompts: tuple[str, ...], new_tokens: int) -> list[RequestTiming]:
        try:
            self.process.stdin.write(json.dumps({"prompts": list(prompts), "new_tokens": new_tokens}) + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            pass  # the worker is gone: the reply says why
        return [RequestTiming(**timing) for timing in self._reply()["timings"]]

    def _reply(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            self.process.wait(timeout=15)
            self.log.seek(0)
            tail = self.log.read().decode(errors="replace")[-3000:]
            raise RuntimeError(f"the stock Llama worker exited with status {self.process.returncode}:\n{tail}")
        return json.loads(line)
