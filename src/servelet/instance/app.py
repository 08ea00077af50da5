"""The instance process: the SageMaker hosting contract (`GET /ping`, `POST /invocations`) over one runtime."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse

from .. import __version__, heap
from ..engine import EngineError
from ..redaction import redact
from ..runtimes import Call, InvocationError, Prepared, Runtime, load_runtime
from ..settings import InstanceSettings
from .channel import PATH as CHANNEL_PATH
from .channel_server import ChannelServer
from .contract import ASYNC_INVOCATION_HEADER

log = logging.getLogger("servelet.instance")


def error_response(status: int, message: str, kind: str, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse({"code": status, "error_type": kind, "error": message}, status_code=status, headers=headers)


@dataclass
class InstanceState:
    runtime: Runtime | None = None
    failure: str | None = None


def create_app(settings: InstanceSettings, on_load_failure=None, prepared: Prepared | None = None) -> FastAPI:
    """An app that loads its model in the background: `/ping` answers 503 until the runtime is ready. `prepared`:
    what the snapshot template this instance was forked from made of it already."""
    state = InstanceState()

    async def load_in_background() -> None:
        try:
            state.runtime = await asyncio.to_thread(load_runtime, settings, prepared)
            heap.settle()
            log.info("model %s loaded by the %s runtime; instance ready", settings.model, state.runtime.name)
        except Exception as exc:
            state.failure = redact(f"{type(exc).__name__}: {exc}")
            log.error("could not load the model %s: %s", settings.model, state.failure)
            if on_load_failure:
                on_load_failure(state.failure)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        loader = asyncio.create_task(load_in_background())
        yield
        loader.cancel()
        if state.runtime:
            await asyncio.to_thread(state.runtime.close)

    app = FastAPI(title="servelet instance", version=__version__, lifespan=lifespan)

    @app.exception_handler(InvocationError)
    async def _invocation_error(_req: Request, exc: InvocationError):
        return error_response(exc.status, str(exc), exc.kind, exc.retry_after)

    @app.exception_handler(EngineError)
    async def _engine_error(_req: Request, exc: EngineError):
        return error_response(exc.status_code, str(exc), type(exc).__name__)

    def ready_runtime() -> Runtime:
        if state.runtime is None:
            raise InvocationError(503, state.failure or "the model is still loading; retry when /ping answers 200", "unavailable")
        return state.runtime

    @app.get("/ping")
    async def ping():
        broken = state.runtime.failure() if state.runtime is not None else None
        if state.runtime is not None and broken is None:
            return {"status": "healthy", "model": redact(settings.model)} | state.runtime.occupancy()
        failure = broken or state.failure
        return JSONResponse({"status": "failed" if failure else "loading", "error": failure}, status_code=503)

    @app.get("/model")
    async def model_facts():
        """What a gateway needs to speak for this model: its runtime, task, name, limits and chat template."""
        shown = redact(settings.model)
        return {"uri": shown, "name": shown} | ready_runtime().facts()

    @app.post("/invocations")
    async def invocations(request: Request):
        runtime = ready_runtime()
        headers = request.headers
        call = Call(
            body=await _read_body(request, _body_limit(request, settings)),
            content_type=headers.get("content-type", "application/json"),
            accept=headers.get("accept"),
            custom_attributes=headers.get("x-amzn-sagemaker-custom-attributes"),
            target_model=headers.get("x-amzn-sagemaker-target-model"),
            is_disconnected=request.is_disconnected,
        )
        return await runtime.invoke(call)

    @app.websocket(CHANNEL_PATH)
    async def stream_channel(websocket: WebSocket):
        """Many /invocations calls over one WebSocket (instance/channel.py): how a gateway streams."""
        await ChannelServer(app, websocket).serve()

    return app


def _body_limit(request: Request, settings: InstanceSettings) -> int:
    """An async job's input may be larger than a real-time request (only the gateway sends the header: the
    instance's socket is its own)."""
    if ASYNC_INVOCATION_HEADER.lower() in request.headers:
        return max(settings.max_payload_bytes, settings.max_async_payload_bytes)
    return settings.max_payload_bytes


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise InvocationError(413, f"the request body has {declared} bytes; the limit is {limit}", "payload_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise InvocationError(413, f"the request body exceeds the limit of {limit} bytes", "payload_too_large")
    return bytes(body)
