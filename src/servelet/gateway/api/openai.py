"""The OpenAI API: `/v1/models`, `/v1/completions`, `/v1/chat/completions`, streaming and not; `/v1/embeddings`.

`model` names an endpoint, or `ENDPOINT/TARGET` for one model of a multi-model endpoint. Sampling follows OpenAI's defaults, mapped onto the LMI parameters the instance takes:
temperature defaults to 1 and samples (`do_sample`); temperature 0 (or top_p 0) is greedy; `seed` makes sampling
reproducible. Parameters this server cannot honour (n > 1, logprobs, logit_bias, tools) are refused with
a 400 naming them, never silently ignored.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Literal, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from ...control.catalog import CATALOG_HINT
from ...errors import BadRequest, GatewayError, ModelFailed, NotFound
from ..chat import chat_prompt
from ..disconnect import unless_disconnected
from ..embeddings import EmbeddingRequest, create_embeddings, require_embeddings
from ..errors import error_format
from ..framing import SSE, SSE_KEEPALIVE, UNBUFFERED, ClosingStreamingResponse, sse
from ..services import Services, json_body, note_endpoint, read_json, services
from ..textgen import Completion, Token

MAX_STOP_SEQUENCES = 4  # OpenAI's limit
COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the engine's (what fits, ≤ 256)
FINISH_REASONS = {"eos_token": "stop", "stop_sequence": "stop", "length": "length"}
M = TypeVar("M", bound=BaseModel)


# -- errors, in OpenAI's shape: {"error": {"message", "type", "param", "code"}} ---------------------------------
class InvalidRequest(BadRequest):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ModelNotFound(NotFound):
    def __init__(self, model: str, known: list[str]):
        super().__init__(
            f"The model `{model}` does not exist; models are endpoints here: {', '.join(known) or 'none'}; {CATALOG_HINT}"
        )
        self.param, self.code = "model", "model_not_found"


def render_openai_error(error: GatewayError) -> Response:
    # OpenAI answers 400 for every invalid request, including what the instance refuses with 422.
    status = 400 if error.status == 422 else error.status
    if status == 429:
        kind = "rate_limit_error"
    elif status >= 500 or isinstance(error, ModelFailed):  # the model failed, not the request
        kind = "server_error"
    else:
        kind = "invalid_request_error"
    body = {
        "message": error.message,
        "type": kind,
        "param": getattr(error, "param", None),
        "code": getattr(error, "code", None) or error.kind,
    }
    return JSONResponse({"error": body}, status_code=status)


def parse(model: type[M], data) -> M:
    """Validate a body; a 400 names the first field at fault (`messages[0].role`), with every problem in the message."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid_body(exc) from None


def invalid_body(exc: ValidationError) -> InvalidRequest:
    problems, params = [], []
    for err in exc.errors():
        param = _param(err.get("loc", ()))
        if err.get("type") == "missing":
            message = "required"
        elif err.get("type") == "extra_forbidden":
            message = "is not supported by this server"
        else:
            message = err.get("msg", "invalid").removeprefix("Value error, ")
        problems.append(f"{param}: {message}" if param else message)
        params.append(param)
    return InvalidRequest("; ".join(problems) or "the request body is not valid", param=next(filter(None, params), None))


def _param(loc: tuple) -> str:
    """`("messages", 0, "content", "list[ContentPart]", 1)` → `messages[0].content[1]`."""
    out = ""
    for part in loc:
        if isinstance(part, str) and "[" in part:
            continue  # pydantic's name for the branch of a union it tried
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out.lstrip(".")


async def read(request: Request, svc: Services, model: type[M]) -> M:
    """The body within the payload limit, validated: bad JSON or fields answer OpenAI's 400."""
    return parse(model, await read_json(request, svc.settings))


router = APIRouter(
    prefix="/v1",
    tags=["OpenAI"],
    dependencies=[Depends(error_format("openai", render_openai_error))],
)


# -- request bodies --------------------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    include_usage: bool = Field(False, description="Send one more chunk before `[DONE]` carrying `usage`.")


# Fields OpenAI defines that this server cannot honour: accepted unset or at their neutral value, refused otherwise.
UNSUPPORTED = ("logit_bias", "echo", "best_of", "suffix", "logprobs", "top_logprobs")
NEUTRAL = {"best_of": 1}


