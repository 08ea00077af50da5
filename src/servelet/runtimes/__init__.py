"""Runtimes: what serves a model inside an instance (see base.py for the seam).

Each runtime module has `load(path, settings) -> Runtime`; modules load on first use, so an instance that serves a
GGUF never imports PyTorch and one that serves a Hugging Face folder never loads llama.cpp.
"""

from __future__ import annotations

from dataclasses import dataclass
import logging
from importlib import import_module
from pathlib import Path

from ..settings import InstanceSettings, SettingsError
from .base import Call, InvocationError, Runtime

__all__ = [
    "Call", "InvocationError", "NotSnapshottable", "Prepared", "Runtime", "choose_runtime", "load_runtime",
    "prepare_runtime", "runtime_for",
]

log = logging.getLogger("servelet.runtimes")

GGUF_MAGIC = b"GGUF"
HANDLER_SCRIPTS = ("code/inference.py", "inference.py")
# Settings in which instances forked from one template may differ: none of them shapes what the template prepared.
PER_INSTANCE = {"socket", "host", "port", "threads", "access_log"}


class NotSnapshottable(Exception):
    """The model's runtime cannot be prepared in a template and forked: its instances start cold."""


@dataclass
class Prepared:
    """What a snapshot template made before forking: the runtime chosen, its modules imported, and the runtime's
    own start (a llama.cpp model with its context open) where it has one that runs no thread."""

    settings: InstanceSettings
    kind: str
    path: Path
    state: object | None = None

    def fits(self, settings: InstanceSettings) -> bool:
        """Whether an instance with `settings` may use it: the same settings, but for where it listens and its
        threads."""
        return not self.differences(settings)

    def differences(self, settings: InstanceSettings) -> list[str]:
        mine, theirs = self.settings.model_dump(exclude=PER_INSTANCE), settings.model_dump(exclude=PER_INSTANCE)
        return sorted(name for name in mine if mine[name] != theirs.get(name))


def prepare_runtime(settings: InstanceSettings) -> Prepared:
    """Everything of an instance's start that its siblings share, for a template to do once; raises
    NotSnapshottable for a runtime that starts processes or threads of its own, or loads models per request."""
    if settings.multi_model:
        raise NotSnapshottable("a multi-model endpoint loads its models per request, after the instance started")
    from ..artifacts import resolve_model

    kind, path = choose_runtime(resolve_model(settings.model), settings)
    if kind == "vllm":
        raise NotSnapshottable("vLLM starts processes and threads of its own while it loads")
    module = import_module(f".{kind}", __name__)
    prepare = getattr(module, "prepare", None)
    return Prepared(settings, kind, path, prepare(path, settings) if prepare else None)


def load_runtime(settings: InstanceSettings, prepared: Prepared | None = None) -> Runtime:
    """The runtime for the instance's model URI (a multi-model cache when the URI is a prefix of models); from
    what its template `prepared`, when the instance was forked from one."""
    if prepared is not None:
        if prepared.fits(settings):
            module = import_module(f".{prepared.kind}", __name__)
            if prepared.state is None:
                return module.load(prepared.path, settings)
            return module.load(prepared.path, settings, prepared.state)
        log.warning("the template's preparation does not fit this instance's settings (%s differ): loading anew",
                    ", ".join(prepared.differences(settings)))
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
