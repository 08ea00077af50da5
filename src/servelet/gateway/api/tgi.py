"""Text Generation Inference's API on the endpoint `default`: `POST /generate`, `POST /generate_stream`, `GET /info`.

Bodies and answers have TGI's shapes, so `huggingface_hub.InferenceClient(model=<gateway URL>)` works unchanged (it
posts to `/`, TGI's compat route, with `stream` in the body). `POST /generate` also takes the QA body
`{"question", "context"}`, told apart by its fields, and answers as `POST /question` does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ... import __version__
from ...control.endpoints import DEFAULT_ENDPOINT
from ...engine.params import MAX_STOP_SEQUENCES
from ...errors import GatewayError, NoReadyInstance, Unprocessable
from .. import framing
from ..disconnect import unless_disconnected
from ..errors import error_format
from ..services import Services, json_body, note_endpoint, parse, read_json, services
from ..textgen import Completion, Token
from . import qa

FinishReason = Literal["length", "eos_token", "stop_sequence"]


# -- errors: {"error", "error_type"}, which huggingface_hub turns into ValidationError, OverloadedError, ... -----
def tgi_error(error: GatewayError) -> dict:
    return {"error": error.message, "error_type": "generation" if error.kind == "model_error" else error.kind}


def render_tgi_error(error: GatewayError) -> Response:
    return JSONResponse(tgi_error(error), status_code=error.status)


as_tgi = error_format("tgi", render_tgi_error)  # also called by POST /, which it shares with the SageMaker control API
router = APIRouter(tags=["TGI"], dependencies=[Depends(as_tgi)])


# -- requests -------------------------------------------------------------------------------------
# TGI parameters servelet cannot honour: accepted only with a value that changes nothing, refused otherwise
# (ignoring them would hand back something other than what was asked for).
NEUTRAL: dict[str, tuple[tuple, str]] = {
    "truncate": ((None,), "truncating the prompt is not supported; send a shorter prompt"),
    "watermark": ((False, None), "watermarking is not supported"),
    "best_of": ((None, 1), "only one sequence is generated per request"),
    "decoder_input_details": ((False, None), "prompt-token details (prefill) are not reported"),
    "top_n_tokens": ((None, 0), "the most likely alternative tokens are not reported"),
    "typical_p": ((None, 1.0), "typical sampling is not supported; use top_p or top_k"),
    "grammar": ((None,), "constrained generation (grammar) is not supported"),
    "adapter_id": ((None,), "adapters are not supported"),
}
# What the instance takes (LMI's names); it checks the ranges and names the parameter when one is out of range.
FORWARDED = {
    "max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "frequency_penalty", "do_sample", "seed",
    "stop", "ignore_eos", "skip_special_tokens",
}


class TGIParameters(BaseModel):
    """TGI's `parameters`; unknown names are refused, not ignored, and so are NaN and infinities."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    max_new_tokens: int | None = Field(None, description="Tokens to generate at most.")
    temperature: float | None = Field(None, description="0 or unset with do_sample false means greedy.")
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    do_sample: bool = False
    seed: int | None = Field(None, description="Makes sampling repeatable.")
    stop: list[str] = Field(default_factory=list, description=f"Up to {MAX_STOP_SEQUENCES} stop sequences.")
    details: bool = Field(False, description="Answer finish_reason, token counts and each token's log-prob.")
    ignore_eos: bool = Field(False, description="Not TGI's: LMI's and vLLM's, to generate exactly max_new_tokens.")
    skip_special_tokens: bool = Field(
        True, description="Not TGI's: vLLM's. false shows special tokens (markers like <start_of_image>) in the text.",
    )
    return_full_text: bool | None = Field(None, description="Prepend the prompt to generated_text.")
    truncate: int | None = Field(None, description="Not supported: null only.")
    watermark: bool | None = Field(False, description="Not supported: false only.")
    best_of: int | None = Field(None, description="null or 1.")
    decoder_input_details: bool | None = Field(False, description="Not supported: false only.")
    top_n_tokens: int | None = Field(None, description="null or 0.")
    typical_p: float | None = Field(None, description="null or 1.0.")
    frequency_penalty: float | None = Field(None, description="Lowers a token's logit by this per earlier use.")
    grammar: dict | None = Field(None, description="Not supported: null only.")
    adapter_id: str | None = Field(None, description="Not supported: null only.")

    @field_validator(*NEUTRAL)
    @classmethod
    def _changes_nothing(cls, value, info):
        accepted, why = NEUTRAL[info.field_name]
        # `0 in (False,)` is true in Python; compare types too so best_of=True or watermark=0 stay refused.
        if not any(value is a or (type(value) is type(a) and value == a) for a in accepted):
            shown = " or ".join("null" if a is None else str(a).lower() for a in accepted)
            raise ValueError(f"{why} (send {shown}, or leave it out)")
        return value

    def for_instance(self) -> dict:
        parameters = self.model_dump(include=FORWARDED, exclude_none=True)
        if self.stop:  # TGI's text keeps the stop sequence that ended it (OpenAI's and LMI's do not)
            parameters["include_stop_str_in_output"] = True
        return parameters