class GenerationRequest(BaseModel):
    """What completions and chat completions share: the endpoint, sampling, stops, streaming. NaN and infinities
    are refused as such (Python's json writes them)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str = Field(..., description="The endpoint to call (`GET /v1/models` lists them).", examples=["default"])
    max_tokens: int | None = Field(None, ge=1, description="Tokens to generate at most.")
    temperature: float | None = Field(
        None, ge=0, le=2, description="Defaults to 1, which samples from the model's distribution; 0 is greedy."
    )
    top_p: float | None = Field(None, ge=0, le=1, description="Nucleus sampling; defaults to 1 (off); 0 is greedy.")
    seed: int | None = Field(None, description="Makes sampling reproducible (folded into a 32-bit seed).")
    stop: str | list[str] | None = Field(None, description=f"Up to {MAX_STOP_SEQUENCES} sequences that end the text.")
    n: int = Field(1, ge=1, description="Choices to generate; only 1 is supported.")
    stream: bool = Field(False, description="Answer server-sent events, one chunk per token, ending with `[DONE]`.")
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = Field(
        None, ge=-2, le=2, description="Lowers a token's logit by this for each time it already appears."
    )
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="Lowers a token's logit by this once it appears.")
    logit_bias: dict[str, float] | None = Field(None, description="Not supported; leave unset or empty.")
    user: str | None = Field(None, description="Accepted and ignored.")
    skip_special_tokens: bool = Field(
        True, description="Not OpenAI's: vLLM's. false shows special tokens (markers like <start_of_image>) in the text.",
    )

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported: this server generates one choice per request")
        return n

    @field_validator("stop")
    @classmethod
    def _stop_sequences(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, not {len(stops)}")
        if "" in stops:
            raise ValueError("stop sequences must not be empty strings")
        return stops

    @field_validator(*UNSUPPORTED, check_fields=False)
    @classmethod
    def _neutral_only(cls, value, info: ValidationInfo):
        if value and value != NEUTRAL.get(info.field_name):
            raise ValueError(f"{info.field_name} is not supported by this server; leave it unset")
        return value

    def parameters(self, max_tokens: int | None, stop: list[str]) -> dict:
        """The LMI parameters for the instance, with OpenAI's sampling defaults made explicit."""
        temperature = 1.0 if self.temperature is None else self.temperature
        top_p = 1.0 if self.top_p is None else self.top_p
        params: dict = {"stop": [*(self.stop or []), *stop]}
        if not self.skip_special_tokens:
            params["skip_special_tokens"] = False
        if max_tokens is not None:
            params["max_new_tokens"] = max_tokens
        for penalty in ("frequency_penalty", "presence_penalty"):
            if value := getattr(self, penalty):
                params[penalty] = value
        if temperature == 0 or top_p == 0:
            return params | {"do_sample": False}
        params |= {"do_sample": True, "temperature": temperature}
        if top_p < 1:
            params["top_p"] = top_p
        if self.seed is not None:
            params["seed"] = self.seed % 2**32
        return params

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(GenerationRequest):
    prompt: str | list[str] = Field(..., description="The text to continue (one prompt per request).")
    echo: bool | None = Field(None, description="Not supported.")
    best_of: int | None = Field(None, description="Only 1 is supported.")
    logprobs: int | None = Field(None, description="Not supported.")
    suffix: str | None = Field(None, description="Not supported.")

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_text_prompt(cls, prompt):
        if isinstance(prompt, list):
            if len(prompt) != 1 or not isinstance(prompt[0], str):
                raise ValueError("send one text prompt per request: a string, or a list holding one string")
            prompt = prompt[0]
        if prompt == "":
            raise ValueError("must not be empty")
        return prompt


class ContentPart(BaseModel):
    type: str = Field(..., description="Only `text` parts are supported.", examples=["text"])
    text: str | None = None


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"] = Field(
        ..., description="`developer` is treated as `system`."
    )
    content: str | list[ContentPart]
    name: str | None = Field(None, description="Accepted and ignored.")

    @field_validator("content")
    @classmethod
    def _text_only(cls, content):
        if isinstance(content, str):
            return content
        for part in content:
            if part.type != "text" or part.text is None:
                raise ValueError(f"content parts of type {part.type!r} are not supported; send text parts")
        return "\n".join(part.text for part in content)



class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(..., description="The conversation so far; the model writes the next turn.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Newer name for `max_tokens`; wins if both are set.")
    logprobs: bool | None = Field(None, description="Not supported.")
    top_logprobs: int | None = Field(None, description="Not supported.")

    @field_validator("messages")
    @classmethod
    def _some_messages(cls, messages):
        if not messages:
            raise ValueError("send at least one message")
        return messages


