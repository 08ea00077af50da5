"""Multi-model endpoints: every model under a prefix, named per request by `X-Amzn-SageMaker-Target-Model`.

A model loads on its first request (concurrent first requests share one load) and stays while it is used;
when loading one more would pass the memory budget (SERVELET_MODEL_CACHE_BYTES, counted as the bytes of each
resolved artifact on disk), the least recently used idle models are closed first.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from starlette.responses import Response, StreamingResponse

from ..settings import InstanceSettings, SettingsError
from .base import Call, InvocationError, Runtime

log = logging.getLogger("servelet.multimodel")

TARGET_HEADER = "X-Amzn-SageMaker-Target-Model"


@dataclass
class LoadedModel:
    target: str
    runtime: Runtime
    size: int
    users: int = 0  # requests using it now: it is closed only when this is 0
    evicted: bool = False


class MultiModelRuntime(Runtime):
    name = "multi-model"

    def __init__(self, settings: InstanceSettings):
        self.settings = settings
        self.prefix = settings.model.rstrip("/") + "/"
        if "://" not in settings.model and not Path(settings.model).expanduser().is_dir():
            raise SettingsError(f"multi-model endpoint: the model prefix {settings.model!r} is not a folder")
        self.budget = settings.model_cache_bytes
        self.loaded: OrderedDict[str, LoadedModel] = OrderedDict()  # least recently used first
        self.loading: dict[str, asyncio.Task] = {}
        self.closing: set[asyncio.Task] = set()
        self.counts = {"loads": 0, "evictions": 0, "hits": 0, "misses": 0, "load_seconds": 0.0}

    async def invoke(self, call: Call) -> Response:
        model = await self.acquire(self.target(call.target_model))
        try:
            response = await model.runtime.invoke(call)
        except BaseException:
            self.release(model)
            raise
        if isinstance(response, StreamingResponse):  # in use until sending ends, however it ends
            response = ReleasingStream(response, lambda: self.release(model))
        else:
            self.release(model)
        return response

    def target(self, name: str | None) -> str:
        """The target model's name, refused (400) when it could reach outside the prefix."""
        if not name or not name.strip():
            raise InvocationError(400, f"this is a multi-model endpoint: name the model with the {TARGET_HEADER} header")
        path = PurePosixPath(name)
        if not path.parts or path.is_absolute() or ".." in path.parts or "\\" in name or "://" in name:  # "." is the prefix
            raise InvocationError(400, f"target model {name!r}: name a model under the prefix (no absolute path, no '..')")
        return name

    # -- the cache --------------------------------------------------------------------------------------------
    async def acquire(self, target: str) -> LoadedModel:
        """The loaded model, counted as in use; loaded first (once, whoever asks at the same time) if it is not.

        The hit or miss is counted once the wait is over, so a /ping that counts a request counts its load too."""
        hit = target in self.loaded
        try:
            while True:  # a model just loaded can be evicted before this request resumes: then load it again
                model = self.loaded.get(target)
                if model is not None:
                    model.users += 1
                    self.loaded.move_to_end(target)
                    return model
                task = self.loading.get(target)
                if task is None:
                    task = self.loading[target] = asyncio.create_task(self._load(target))
                    task.add_done_callback(lambda _t: self.loading.pop(target, None))
                await asyncio.shield(task)  # a caller that leaves does not cancel the others' load
        finally:
            self.counts["hits" if hit else "misses"] += 1

    async def _load(self, target: str) -> None:
        from ..artifacts import ArtifactError, ArtifactMissing, resolve_model
        from . import runtime_for

        uri = self.prefix + target
        started = time.monotonic()
        try:
            path = await asyncio.to_thread(resolve_model, uri)
        except ArtifactMissing:
            raise InvocationError(404, f"target model {target!r} not found under {self.prefix}", "not_found") from None
        except ArtifactError as exc:
            raise InvocationError(400, f"target model {target!r}: {exc}") from None
        size = disk_bytes(path)
        if size > self.budget:
            raise InvocationError(
                507, f"target model {target!r} has {size} bytes, more than the whole model cache "
                f"(SERVELET_MODEL_CACHE_BYTES={self.budget})", "model_too_large",
            )
        self._make_room(size)
        settings = self.settings.model_copy(update={"multi_model": False, "model": uri})
        try:
            runtime = await asyncio.to_thread(runtime_for, path, settings)
        except InvocationError:
            raise
        except Exception as exc:
            log.exception("target model %s could not load", target)
            raise InvocationError(500, f"target model {target!r} could not load: {type(exc).__name__}: {exc}", "model_error") from None
        seconds = time.monotonic() - started
        self.counts["loads"] += 1
        self.counts["load_seconds"] += seconds
        self._make_room(size)  # other loads may have finished meanwhile
        self.loaded[target] = LoadedModel(target, runtime, size)
        log.info("target model %s loaded (%d bytes, %.2f s)", target, size, seconds)

    def _make_room(self, size: int) -> None:
        """Evict least recently used models until `size` more bytes fit; those in use close when their requests end."""
        while self.loaded and self.used_bytes() + size > self.budget:
            _target, model = self.loaded.popitem(last=False)
            model.evicted = True
            self.counts["evictions"] += 1
            log.info("target model %s evicted (least recently used)", model.target)
            if model.users == 0:
                self._close(model)

    def release(self, model: LoadedModel) -> None:
        model.users -= 1
        if model.evicted and model.users == 0:
            self._close(model)

    def _close(self, model: LoadedModel) -> None:
        task = asyncio.get_running_loop().create_task(asyncio.to_thread(model.runtime.close))
        self.closing.add(task)
        task.add_done_callback(self.closing.discard)

    def used_bytes(self) -> int:
        return sum(model.size for model in self.loaded.values())

    # -- what the gateway reads ---------------------------------------------------------------------------------
    def facts(self) -> dict:
        return {"runtime": self.name, "task": None, "models": list(self.loaded)}

    def occupancy(self) -> dict:
        return {
            "running": sum(model.users for model in self.loaded.values()),
            "models_loaded": len(self.loaded),
            "model_bytes": self.used_bytes(),
            "model_cache_bytes": self.budget,
        } | {f"model_{name}": value for name, value in self.counts.items()}

    def close(self) -> None:
        for model in self.loaded.values():
            model.runtime.close()
        self.loaded.clear()


def disk_bytes(path: Path) -> int:
    """The bytes of a model file, or of every file in a model folder."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


class ReleasingStream(StreamingResponse):
    """A streamed answer that releases its model when sending ends: sent whole, failed, or the client gone (even
    before the first chunk, when the body's generator never starts and so never runs a `finally` of its own)."""

    def __init__(self, stream: StreamingResponse, release):
        super().__init__(stream.body_iterator, stream.status_code, dict(stream.headers), background=stream.background)
        self._release = release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()
