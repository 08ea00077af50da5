"""Runtimes: what serves a model inside an instance (see base.py for the seam).

Each runtime module has `load(path, settings) -> Runtime`; modules load on first use, so an instance that serves a
GGUF never imports PyTorch and one that serves a Hugging Face folder never loads llama.cpp.
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path

from ..settings import InstanceSettings, SettingsError
from .base import Call, InvocationError, Runtime

__all__ = ["Call", "InvocationError", "Runtime", "choose_runtime", "load_runtime", "runtime_for"]

GGUF_MAGIC = b"GGUF"
HANDLER_SCRIPTS = ("code/inference.py", "inference.py")


def load_runtime(settings: InstanceSettings) -> Runtime:
    """The runtime for the instance's model URI (a multi-model cache when the URI is a prefix of models)."""
    if settings.multi_model:
        from .multimodel import MultiModelRuntime

        return MultiModelRuntime(settings)
    from ..artifacts import resolve_model

    return runtime_for(resolve_model(settings.model), settings)


def runtime_for(path: Path, settings: InstanceSettings) -> Runtime:
    kind, path = choose_runtime(path, settings)
    return import_module(f".{kind}", __name__).load(path, settings)


def choose_runtime(path: Path, settings: InstanceSettings) -> tuple[str, Path]:
    """Which runtime serves the artifact at `path` (and the path it should open): the setting, else its shape."""
    if settings.runtime != "auto":
        return settings.runtime, path
    if settings.rolling_batch == "vllm":
        return "vllm", path
    if path.is_file():
        if _is_gguf(path):
            return "llamacpp", path
        raise SettingsError(f"{settings.model}: {path.name} is not a GGUF file, and no runtime was named (set SERVELET_RUNTIME)")
    if any((path / script).is_file() for script in HANDLER_SCRIPTS):
        return "handler", path
    if (path / "config.json").is_file():
        return "transformers", path
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return "llamacpp", ggufs[0]
    raise SettingsError(
        f"{settings.model}: cannot tell which runtime serves this folder: it has no code/inference.py (handler), "
        f"no config.json (transformers) and {len(ggufs)} .gguf files (llamacpp needs exactly one); set SERVELET_RUNTIME"
    )


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC
