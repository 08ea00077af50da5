"""Limits on what one client may hold of the gateway: the size of a request's headers, and the HTTP and WebSocket
connections open from one address. Each refusal names its limit and the setting that changes it."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from starlette.types import ASGIApp, Receive, Scope, Send

HEADER_SETTING = "SERVELET_MAX_HEADER_BYTES"
CONNECTIONS_SETTING = "SERVELET_WEBSOCKET_CONNECTIONS_PER_CLIENT"
HTTP_CONNECTIONS_SETTING = "SERVELET_HTTP_CONNECTIONS_PER_CLIENT"
TOO_MANY_REQUESTS = 429
REQUEST_HEADER_FIELDS_TOO_LARGE = 431


def header_bytes(scope: Scope) -> int:
    """The request line and headers as they came on the wire (near enough: separators counted)."""
    line = len(scope.get("raw_path") or scope["path"].encode()) + len(scope.get("query_string", b"")) + 16
    return line + sum(len(name) + len(value) + 4 for name, value in scope["headers"])


class HeaderLimit:
    """431 for a request whose headers exceed the limit. uvicorn's h11 parser stops reading past it
    (h11_max_incomplete_event_size, server.py); httptools has no such bound, so the check is repeated here."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or (size := header_bytes(scope)) <= self.limit:
            await self.app(scope, receive, send)
            return
        message = f"the request's headers have {size} bytes; the limit is {self.limit} ({HEADER_SETTING})"
        # A WebSocket upgrade is answered in HTTP where the server can (uvicorn can), else closed (1009: too big).
        prefix = "websocket.http" if scope["type"] == "websocket" else "http"
        if scope["type"] == "websocket" and "websocket.http.response" not in scope.get("extensions", {}):
            await send({"type": "websocket.close", "code": 1009, "reason": message[:120]})
            return
        body = json.dumps({"code": REQUEST_HEADER_FIELDS_TOO_LARGE, "error_type": "headers_too_large", "error": message})
        await send({
            "type": f"{prefix}.response.start",
            "status": REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
        })
        await send({"type": f"{prefix}.response.body", "body": body.encode()})


class ConnectionsPerClient:
    """WebSocket connections open at once per client address, so one client cannot hold every socket."""

    def __init__(self, limit: int):
        self.limit = limit
        self.open: Counter[str] = Counter()

    @contextmanager
    def hold(self, client: str) -> Iterator[bool]:
        """Yields whether the connection is admitted; counts it while it stays open."""
        if self.open[client] >= self.limit:
            yield False
            return
        self.open[client] += 1
        try:
            yield True
        finally:
            self.open[client] -= 1
            if self.open[client] <= 0:
                del self.open[client]

    def refusal(self, client: str) -> str:
        return (
            f"{client} already has {self.open[client]} WebSocket connections open, the limit per client "
            f"({CONNECTIONS_SETTING}={self.limit}); close one or retry later"
        )


def connections_per_client_protocol(limit: int) -> type:
    """uvicorn's HTTP protocol (`http=`) counting the connections open from each client address. A connection past
    `limit` is still accepted (closing it unanswered would look like a network fault), but each request on it is
    answered 429 with Retry-After and the connection closed; uvicorn's own `limit_concurrency` does the same for all
    clients together. A connection upgraded to a WebSocket stops counting here (CONNECTIONS_SETTING bounds those).
    Unix-socket connections have no address and are not counted."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    open_from: Counter[str] = Counter()

    class ConnectionsPerClientProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        counted: str | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if not self.client:
                return
            host = self.client[0]
            if open_from[host] >= limit:
                self.app = refuse_connection(
                    f"{host} already has {open_from[host]} HTTP connections open, the limit per client "
                    f"({HTTP_CONNECTIONS_SETTING}={limit}); reuse a connection (keep-alive) or retry later"
                )
                return
            open_from[host] += 1
            self.counted = host

        def connection_lost(self, exc: Exception | None) -> None:
            self.release()
            super().connection_lost(exc)

        def handle_websocket_upgrade(self, *event) -> None:
            self.release()
            super().handle_websocket_upgrade(*event)

        def release(self) -> None:
            if self.counted is not None:
                open_from[self.counted] -= 1
                if open_from[self.counted] <= 0:
                    del open_from[self.counted]
                self.counted = None

    return ConnectionsPerClientProtocol


def refuse_connection(message: str) -> ASGIApp:
    """What answers each request on a connection past the limit: 429, as boto3's ThrottlingException (it backs off)."""
    body = json.dumps({"code": TOO_MANY_REQUESTS, "error_type": "too_many_connections", "error": message}).encode()

    async def refuse(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan runs on the server's own app, never here
        await send({
            "type": "http.response.start",
            "status": TOO_MANY_REQUESTS,
            "headers": [
                (b"content-type", b"application/json"), (b"retry-after", b"1"),
                (b"x-amzn-errortype", b"ThrottlingException"), (b"connection", b"close"),
            ],
        })
        await send({"type": "http.response.body", "body": body})

    return refuse