class TGIRequest(BaseModel):
    """TGI's generate body: a prompt and its parameters; `stream: true` answers as /generate_stream does."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"inputs": "The capital of France is", "parameters": {"max_new_tokens": 8}}]},
    )

    inputs: str = Field(description="The prompt.")
    parameters: TGIParameters = Field(default_factory=TGIParameters)
    stream: bool = Field(False, description="Answer server-sent events, as POST /generate_stream does.")

    @field_validator("inputs")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value:
            raise ValueError("inputs must not be empty")
        return value


EXPECTED = 'a TGI body {"inputs": "...", "parameters": {...}} or a question body {"question": "...", "context": "..."}'


def generate_body(data) -> TGIRequest | qa.QuestionRequest:
    """Tell the two bodies of /generate apart by their fields."""
    if not isinstance(data, dict):
        raise Unprocessable(f"expected {EXPECTED}; got a JSON {type(data).__name__}")
    question = "question" in data or "context" in data
    if "inputs" in data and question:
        raise Unprocessable("send either inputs (a TGI body) or question and context (a question body), not both")
    if "inputs" in data:
        return parse(TGIRequest, data)
    if question:
        return parse(qa.QuestionRequest, data)
    fields = ", ".join(map(str, data)) or "none"
    raise Unprocessable(f"expected {EXPECTED}; got the fields: {fields}")


# -- answers (TGI's shapes) -----------------------------------------------------------------------
class TGIToken(BaseModel):
    id: int
    text: str
    logprob: float | None
    special: bool = Field(description="True for the end-of-sequence token (its text is empty).")


class Details(BaseModel):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None = Field(description="The seed sent in the parameters, if any.")
    prefill: list[TGIToken] = Field(default_factory=list, description="Always empty: prefill details are not reported.")
    tokens: list[TGIToken]


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = Field(None, description="Present when parameters.details is true.")


class StreamDetails(BaseModel):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None
    input_length: int


class StreamResponse(BaseModel):
    """One server-sent event per token; the last one also carries generated_text and details."""

    index: int
    token: TGIToken
    generated_text: str | None = None
    details: StreamDetails | None = None


def _token(token: Token, completion: Completion | None = None) -> TGIToken:
    special = token.last and completion is not None and completion.finish_reason == "eos_token"
    return TGIToken(id=token.id, text=token.text, logprob=token.logprob, special=special)


def _full_text(body: TGIRequest, completion: Completion) -> str:
    return body.inputs + completion.text if body.parameters.return_full_text else completion.text


def generate_response(body: TGIRequest, completion: Completion) -> dict:
    """A GenerateResponse; as TGI does, `details` is left out unless asked for."""
    answer: dict = {"generated_text": _full_text(body, completion)}
    if body.parameters.details:
        answer["details"] = Details(
            finish_reason=completion.finish_reason,
            generated_tokens=completion.generated_tokens,
            seed=body.parameters.seed,
            tokens=[_token(t, completion) for t in completion.tokens],
        ).model_dump()
    return answer


def token_event(index: int, token: Token) -> dict:
    """A StreamResponse for a token before the last, built as a dict: the values come checked from the instance,
    and building the pydantic models took ~4 us of gateway CPU per token (0.3 us as a dict)."""
    token_fields = {"id": token.id, "text": token.text, "logprob": token.logprob, "special": False}
    return {"index": index, "token": token_fields, "generated_text": None, "details": None}


def final_event(index: int, token: Token, body: TGIRequest, completion: Completion) -> StreamResponse:
    details = StreamDetails(
        finish_reason=completion.finish_reason,
        generated_tokens=completion.generated_tokens,
        seed=body.parameters.seed,
        input_length=completion.prompt_tokens,
    )
    return StreamResponse(
        index=index, token=_token(token, completion), generated_text=_full_text(body, completion), details=details
    )


# Each event's `data` is a StreamResponse: documented as FastAPI documents its own SSE routes (`itemSchema`).
# Beside an `itemSchema`, `schema` describes the whole stream as an array of events (OpenAPI 3.2); FastAPI's
# default for a non-JSON response class, a string, would tell a schema-driven client that no event is valid.
EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": {"$ref": "#/components/schemas/StreamResponse"},
        }
    },
}
EVENTS = {"itemSchema": EVENT, "schema": {"type": "array", "items": EVENT}}


class EventStream(framing.ClosingStreamingResponse):
    """Server-sent events, documented under their media type in the OpenAPI spec."""

    media_type = framing.SSE


async def _prepend(first, rest: AsyncIterator) -> AsyncIterator:
    """`first`, then the rest of the stream; closing this closes the stream (and so the generation)."""
    async with aclosing(rest):
        yield first
        async for item in rest:
            yield item


async def stream_events(
    items: AsyncIterator[Token | Completion], body: TGIRequest, request: Request
) -> AsyncIterator[bytes]:
    """TGI's server-sent events; the last token is held until its Completion, which follows at once."""
    index, last = 0, None
    async with aclosing(items):
        try:
            async for item in items:
                if isinstance(item, Token):
                    index += 1
                    if item.last:
                        last = item
                    else:
                        yield framing.sse(token_event(index, item))
                else:
                    note_endpoint(request, DEFAULT_ENDPOINT, item.variant)
                    yield framing.sse(final_event(index, last, body, item).model_dump())
        except GatewayError as exc:
            yield framing.sse(tgi_error(exc))  # after the stream started, TGI sends a failure as one last event


