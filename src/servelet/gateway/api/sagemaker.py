"""The SageMaker runtime API as botocore sends it, and the container contract's aliases for the endpoint `default`.

`InvokeEndpoint` forwards the body bytes and answers the instance's bytes; `InvokeEndpointWithResponseStream`
re-frames the instance's chunks as AWS event-stream `PayloadPart` events. Errors carry `x-amzn-errortype` and a
JSON body, so boto3 raises `client.exceptions.ValidationError`, `ModelError`, `ServiceUnavailable`, ...
An endpoint's DataCaptureConfig captures these routes' invocations (`capture/`), once each answer went out whole.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, contextmanager

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ...control.catalog import CATALOG_HINT
from ...control.endpoints import DEFAULT_ENDPOINT
from ...control.invocation import ChunkStream, Invocation
from ...errors import BadRequest, GatewayError, ModelFailed, ModelNotReady, Overloaded, Unavailable, Unprocessable
from .. import client_json, framing, metrics
from ..disconnect import unless_disconnected
from ..errors import error_format
from ..services import Services, note_endpoint, read_body, services

# What our account is called in SageMaker-shaped messages; there is no AWS account behind a servelet gateway.
ACCOUNT = "local"
# SageMaker's rule for the headers handed to the model (ContentType, Accept, CustomAttributes): ASCII, at most 1024
# characters. A model answers with the type it was asked for, and an answer's header can carry no other.
MODEL_HEADERS = ("Content-Type", "X-Amzn-SageMaker-Content-Type", "Accept", "X-Amzn-SageMaker-Accept",
                 "X-Amzn-SageMaker-Custom-Attributes")
PRINTABLE_ASCII = re.compile(r"[ -~]{0,1024}")
SHOWN_CHARACTERS = 200  # of a value quoted in a refusal


def shown(value: str) -> str:
    """A header's value as a refusal quotes it: a huge one cut short."""
    return repr(value if len(value) <= SHOWN_CHARACTERS else value[:SHOWN_CHARACTERS] + "...")


def check_model_headers(headers) -> None:
    for name in MODEL_HEADERS:
        if not PRINTABLE_ASCII.fullmatch(value := headers.get(name, "")):
            raise BadRequest(f"{name} {shown(value)}: at most 1024 printable ASCII characters")

# -- errors botocore maps to exception classes ------------------------------------------------------
# The codes are the service model's error shapes (`ThrottlingException` is not one: boto3 raises a plain
# ClientError with that code, and its retry handler backs off on it, as it does against SageMaker).
_CODES: list[tuple[type[GatewayError], str, int]] = [
    (ModelFailed, "ModelError", 424),
    (ModelNotReady, "ModelNotReadyException", 429),
    (Overloaded, "ThrottlingException", 429),
    (Unavailable, "ServiceUnavailable", 503),
]


def render_sagemaker_error(error: GatewayError) -> Response:
    """A rest-json error: botocore reads the code from `x-amzn-errortype` and the fields from the JSON body."""
    code, status = _code(error)
    body: dict = {"Message": error.message}
    if isinstance(error, ModelFailed):
        kind = "client" if 400 <= error.original_status < 500 else "server"
        body = {
            "ErrorCode": f"{kind.upper()}_ERROR_FROM_MODEL",
            "Message": f'Received {kind} error ({error.original_status}) from model with message "{error.message}".',
            "OriginalStatusCode": error.original_status,
            "OriginalMessage": error.message,
        }
    headers = {"x-amzn-errortype": code, "x-amzn-RequestId": str(uuid.uuid4())}
    return JSONResponse(body, status_code=status, headers=headers)


def _code(error: GatewayError) -> tuple[str, int]:
    for kind, code, status in _CODES:
        if isinstance(error, kind):
            return code, status
    if error.status < 500:
        return "ValidationError", 400  # SageMaker answers every refused request with ValidationError
    return "InternalFailure", 500


@contextmanager
def model_errors():
    """What the model refused (the instance's 422: a bad parameter, a missing `inputs`) is SageMaker's ModelError,
    carrying the instance's status and message. Envelope problems (empty or non-JSON body, content type, size)
    stay ValidationError, as SageMaker itself would refuse them."""
    try:
        yield
    except Unprocessable as exc:
        raise ModelFailed(exc.message, exc.status) from None


