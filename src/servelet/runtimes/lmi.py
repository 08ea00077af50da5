"""LMI's text-generation contract over any token engine: `{"inputs", "parameters", "stream"}` in,
`{"generated_text"}` or JSON lines of tokens out.

The llama.cpp engine, the transformers text-generation runtime and vLLM all answer through this one module;
each provides a `TokenEngine`: `submit(prompt, params, logprobs=...)` returning an async iterator of `Token`
whose `.result` is the `Finished` event from the last token on, with `.cancel()` and `.collect()` (the shape of
`servelet.engine.Generation`).
"""

from __future__ import annotations

import asyncio
import json
from typing import Protocol

import orjson
from pydantic import ValidationError
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..engine import EngineError, Finished, GenerationParams, Token
from .base import (
    GENERATED_RATE_HEADER, PROMPT_RATE_HEADER, Call, ClientGone, InvocationError, Runtime, unless_disconnected,
)
from .lmi_schemas import InvocationRequest, describe

JSON_LINES = "application/jsonlines"
JSON_LINES_TYPES = (JSON_LINES, "application/x-jsonlines", "application/jsonl")
DEFAULT_LINES_IN_FLIGHT = 32  # for an engine that does not say its batch size
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left; nobody reads it
JSON_TYPES = ("application/json", "text/json", "application/x-www-form-urlencoded", "")


class TokenEngine(Protocol):
    def submit(self, prompt: str, params: GenerationParams, *, logprobs: bool = False): ...
    def occupancy(self) -> dict: ...
    def close(self) -> None: ...
    @property
    def failure(self) -> str | None: ...


class TextGenerationRuntime(Runtime):
    """A runtime whose model generates text token by token; subclasses build `engine` and say their facts."""

    task = "text-generation"

    def __init__(self, engine: TokenEngine):
        self.engine = engine

    def facts(self) -> dict:
        return {"runtime": self.name, "task": self.task}

    def occupancy(self) -> dict:
        return self.engine.occupancy()

    def failure(self) -> str | None:
        return self.engine.failure

    def close(self) -> None:
        self.engine.close()

    async def invoke(self, call: Call) -> Response:
        if call.media_type in JSON_LINES_TYPES:
            return await self._invoke_lines(call)
        invocation = parse_invocation(call)
        prompts = [invocation.inputs] if isinstance(invocation.inputs, str) else invocation.inputs
        if invocation.stream and len(prompts) != 1:
            raise InvocationError(422, "inputs: stream takes a single input, not a list")
        generations = submit_all(self.engine, prompts, invocation)
        if invocation.stream:
            return StreamingResponse(
                json_lines(generations[0], prompts[0]),
                media_type=JSON_LINES,
                headers={"X-Accel-Buffering": "no", "Cache-Control": "no-cache"},
            )
        results = await until_disconnect(call, collect_all(generations), generations)
        if results is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        answers = [answer(p, tokens, end, invocation.parameters.details) for p, (tokens, end) in zip(prompts, results)]
        if isinstance(invocation.inputs, str):
            return JSONResponse(answers[0], headers=rate_headers(results[0][1]))
        return JSONResponse(answers)  # a list's generations ran batched together: no one rate is theirs


    async def _invoke_lines(self, call: Call) -> Response:
        """A JSON-lines body (a batch transform's MultiRecord request): each line an LMI request, one answer line
        per request line, in order. Lines enter the engine as its batch has room (at most its max batch size in
        flight), so a body of thousands of lines is decoded batch after batch rather than refused as overload."""
        invocations = [parse_line(decoded, number) for number, decoded in request_lines(call.body)]
        room = asyncio.Semaphore(getattr(getattr(self.engine, "config", None), "max_batch_size", DEFAULT_LINES_IN_FLIGHT))

        async def answer_line(invocation: InvocationRequest) -> bytes:
            prompts = [invocation.inputs] if isinstance(invocation.inputs, str) else invocation.inputs
            async with room:
                generations = submit_all(self.engine, prompts, invocation)
                try:
                    results = await collect_all(generations)
                except BaseException:
                    for generation in generations:
                        generation.cancel()
                    raise
            answers = [answer(p, tokens, end, invocation.parameters.details) for p, (tokens, end) in zip(prompts, results)]
            return orjson.dumps(answers[0] if isinstance(invocation.inputs, str) else answers) + b"\n"

        lines = await until_disconnect(call, asyncio.gather(*(answer_line(i) for i in invocations)), [])
        if lines is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return Response(b"".join(lines), media_type=JSON_LINES)