# -- routes ---------------------------------------------------------------------------------------
async def generate_text(request: Request, hub: Services, body: TGIRequest) -> Response:
    note_endpoint(request, DEFAULT_ENDPOINT)
    work = hub.textgen.complete(DEFAULT_ENDPOINT, body.inputs, body.parameters.for_instance())
    completion = await unless_disconnected(request, work)
    note_endpoint(request, DEFAULT_ENDPOINT, completion.variant)
    return JSONResponse(generate_response(body, completion))


async def stream_text(request: Request, hub: Services, body: TGIRequest) -> Response:
    """Wait for the first token before answering 200, so a refused request still gets its 4xx status."""
    note_endpoint(request, DEFAULT_ENDPOINT)
    items = hub.textgen.stream(DEFAULT_ENDPOINT, body.inputs, body.parameters.for_instance())
    first = await unless_disconnected(request, items.__anext__())
    events = stream_events(_prepend(first, items), body, request)
    return EventStream(
        events, headers=framing.UNBUFFERED, keepalive=framing.SSE_KEEPALIVE, keepalive_seconds=hub.settings.keepalive_seconds
    )


GENERATE_DOC = """TGI's generate: `{"inputs", "parameters"}` → `{"generated_text", "details"?}`.

Also takes `{"question", "context"}` and answers `{"score", "start", "end", "answer"}` as `POST /question` does.
`"stream": true` answers server-sent events as `POST /generate_stream` does."""


@router.post(
    "/generate",
    summary="Generate text (TGI), or answer a question from a context",
    description=GENERATE_DOC,
    response_model=GenerateResponse | qa.AnswerSpan,
    openapi_extra=json_body(TGIRequest, qa.QuestionRequest),
)
async def generate(request: Request, hub: Services = Depends(services)):
    body = generate_body(await read_json(request, hub.settings))
    if isinstance(body, qa.QuestionRequest):
        return JSONResponse(await qa.answer(request, hub, body))
    if body.stream:
        return await stream_text(request, hub, body)
    return await generate_text(request, hub, body)


async def compat_generate(request: Request, hub: Services) -> Response:
    """TGI's compat route `POST /` (what `huggingface_hub.InferenceClient(model=<URL>)` posts to): generate, or
    stream when the body says `stream: true`. The route is `sagemaker_control.post_root`, which shares the path."""
    body = parse(TGIRequest, await read_json(request, hub.settings))
    return await (stream_text if body.stream else generate_text)(request, hub, body)


@router.post(
    "/generate_stream",
    summary="Generate text as server-sent events (TGI)",
    description="One `data:` event per token (`StreamResponse`); the last also carries generated_text and details.",
    response_class=EventStream,
    response_model=StreamResponse,  # only to list the event's schema, which EVENTS points to
    responses={200: {"content": {framing.SSE: EVENTS}}},
    openapi_extra=json_body(TGIRequest),
)
async def generate_stream(request: Request, hub: Services = Depends(services)):
    body = parse(TGIRequest, await read_json(request, hub.settings))
    return await stream_text(request, hub, body)


@router.get("/info", summary="The model and its limits (TGI's Info)")
async def info(hub: Services = Depends(services)):
    facts = hub.textgen.facts(DEFAULT_ENDPOINT)
    if not facts:
        raise NoReadyInstance(
            f"endpoint {DEFAULT_ENDPOINT!r} has no ready instance yet (its model may still be loading)"
        )
    hub.textgen.require_text_generation(DEFAULT_ENDPOINT)
    instances = sum(len(v.ready_instances()) for v in hub.fleet.get(DEFAULT_ENDPOINT).variants)
    context = facts["context_length"]
    return {
        "model_id": facts.get("name") or facts.get("uri"),
        "model_sha": None,
        "model_pipeline_tag": "text-generation",
        "model_device_type": "cpu",
        "max_concurrent_requests": facts.get("max_batch_size", 1) * max(instances, 1),
        "max_best_of": 1,
        "max_stop_sequences": MAX_STOP_SEQUENCES,
        "max_input_tokens": context - 1,
        "max_input_length": context - 1,  # the name TGI used before 2.0; older clients read it
        "max_total_tokens": context,
        "max_client_batch_size": 1,
        "router": "servelet",
        "version": __version__,
        "sha": None,
        "docker_label": None,
    }
