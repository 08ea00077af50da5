"""The gateway's one gate: browser checks on every request, then (auth on) who it is and whether its scopes
reach the route and its endpoint, before any route runs. WebSockets are checked at the upgrade; one that brings
no credentials must send them as its first message (`handshake.py`)."""

from __future__ import annotations

import asyncio

from starlette.datastructures import Headers, QueryParams
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ...control.async_queue import JobQueue
from ...control.endpoints import DEFAULT_ENDPOINT
from ...control.scopes import EVERYONE, Grant
from ...errors import GatewayError, PayloadTooLarge
from ...settings import GatewaySettings
from .. import client_json
from .browser import BrowserChecks
from .credentials import Authenticator, carries_credentials
from .errors import Forbidden, render_refusal
from .rules import Need, need_for
from .sigv4 import is_sigv4

GRANT = "grant"  # where the request's Grant goes in the ASGI scope's state (request.state.grant)
POLICY_VIOLATION = 1008  # the WebSocket close code for a refused connection (an HTTP 403 before it is accepted)


class Gate:
    def __init__(self, app: ASGIApp, settings: GatewaySettings, authenticator: Authenticator | None, jobs: JobQueue):
        self.app = app
        self.browser = BrowserChecks(settings)
        self.authenticator = authenticator  # None: auth is off
        self.jobs = jobs
        self.body_limit = settings.max_payload_bytes
        self.max_json_depth = settings.max_json_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        method = scope.get("method", "GET")
        need = need_for(method, scope["path"], headers, QueryParams(scope.get("query_string", b"")))
        try:
            refusal = self.browser.refusal(method, headers, need)
            if refusal is not None:
                raise refusal
            if self.authenticator is None or need.kind == "open":
                grant: Grant | None = EVERYONE
            elif scope["type"] == "websocket" and not carries_credentials(headers):
                grant = None  # the first message must bring them
            else:
                body = None
                if scope["type"] == "http" and is_sigv4(headers.get("authorization")):
                    body, receive = await _read_whole(receive, headers, self.body_limit)
                grant = await self.authenticator.grant(method, _url(scope), headers, body, basic=_page(method, need))
                if need.reads_body and not grant.may_invoke_all() and body is None:
                    body, receive = await _read_whole(receive, headers, self.body_limit)
                await self.authorize(grant, need, body)
        except GatewayError as error:
            return await self.refuse(scope, send, need, error)
        scope.setdefault("state", {})[GRANT] = grant
        await self.app(scope, receive, send)

    async def authorize(self, grant: Grant, need: Need, body: bytes | None) -> None:
        if need.kind == "admin" and not grant.admin:
            raise Forbidden(f"key {grant.name!r} has no admin scope: the control APIs need it")
        if need.kind == "metrics" and not grant.may_read_metrics():
            raise Forbidden(f"key {grant.name!r} has neither the metrics nor the admin scope")
        if need.kind == "invoke_some" and not grant.may_invoke_some():
            raise Forbidden(f"key {grant.name!r} has no invoke scope")
        if need.kind == "invoke" and not grant.may_invoke_all():
            endpoint = await self.endpoint_of(need, body)
            if not grant.may_invoke(endpoint):
                named = f"endpoint {endpoint!r}" if endpoint else "an endpoint it could not tell from the request"
                raise Forbidden(f"key {grant.name!r} may not invoke {named}")

    async def endpoint_of(self, need: Need, body: bytes | None) -> str | None:
        if need.endpoint is not None:
            return need.endpoint
        if need.job is not None:
            job = await asyncio.to_thread(self.jobs.get, need.job)  # the store, off the event loop
            return job.endpoint if job is not None else None
        if need.body_field is not None and body is not None:
            return _endpoint_in_body(body, need.body_field, self.max_json_depth)
        return None

    async def refuse(self, scope: Scope, send: Send, need: Need, error: GatewayError) -> None:
        if scope["type"] == "websocket":
            reason = error.message.encode()[:120].decode(errors="ignore")  # a close reason holds 123 bytes at most
            return await send({"type": "websocket.close", "code": POLICY_VIOLATION, "reason": reason})
        response = render_refusal(Request(scope), need.family, error)
        if error.status == 401 and _page(scope.get("method", "GET"), need):
            response.headers["WWW-Authenticate"] = 'Basic realm="servelet", charset="UTF-8"'  # a browser asks for it
        await response(scope, _nothing, send)


def _page(method: str, need: Need) -> bool:
    """A read-only page (`/docs`, `/openapi.json`): it takes the key as HTTP Basic's password (auth/credentials.py)."""
    return method in ("GET", "HEAD") and need.kind == "any"


def _endpoint_in_body(body: bytes, field: str, max_depth: int) -> str | None:
    """The endpoint a JSON body names (OpenAI's `model` may be `ENDPOINT/TARGET`); None when it cannot be told.
    Parsed as the routes parse it (client_json), so that both read the same field."""
    try:
        payload = client_json.loads(body, max_depth)
    except (ValueError, GatewayError):
        return None
    if not isinstance(payload, dict):
        return None
    value = payload.get(field, DEFAULT_ENDPOINT if field == "endpoint" else None)
    return value.partition("/")[0] if isinstance(value, str) else None


async def _read_whole(receive: Receive, headers: Headers, limit: int) -> tuple[bytes, Receive]:
    """The whole body (refusing more than `limit`), and a receive that hands it to the route as if unread."""
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the request body has {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit:
            raise PayloadTooLarge(f"the request body exceeds the limit of {limit} bytes")
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return body, replay


def _url(scope: Scope) -> str:
    """The URL as the client sent it (path still percent-encoded), which is what SigV4 signed."""
    headers = Headers(scope=scope)
    path = scope.get("raw_path") or scope["path"].encode()
    query = scope.get("query_string", b"")
    host = headers.get("host", "localhost")
    return f"{scope.get('scheme', 'http')}://{host}{path.decode('latin-1')}" + (f"?{query.decode('latin-1')}" if query else "")


async def _nothing() -> Message:
    return {"type": "http.disconnect"}
