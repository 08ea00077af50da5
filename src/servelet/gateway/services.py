"""What route handlers reach through `Depends(services)`: the fleet, the router, text generation, settings."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from ..control.endpoints import Fleet
from ..control.router import Router
from ..errors import BadRequest, PayloadTooLarge
from ..settings import GatewaySettings
from .textgen import TextGenerator


@dataclass
class Services:
    settings: GatewaySettings
    fleet: Fleet
    router: Router
    textgen: TextGenerator


def services(request: Request) -> Services:
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
        raise PayloadTooLarge(f"the request body has {declared} bytes; the limit is {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"the request body exceeds the limit of {limit} bytes")
    return bytes(body)


async def read_json(request: Request, limit: int):
    """The body as JSON, with a 400 that says what is wrong when it is not."""
    import json

    body = await read_body(request, limit)
    if not body.strip():
        raise BadRequest("the request body is empty; send a JSON object")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
