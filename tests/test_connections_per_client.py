"""One client address cannot hold every HTTP connection of the gateway: past SERVELET_HTTP_CONNECTIONS_PER_CLIENT
open connections, each request on a new one is answered 429 with Retry-After and a message naming the setting;
closing a connection makes room again, and a connection upgraded to a WebSocket counts under the WebSocket limit
instead. Loopback is not exempt, so the test's own sockets on 127.0.0.1 meet it."""

from __future__ import annotations

import asyncio
import json
import socket
from contextlib import ExitStack

import httpx
import pytest
from conftest import start_gateway, stop_process, wait_for
from websockets.asyncio.client import connect

LIMIT = 3


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    """No endpoint: the limit is the server's, whatever runs behind it."""
    running = start_gateway(
        tmp_path_factory.mktemp("connections"), env={"SERVELET_HTTP_CONNECTIONS_PER_CLIENT": str(LIMIT)},
        args=["--instances", "0"], ready=None,
    )
    yield running
    stop_process(running.process)


def idle_connections(stack: ExitStack, gateway, count: int) -> list[socket.socket]:
    """Connections that are open and sent nothing, as a slow or hostile client holds them; each answered once so it
    is known to be counted."""
    sockets = []
    for _ in range(count):
        sock = stack.enter_context(socket.create_connection(("127.0.0.1", gateway.port), timeout=10))
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert whole_response(sock).startswith(b"HTTP/1.1 200"), "a connection under the limit was refused"
        sockets.append(sock)
    return sockets


def whole_response(sock: socket.socket) -> bytes:
    """One HTTP response read to its end (its head, then Content-Length bytes of body): a response can come in
    several segments, and a part left unread would be taken for the next response on the connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed mid-response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    fields = dict(line.split(b":", 1) for line in head.split(b"\r\n")[1:])
    length = int({name.strip().lower(): value for name, value in fields.items()}[b"content-length"])
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed mid-body: {data!r}"
        body += chunk
    return head + b"\r\n\r\n" + body


def one_request(gateway) -> httpx.Response:
    """A request on a connection of its own."""
    with httpx.Client(base_url=gateway.base_url, timeout=10) as http:
        return http.get("/health")


def test_a_connection_past_the_limit_is_answered_429_naming_the_setting(gateway):
    with ExitStack() as stack:
        idle_connections(stack, gateway, LIMIT)
        refused = one_request(gateway)
        assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
        assert refused.headers["connection"] == "close"
        assert f"SERVELET_HTTP_CONNECTIONS_PER_CLIENT={LIMIT}" in refused.json()["error"]
    # Closed connections no longer count (the server sees them close a moment later).
    assert wait_for(lambda: one_request(gateway).status_code == 200, 10)


def test_the_connections_under_the_limit_keep_being_served(gateway):
    with ExitStack() as stack:
        held = idle_connections(stack, gateway, LIMIT)
        assert one_request(gateway).status_code == 429
        held[0].sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # keep-alive: the same connection again
        assert whole_response(held[0]).startswith(b"HTTP/1.1 200")


async def test_websocket_connections_count_under_their_own_limit(gateway):
    url = f"ws://127.0.0.1:{gateway.port}/ws"
    async with connect(url) as first, connect(url) as second:
        json.loads(await first.recv()), json.loads(await second.recv())
        with ExitStack() as stack:
            idle_connections(stack, gateway, LIMIT - 1)
            answer = await asyncio.to_thread(one_request, gateway)
            assert answer.status_code == 200, answer.text  # the two WebSockets are not HTTP connections any more
