"""What route handlers reach through `Depends(services)`: the fleet, the router, text generation, settings."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from ..capture.data_capture import DataCapture
from ..control.async_queue import JobQueue
from ..control.async_worker import AsyncWorker
from ..control.endpoints import Fleet
from ..control.plane import ControlPlane
from ..control.router import Router
from ..errors import BadRequest, PayloadTooLarge, Unprocessable
from ..settings import GatewaySettings
from . import client_json
from .errors import describe_validation
from .textgen import TextGenerator

M = TypeVar("M", bound=BaseModel)
PAYLOAD_SETTING = "SERVELET_MAX_PAYLOAD_BYTES"


@dataclass
class Services:
    settings: GatewaySettings
    fleet: Fleet
    router: Router
    textgen: TextGenerator
    plane: ControlPlane
    jobs: JobQueue
    async_worker: AsyncWorker
    capture: DataCapture


async def services(request: Request) -> Services:
    """Async, as every dependency here: FastAPI runs a plain `def` dependency on its thread pool, a thread hop on
    every request."""
    return request.app.state.services


def note_endpoint(request: Request, endpoint: str, variant: str | None = None) -> None:
    """Name the endpoint (and variant) in the request's metrics labels."""
    request.state.endpoint = endpoint
    if variant is not None:
        request.state.variant = variant


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refusing more than `limit` bytes before reading them all."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the request body has {declared} bytes; the limit is {limit} ({PAYLOAD_SETTING})")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"the request body exceeds the limit of {limit} bytes ({PAYLOAD_SETTING})")
    return bytes(body)


async def read_json(request: Request, settings: GatewaySettings):
    """The body as JSON within the size and nesting limits, with a 400 that says what is wrong when it is not."""
    body = await read_body(request, settings.max_payload_bytes)
    if not body.strip():
        raise BadRequest("the request body is empty; send a JSON object")
    try:
        return client_json.loads(body, settings.max_json_depth)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None


def parse(model: type[M], data) -> M:
    """Validate a body read with `read_json`; a 422 names each field that is wrong."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise Unprocessable(describe_validation(exc)) from None


def json_body(*models: type[BaseModel]) -> dict:
    """`openapi_extra` documenting a JSON body that routes read themselves (to enforce the size limit first);
    several models document a body that may take any of their shapes."""
    schemas = [_inline(m.model_json_schema()) for m in models]
    schema = schemas[0] if len(schemas) == 1 else {"oneOf": schemas}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _inline(schema: dict) -> dict:
    """Replace pydantic's local `$defs` references, which mean nothing inside an OpenAPI document."""
    defs = schema.pop("$defs", {})

    def resolve(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    return resolve(schema)
