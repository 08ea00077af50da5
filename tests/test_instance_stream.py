"""The gateway's streamed hop to an instance (instance/stream.py), against real Unix-socket servers.

The servers here write HTTP by hand so the tests choose exactly how the bytes are split and where a connection
breaks; the routes' own tests cover the same code against real instances.
"""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import pytest

from servelet.instance.stream import open_stream


@contextlib.asynccontextmanager
async def raw_server(tmp_path, respond):
    """A Unix-socket server that reads one request head and lets `respond(reader, writer)` answer it."""
    path = tmp_path / "instance.sock"
    requests: list[bytes] = []

    async def handle(reader, writer):
        requests.append(await reader.readuntil(b"\r\n\r\n"))
        try:
            await respond(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_unix_server(handle, path=str(path))
    try:
        yield f"unix:{path}", requests
    finally:
        server.close()
        await server.wait_closed()


def chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


async def test_chunks_split_at_every_byte_arrive_whole_and_in_order(tmp_path):
    lines = [b'{"token": {"id": 1, "text": "a"}}\n', b'{"token": {"id": 2, "text": "\xc3\xa9"}}\n']
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/jsonlines\r\nTransfer-Encoding: chunked\r\n\r\n"

    async def respond(_reader, writer):
        for byte in head + chunked(*lines):  # one byte per write: the parser must reassemble everything
            writer.write(bytes([byte]))
            await writer.drain()

    async with raw_server(tmp_path, respond) as (address, requests):
        async with open_stream(address, "/invocations", b'{"inputs": "x"}', {"Accept": "a/b"}, 10) as answer:
            assert answer.status_code == 200
            assert answer.headers["content-type"] == "application/jsonlines"  # names are case-insensitive
            body = b"".join([chunk async for chunk in answer.aiter_raw()])
    assert body == b"".join(lines)
    assert requests[0].startswith(b"POST /invocations HTTP/1.1\r\n") and b"\r\nAccept: a/b\r\n" in requests[0]


async def test_an_error_answer_is_read_whole(tmp_path):
    async def respond(_reader, writer):
        writer.write(b'HTTP/1.1 400 Bad Request\r\nContent-Length: 17\r\n\r\n{"error": "nope"}')

    async with raw_server(tmp_path, respond) as (address, _):
        async with open_stream(address, "/invocations", b"{}", {}, 10) as answer:
            assert answer.status_code == 400
            assert await answer.aread() == b'{"error": "nope"}'


async def test_a_connection_that_breaks_mid_answer_is_a_transport_error(tmp_path):
    async def respond(_reader, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"5\r\nhello\r\n")  # no last chunk

    async with raw_server(tmp_path, respond) as (address, _):
        async with open_stream(address, "/invocations", b"{}", {}, 10) as answer:
            with pytest.raises(httpx.RemoteProtocolError, match="closed the connection"):
                async for _ in answer.aiter_raw():
                    pass


async def test_leaving_early_closes_the_connection_so_the_instance_sees_its_client_go(tmp_path):
    client_left = asyncio.Event()

    async def respond(reader, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1\r\na\r\n")
        await writer.drain()
        while await reader.read(1024):  # the request's body, then EOF once the client closes its end
            pass
        client_left.set()

    async with raw_server(tmp_path, respond) as (address, _):
        async with open_stream(address, "/invocations", b"{}", {}, 10) as answer:
            async for chunk in answer.aiter_raw():
                assert chunk == b"a"
                break
        await asyncio.wait_for(client_left.wait(), timeout=5)


async def test_headers_that_would_split_the_request_are_refused_before_connecting(tmp_path):
    with pytest.raises(httpx.LocalProtocolError, match="line break"):
        async with open_stream(f"unix:{tmp_path / 'none.sock'}", "/invocations", b"{}", {"X-A": "v\r\nX-B: w"}, 10):
            pass


async def test_a_missing_instance_is_a_connect_error(tmp_path):
    with pytest.raises(httpx.ConnectError, match="cannot connect"):
        async with open_stream(f"unix:{tmp_path / 'none.sock'}", "/invocations", b"{}", {}, 10):
            pass


async def test_an_instance_that_goes_silent_times_out(tmp_path):
    async def respond(_reader, _writer):
        await asyncio.sleep(5)

    async with raw_server(tmp_path, respond) as (address, _):
        with pytest.raises(httpx.ReadTimeout, match="sent nothing"):
            async with open_stream(address, "/invocations", b"{}", {}, 0.3):
                pass