# -- response bodies -------------------------------------------------------------------------------------------
class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(0, description="Prompt tokens whose KV cells the engine's prefix cache held.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "servelet"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


# -- models ----------------------------------------------------------------------------------------------------
_listed_since: dict[str, int] = {}  # OpenAI's `created`: when this gateway first listed the endpoint


def model_card(name: str) -> ModelCard:
    return ModelCard(id=name, created=_listed_since.setdefault(name, int(time.time())))


@router.get("/models", response_model=ModelList, summary="List models: one per endpoint")
async def list_models(svc: Services = Depends(services)) -> ModelList:
    return ModelList(data=[model_card(name) for name in sorted(svc.fleet.endpoints)])


@router.get("/models/{model}", response_model=ModelCard, summary="One model (an endpoint)")
async def get_model(model: str, svc: Services = Depends(services)) -> ModelCard:
    endpoint_or_404(svc, model)
    return model_card(model)


def endpoint_or_404(svc: Services, model: str) -> str:
    if model not in svc.fleet.endpoints:
        raise ModelNotFound(model, sorted(svc.fleet.endpoints))
    return model


async def target_or_404(svc: Services, model: str) -> tuple[str, str | None]:
    """`model` names an endpoint, or `ENDPOINT/TARGET`: one model of a multi-model endpoint (its TargetModel), or a
    catalog id, deployed here on its first use."""
    if svc.router.catalog is not None:
        await svc.router.catalog.ensure(model)
    if model in svc.fleet.endpoints:
        return model, None
    endpoint, _, target = model.partition("/")
    if target and endpoint in svc.fleet.endpoints:
        return endpoint, target
    raise ModelNotFound(model, sorted(svc.fleet.endpoints))


def usage(completion: Completion) -> Usage:
    return Usage(
        prompt_tokens=completion.prompt_tokens,
        completion_tokens=completion.generated_tokens,
        total_tokens=completion.prompt_tokens + completion.generated_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=completion.cached_tokens),
    )


def finish_reason(completion: Completion) -> str:
    return FINISH_REASONS.get(completion.finish_reason, "stop")


# -- embeddings ------------------------------------------------------------------------------------------------
@router.post(
    "/embeddings",
    summary="Embed texts (on an endpoint that serves a feature-extraction model)",
    openapi_extra=json_body(EmbeddingRequest),
)
async def embeddings(request: Request, svc: Services = Depends(services)):
    body = await read(request, svc, EmbeddingRequest)
    model, target = await target_or_404(svc, body.model)
    note_endpoint(request, model)
    require_embeddings(model, svc.textgen.facts(model))
    answer, variant = await unless_disconnected(request, create_embeddings(svc.router, model, body, target))
    note_endpoint(request, model, variant)
    return answer


# -- completions -----------------------------------------------------------------------------------------------
@router.post(
    "/completions",
    response_model=CompletionResponse,
    summary="Continue a prompt (with `stream: true`, server-sent `text_completion` chunks)",
    openapi_extra=json_body(CompletionRequest),
)
async def completions(request: Request, svc: Services = Depends(services)):
    body = await read(request, svc, CompletionRequest)
    model, target = await target_or_404(svc, body.model)
    note_endpoint(request, model)
    max_tokens = COMPLETIONS_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    parameters = body.parameters(max_tokens, stop=[])
    reply = Reply("cmpl", body.model)
    if body.stream:
        items = await start_stream(request, svc, model, body.prompt, parameters, target)
        return sse_response(completion_chunks(reply, items, body.include_usage, request), svc.settings.keepalive_seconds)
    completion = await unless_disconnected(request, svc.textgen.complete(model, body.prompt, parameters, target))
    note_endpoint(request, model, completion.variant)
    return CompletionResponse(
        id=reply.id, created=reply.created, model=body.model, usage=usage(completion),
        choices=[CompletionChoice(text=completion.text, finish_reason=finish_reason(completion))],
    )


async def completion_chunks(reply: Reply, items: AsyncIterator[Token | Completion], include_usage: bool, request):
    async with aclosing(items):
        async for item in items:
            if isinstance(item, Token):
                if item.text:
                    yield reply.chunk("text_completion", {"text": item.text, "logprobs": None}, include_usage)
                continue
            note_endpoint(request, reply.model, item.variant)
            yield reply.chunk("text_completion", {"text": "", "logprobs": None}, include_usage, finish_reason(item))
            if include_usage:
                yield reply.usage_chunk("text_completion", usage(item))


