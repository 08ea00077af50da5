"""The instance process: the SageMaker hosting contract (`GET /ping`, `POST /invocations`) over the engine."""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from .. import __version__
from ..artifacts import resolve_model
from ..engine import Engine, EngineError, Finished, Generation, Token
from ..settings import InstanceSettings
from .schemas import InvocationRequest, describe

log = logging.getLogger("servelet.instance")

JSON_LINES = "application/jsonlines"
DISCONNECT_POLL_SECONDS = 0.25
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left; nobody reads it


class RequestError(Exception):
    def __init__(self, status: int, message: str, kind: str = "validation"):
        super().__init__(message)
        self.status, self.kind = status, kind


def error_response(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"code": status, "error_type": kind, "error": message}, status_code=status)


@dataclass
class InstanceState:
    engine: Engine | None = None
    failure: str | None = None


def create_app(settings: InstanceSettings, on_load_failure=None) -> FastAPI:
    """An app that loads its model in the background: `/ping` answers 503 until the engine is ready."""
    state = InstanceState()

    def load() -> Engine:
        path = resolve_model(settings.model)
        return Engine(path, settings.engine_config())

    async def load_in_background() -> None:
        try:
            state.engine = await asyncio.to_thread(load)
            log.info("model %s loaded; instance ready", settings.model)
        except Exception as exc:
            state.failure = f"{type(exc).__name__}: {exc}"
            log.error("could not load the model %s: %s", settings.model, state.failure)
            if on_load_failure:
                on_load_failure(state.failure)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        loader = asyncio.create_task(load_in_background())
        yield
        loader.cancel()
        if state.engine:
            state.engine.close()

    app = FastAPI(title="servelet instance", version=__version__, lifespan=lifespan)

    @app.exception_handler(RequestError)
    async def _request_error(_req: Request, exc: RequestError):
        return error_response(exc.status, str(exc), exc.kind)

    @app.exception_handler(EngineError)
    async def _engine_error(_req: Request, exc: EngineError):
        return error_response(exc.status_code, str(exc), type(exc).__name__)

    @app.get("/ping")
    async def ping():
        if state.engine is not None:
            return {"status": "healthy", "model": settings.model} | state.engine.occupancy()
        status = "failed" if state.failure else "loading"
        return JSONResponse({"status": status, "error": state.failure}, status_code=503)

    @app.get("/model")
    async def model_facts():
        """What a gateway needs to speak for this model: its name, limits and chat template."""
        engine = state.engine
        if engine is None:
            raise RequestError(503, state.failure or "the model is still loading", "unavailable")
        return {
            "uri": settings.model,
            "name": engine.model.name,
            "runtime": "llamacpp",
            "context_length": engine.max_model_len,
            "max_batch_size": settings.max_batch_size,
            "chat_template": engine.model.chat_template,
            "bos_token": engine.model.bos_text,
            "eos_token": engine.model.eos_text,
        }

    @app.post("/invocations")
    async def invocations(request: Request):
        engine = state.engine
        if engine is None:
            raise RequestError(503, state.failure or "the model is still loading; retry when /ping answers 200", "unavailable")
        body = await _read_json(request, settings.max_payload_bytes)
        try:
            invocation = InvocationRequest.model_validate(body)
        except ValidationError as exc:
            raise RequestError(422, describe(exc)) from None
        prompts = [invocation.inputs] if isinstance(invocation.inputs, str) else invocation.inputs
        if invocation.stream and len(prompts) != 1:
            raise RequestError(422, "inputs: stream takes a single input, not a list")
        generations = _submit_all(engine, prompts, invocation)
        if invocation.stream:
            return StreamingResponse(
                _json_lines(generations[0], prompts[0]),
                media_type=JSON_LINES,
                headers={"X-Accel-Buffering": "no", "Cache-Control": "no-cache"},
            )
        results = await _until_disconnect(request, _collect_all(generations), generations)
        if results is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        answers = [_answer(prompt, tokens, end, invocation.parameters.details) for prompt, (tokens, end) in zip(prompts, results)]
        return answers[0] if isinstance(invocation.inputs, str) else answers

    return app


async def _read_json(request: Request, limit: int):
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    # curl -d sends form encoding by default; its body is still the JSON the user typed.
    if content_type not in ("application/json", "text/json", "application/x-www-form-urlencoded", ""):
        raise RequestError(
            415, f"Content-Type {content_type!r} is not supported; send application/json", "unsupported_media_type"
        )
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"the request body has {declared} bytes; the limit is {limit}", "payload_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(413, f"the request body exceeds the limit of {limit} bytes", "payload_too_large")
    if not body:
        raise RequestError(400, "the request body is empty; send JSON like {\"inputs\": \"...\"}")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"the request body is not valid JSON: {exc}") from None


def _submit_all(engine: Engine, prompts: list[str], invocation: InvocationRequest) -> list[Generation]:
    """Submit every prompt or none: if one is refused, the ones already queued are cancelled."""
    generations: list[Generation] = []
    try:
        for prompt in prompts:
            generations.append(engine.submit(prompt, invocation.parameters, logprobs=invocation.stream))
    except EngineError:
        for g in generations:
            g.cancel()
        raise
    return generations


async def _collect_all(generations: list[Generation]):
    return await asyncio.gather(*(g.collect() for g in generations))


async def _until_disconnect(request: Request, work, generations: list[Generation]):
    """Await `work`; None (and the generations cancelled) if the client goes away first."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
            if done:
                return task.result()
            if await request.is_disconnected():
                return None
    finally:
        if not task.done():
            task.cancel()
            for g in generations:
                g.cancel()


def _token_json(token: Token) -> dict:
    return {"id": token.id, "text": token.text, "log_prob": token.logprob}


def _details(prompt: str, end: Finished) -> dict:
    s = end.stats
    return {
        "finish_reason": end.reason.value,
        "generated_tokens": s.generated_tokens,
        "inputs": prompt,
        "prompt_tokens": s.prompt_tokens,
        "time_to_first_token": round(s.time_to_first_token, 6),
        "tokens_per_second": round(s.tokens_per_second, 3),
    }


def _answer(prompt: str, tokens: list[Token], end: Finished, details: bool) -> dict:
    answer: dict = {"generated_text": end.text}
    if details:
        answer["details"] = _details(prompt, end) | {"tokens": [_token_json(t) for t in tokens]}
    return answer


async def _json_lines(generation: Generation, prompt: str):
    """One line per token; the last line also carries generated_text and details (LMI's format)."""
    try:
        async for token in generation:
            line: dict = {"token": _token_json(token)}
            end = generation.result
            if end is not None:
                line["generated_text"] = end.text
                line["details"] = _details(prompt, end)
            yield json.dumps(line) + "\n"
    except EngineError as exc:
        yield json.dumps({"error": str(exc), "error_type": type(exc).__name__}) + "\n"
