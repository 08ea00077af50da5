"""Rendering errors per API family: each family registers how its clients expect to read them."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from ..errors import GatewayError


def describe_validation(exc: RequestValidationError) -> str:
    """One line per problem, naming the field as the client wrote it (`body.messages.0.role: ...`)."""
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        message = err.get("msg", "invalid").removeprefix("Value error, ")
        if err.get("type") == "missing":
            message = "required"
        elif err.get("type") == "extra_forbidden":
            message = "unknown field"
        lines.append(f"{where}: {message}" if where else message)
    return "; ".join(lines) or "the request is not valid"


# -- rendering per API family ---------------------------------------------------------------------
Renderer = Callable[[GatewayError], Response]


def default_render(error: GatewayError) -> Response:
    return JSONResponse({"code": error.status, "error_type": error.kind, "error": error.message}, status_code=error.status)


_renderers: dict[str, Renderer] = {}


def error_format(family: str, renderer: Renderer):
    """A router dependency: errors raised under this router are rendered by `renderer`."""
    _renderers[family] = renderer

    async def mark(request: Request) -> None:  # async: no thread-pool hop (see services.services)
        request.state.api_family = family

    return mark


def render(request: Request, error: GatewayError) -> Response:
    family = getattr(request.state, "api_family", None)
    response = _renderers.get(family, default_render)(error)
    if error.retry_after is not None:
        response.headers["Retry-After"] = str(error.retry_after)
    return response