def request_lines(body: bytes) -> list[tuple[int, object]]:
    """The non-empty lines of a JSON-lines body, numbered from 1 and decoded; 400 naming a line that is not JSON,
    or when there is none."""
    lines = []
    for number, line in enumerate(body.splitlines(), 1):
        if not line.strip():
            continue
        try:
            lines.append((number, json.loads(line)))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise InvocationError(400, f"line {number} is not valid JSON: {exc}") from None
    if not lines:
        raise InvocationError(400, "the request body has no JSON line; send one request per line")
    return lines


def parse_line(decoded: object, number: int) -> InvocationRequest:
    try:
        invocation = InvocationRequest.model_validate(decoded)
    except ValidationError as exc:
        raise InvocationError(422, f"line {number}: {describe(exc)}") from None
    if invocation.stream:
        raise InvocationError(422, f"line {number}: stream is not taken in a JSON-lines request")
    return invocation


def parse_invocation(call: Call) -> InvocationRequest:
    try:
        return InvocationRequest.model_validate(read_json(call))
    except ValidationError as exc:
        raise InvocationError(422, describe(exc)) from None


def read_json(call: Call):
    """The body as JSON; 415 for another content type, 400 for an empty or broken body."""
    # curl -d sends form encoding by default; its body is still the JSON the user typed.
    if call.media_type not in JSON_TYPES:
        raise InvocationError(
            415, f"Content-Type {call.media_type!r} is not supported; send application/json", "unsupported_media_type"
        )
    if not call.body:
        raise InvocationError(400, "the request body is empty; send JSON like {\"inputs\": \"...\"}")
    try:
        return json.loads(call.body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested too deep
        raise InvocationError(400, f"the request body is not valid JSON: {exc}") from None


def submit_all(engine: TokenEngine, prompts: list[str], invocation: InvocationRequest) -> list:
    """Submit every prompt or none: if one is refused, the ones already queued are cancelled."""
    generations = []
    try:
        for prompt in prompts:
            generations.append(engine.submit(prompt, invocation.parameters, logprobs=invocation.stream))
    except EngineError:
        for g in generations:
            g.cancel()
        raise
    return generations


async def collect_all(generations: list):
    return await asyncio.gather(*(g.collect() for g in generations))


async def until_disconnect(call: Call, work, generations: list):
    """Await `work`; None (and the generations cancelled) if the client goes away first."""
    try:
        return await unless_disconnected(call, work)
    except (ClientGone, asyncio.CancelledError) as stopped:
        for g in generations:
            g.cancel()
        if isinstance(stopped, asyncio.CancelledError):
            raise
        return None


def token_json(token: Token) -> dict:
    return {"id": token.id, "text": token.text, "log_prob": token.logprob}


def details(prompt: str, end: Finished) -> dict:
    s = end.stats
    return {
        "finish_reason": end.reason.value,
        "generated_tokens": s.generated_tokens,
        "inputs": prompt,
        "prompt_tokens": s.prompt_tokens,
        "cached_tokens": s.cached_tokens,  # of prompt_tokens, reused from the prefix cache rather than prefilled
        "draft_tokens": s.draft_tokens,  # proposed by prompt lookup (speculative decoding) ...
        "accepted_draft_tokens": s.accepted_draft_tokens,  # ... and confirmed by the model
        "time_to_first_token": round(s.time_to_first_token, 6),
        "tokens_per_second": round(s.tokens_per_second, 3),  # LMI's name for the generated tokens' rate
        "prompt_tokens_per_second": round(s.prompt_tokens_per_second, 3),
        "generated_tokens_per_second": round(s.tokens_per_second, 3),
    }


def rate_headers(end: Finished) -> dict[str, str]:
    """The two rates users compare, for clients that do not ask for `details` (and for the gateway's metrics)."""
    return {
        PROMPT_RATE_HEADER: f"{end.stats.prompt_tokens_per_second:.3f}",
        GENERATED_RATE_HEADER: f"{end.stats.tokens_per_second:.3f}",
    }


def answer(prompt: str, tokens: list[Token], end: Finished, with_details: bool) -> dict:
    result: dict = {"generated_text": end.text}
    if with_details:
        result["details"] = details(prompt, end) | {"tokens": [token_json(t) for t in tokens]}
    return result


async def json_lines(generation, prompt: str):
    """One line per token; the last line also carries generated_text and details (LMI's format)."""
    try:
        async for token in generation:
            line: dict = {"token": token_json(token)}
            end = generation.result
            if end is not None:
                line["generated_text"] = end.text
                line["details"] = details(prompt, end)
            yield orjson.dumps(line) + b"\n"
    except EngineError as exc:
        yield orjson.dumps({"error": str(exc), "error_type": type(exc).__name__}) + b"\n"