router = APIRouter()
runtime = APIRouter(
    tags=["SageMaker runtime"], dependencies=[Depends(error_format("sagemaker", render_sagemaker_error))]
)
contract = APIRouter(tags=["container contract"])

LMI_EXAMPLE = {
    "requestBody": {
        "content": {"application/json": {"example": {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 8}}}}
    }
}
ENDPOINT_NAME = Path(..., description="The endpoint to invoke; `servelet serve` deploys `default`.")


# -- reading a request --------------------------------------------------------------------------------
async def read_invocation(request: Request, services: Services, endpoint: str, accept: str | None) -> Invocation:
    """The internal request from SageMaker's headers and the raw body; a catalog id is deployed on its first use,
    and other unknown endpoints are a ValidationError."""
    if services.router.catalog is not None:
        await services.router.catalog.ensure(endpoint)
    if endpoint not in services.fleet.endpoints:
        known = ", ".join(sorted(services.fleet.endpoints)) or "none"
        raise BadRequest(f"Endpoint {endpoint} of account {ACCOUNT} not found. (endpoints here: {known}; {CATALOG_HINT})")
    note_endpoint(request, endpoint)
    headers = request.headers
    check_model_headers(headers)
    return Invocation(
        endpoint=endpoint,
        body=await read_body(request, services.settings.max_payload_bytes),
        content_type=headers.get("content-type") or "application/json",
        accept=accept,
        custom_attributes=headers.get("x-amzn-sagemaker-custom-attributes"),
        target_model=headers.get("x-amzn-sagemaker-target-model"),
        target_variant=headers.get("x-amzn-sagemaker-target-variant"),
        inference_id=headers.get("x-amzn-sagemaker-inference-id"),
    )


def is_json(content_type: str) -> bool:
    media = content_type.split(";")[0].strip().lower()
    return media in ("application/json", "text/json") or media.endswith("+json")


def ask_to_stream(body: bytes, content_type: str, max_depth: int) -> bytes:
    """Add `"stream": true` to a JSON body that does not say.

    An LMI container streams token by token only when the body asks for it; SageMaker LMI users write it in
    the body themselves, but a caller of InvokeEndpointWithResponseStream has already said it wants a stream.
    An explicit `"stream"` and anything that is not a JSON object travel untouched (the instance judges them);
    JSON nested deeper than `max_depth` is refused here, as every JSON the gateway reads.
    """
    if not is_json(content_type):
        return body
    try:
        payload = client_json.loads(body, max_depth)
    except (ValueError, UnicodeDecodeError):
        return body
    if not isinstance(payload, dict) or "stream" in payload:
        return body
    return json.dumps(payload | {"stream": True}).encode()


# -- InvokeEndpoint -----------------------------------------------------------------------------------
async def invoke(request: Request, services: Services, endpoint: str) -> Response:
    """Forward the body and answer as the instance answers: a whole body as it is, and with `"stream": true` its
    JSON lines as they come (SageMaker buffers them; boto3 reads the whole body either way, httpx can stream)."""
    invocation = await read_invocation(request, services, endpoint, request.headers.get("accept"))
    sampled = services.capture.sample(endpoint)
    instance_stream = AsyncExitStack()
    with model_errors():
        opening = instance_stream.enter_async_context(services.router.stream(invocation))
        answer = await unless_disconnected(request, opening)
    if sampled is not None:
        answer = services.capture.recorded(sampled, invocation, answer)
    note_endpoint(request, endpoint, answer.variant)
    metrics.observe_rate_headers(endpoint, answer.headers)
    headers = {"X-Amzn-Invoked-Production-Variant": answer.variant} | framing.UNBUFFERED | answer.headers
    return framing.ClosingStreamingResponse(
        passed_through(answer, instance_stream), media_type=answer.content_type, headers=headers
    )


async def passed_through(answer: ChunkStream, instance_stream: AsyncExitStack) -> AsyncIterator[bytes]:
    async with instance_stream:
        async for chunk in answer.chunks:
            yield chunk