# -- chat completions ------------------------------------------------------------------------------------------
@router.post(
    "/chat/completions",
    response_model=ChatCompletionResponse,
    summary="Answer a conversation (the model's chat template, else a plain one; `stream: true` for chunks)",
    openapi_extra=json_body(ChatCompletionRequest),
)
async def chat_completions(request: Request, svc: Services = Depends(services)):
    body = await read(request, svc, ChatCompletionRequest)
    model, target = await target_or_404(svc, body.model)
    note_endpoint(request, model)
    prompt = chat_prompt([m.model_dump(include={"role", "content"}) for m in body.messages], svc.textgen.facts(model))
    max_tokens = body.max_completion_tokens or body.max_tokens
    parameters = body.parameters(max_tokens, stop=prompt.stop) | prompt.parameters()
    reply = Reply("chatcmpl", body.model)
    if body.stream:
        items = await start_stream(request, svc, model, prompt.text, parameters, target)
        return sse_response(chat_chunks(reply, items, body.include_usage, request), svc.settings.keepalive_seconds)
    completion = await unless_disconnected(request, svc.textgen.complete(model, prompt.text, parameters, target))
    note_endpoint(request, model, completion.variant)
    return ChatCompletionResponse(
        id=reply.id, created=reply.created, model=body.model, usage=usage(completion),
        choices=[ChatChoice(message=AssistantMessage(content=AnswerText().feed(completion.text)), finish_reason=finish_reason(completion))],
    )


class AnswerText:
    """The answer without surrounding whitespace, streamed or not: the space after "Assistant:" and the newline
    before the next turn marker belong to the template. Whitespace is held back until text follows it."""

    def __init__(self):
        self.started = False
        self.held = ""

    def feed(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        text = self.held + text
        shown = text.rstrip()
        self.held = text[len(shown):]
        return shown


async def chat_chunks(reply: Reply, items: AsyncIterator[Token | Completion], include_usage: bool, request):
    kind = "chat.completion.chunk"
    yield reply.chunk(kind, {"delta": {"role": "assistant", "content": ""}, "logprobs": None}, include_usage)
    answer = AnswerText()
    async with aclosing(items):
        async for item in items:
            if isinstance(item, Token):
                if text := answer.feed(item.text):
                    yield reply.chunk(kind, {"delta": {"content": text}, "logprobs": None}, include_usage)
                continue
            note_endpoint(request, reply.model, item.variant)
            yield reply.chunk(kind, {"delta": {}, "logprobs": None}, include_usage, finish_reason(item))
            if include_usage:
                yield reply.usage_chunk(kind, usage(item))


# -- streaming -------------------------------------------------------------------------------------------------
class Reply:
    """The id, creation time and model every chunk of one answer repeats."""

    def __init__(self, prefix: str, model: str):
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def chunk(self, kind: str, choice: dict, include_usage: bool, finish: str | None = None) -> dict:
        chunk = {
            "id": self.id, "object": kind, "created": self.created, "model": self.model,
            "choices": [{"index": 0, **choice, "finish_reason": finish}],
        }
        return chunk | {"usage": None} if include_usage else chunk

    def usage_chunk(self, kind: str, counts: Usage) -> dict:
        return {
            "id": self.id, "object": kind, "created": self.created, "model": self.model,
            "choices": [], "usage": counts.model_dump(),
        }


async def start_stream(request: Request, svc: Services, model: str, prompt: str, parameters: dict, target: str | None):
    """Start generating and wait for the first token, so a refused request still answers a 4xx/5xx status."""
    items = svc.textgen.stream(model, prompt, parameters, target)
    first = await unless_disconnected(request, anext(items))
    return _prepend(first, items)


async def _prepend(first, items: AsyncIterator):
    # Each stage closes the one it reads, down to the instance request: closing that cancels the generation.
    async with aclosing(items):
        yield first
        async for item in items:
            yield item


async def _sse_events(chunks: AsyncIterator[dict]) -> AsyncIterator[bytes]:
    async with aclosing(chunks):
        try:
            async for chunk in chunks:
                yield sse(chunk)
        except GatewayError as exc:
            # Headers are sent: the error travels as an event, which the openai client raises as APIError.
            yield b"data: " + bytes(render_openai_error(exc).body) + b"\n\n"
            return
    yield sse("[DONE]")


def sse_response(chunks: AsyncIterator[dict], keepalive_seconds: float) -> StreamingResponse:
    return ClosingStreamingResponse(
        _sse_events(chunks), media_type=SSE, headers=UNBUFFERED, keepalive=SSE_KEEPALIVE, keepalive_seconds=keepalive_seconds
    )