@runtime.post(
    "/endpoints/{EndpointName}/invocations",
    summary="InvokeEndpoint: the model's answer (a stream's JSON lines pass through as they come)",
    response_class=Response,
    openapi_extra=LMI_EXAMPLE,
)
async def invoke_endpoint(request: Request, EndpointName: str = ENDPOINT_NAME, services: Services = Depends(services)):
    return await invoke(request, services, EndpointName)


# -- InvokeEndpointWithResponseStream ----------------------------------------------------------------
@runtime.post(
    "/endpoints/{EndpointName}/invocations-response-stream",
    summary="InvokeEndpointWithResponseStream: the answer as event-stream PayloadPart events",
    response_class=StreamingResponse,
    openapi_extra=LMI_EXAMPLE,
)
async def invoke_endpoint_with_response_stream(
    request: Request, EndpointName: str = ENDPOINT_NAME, services: Services = Depends(services)
):
    invocation = await read_invocation(request, services, EndpointName, request.headers.get("x-amzn-sagemaker-accept"))
    sent, sampled = invocation.body, services.capture.sample(EndpointName)
    invocation.body = ask_to_stream(invocation.body, invocation.content_type, services.settings.max_json_depth)
    # Opened here, not in the generator, so failures before the first byte still answer an HTTP error.
    instance_stream = AsyncExitStack()
    with model_errors():
        answer = await instance_stream.enter_async_context(services.router.stream(invocation))
    if sampled is not None:  # the body as the client sent it, and the instance's answer before its framing
        answer = services.capture.recorded(sampled, invocation, answer, body=sent)
    note_endpoint(request, EndpointName, answer.variant)
    headers = {
        "X-Amzn-SageMaker-Content-Type": answer.content_type,
        "X-Amzn-Invoked-Production-Variant": answer.variant,
    } | framing.UNBUFFERED
    return framing.ClosingStreamingResponse(
        events(answer, instance_stream), media_type=framing.EVENT_STREAM, headers=headers
    )


async def events(answer: ChunkStream, instance_stream: AsyncExitStack) -> AsyncIterator[bytes]:
    """PayloadPart events, then a ModelStreamError event if the stream breaks. Leaving early (a client that
    disconnects cancels this) closes the instance stream, which cancels the generation."""
    async with instance_stream:
        try:
            async for part in payload_parts(answer.chunks, answer.content_type):
                yield framing.payload_part(part)
        except GatewayError as exc:
            yield framing.model_stream_error(exc.message, "StreamBroken")


async def payload_parts(chunks: AsyncIterator[bytes], content_type: str) -> AsyncIterator[bytes]:
    """JSON lines go one whole line per part, so `json.loads(part)` works in client code, and an instance's
    error line (`{"error": ...}`) raises instead of passing as data; other content passes chunk by chunk."""
    if content_type.split(";")[0].strip().lower() != framing.JSON_LINES:
        async for chunk in chunks:
            yield chunk
        return
    pending = b""
    async for chunk in chunks:
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            if line.strip():
                _raise_if_error(line)
                yield line + b"\n"
    if pending.strip():
        _raise_if_error(pending)
        yield pending


def _raise_if_error(line: bytes) -> None:
    if b'"error"' not in line:
        return  # most lines are tokens; no need to parse them
    try:
        payload = json.loads(line)
    except (ValueError, RecursionError):  # a model's own output, however deep, is not an error line
        return
    if isinstance(payload, dict) and "error" in payload and "token" not in payload:
        raise ModelFailed(str(payload["error"]), 500)


# -- the container contract (GET /ping, POST /invocations) on the endpoint `default` -----------------------
@contract.get("/ping", summary="200 once the endpoint `default` has a ready instance, 503 before")
async def ping(services: Services = Depends(services)):
    endpoint = services.fleet.endpoints.get(DEFAULT_ENDPOINT)
    if endpoint is not None and endpoint.ready:
        return {"status": "healthy"}
    return JSONResponse({"status": "unavailable", "error": "the endpoint `default` has no ready instance"}, status_code=503)


@runtime.post(
    "/invocations",
    summary="The container contract's invocation, on the endpoint `default` (streams pass through as they come)",
    response_class=Response,
    openapi_extra=LMI_EXAMPLE,
)
async def invocations(request: Request, services: Services = Depends(services)):
    return await invoke(request, services, DEFAULT_ENDPOINT)


router.include_router(runtime)
router.include_router(contract)
