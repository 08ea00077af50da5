"""The stream channel's message bound: the gateway reads no message larger than it, and an instance's long answer
still arrives whole, split into messages within it. Real sockets, the gateway's own channel client."""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, WebSocket
from fastapi.responses import Response
from websockets.asyncio.server import unix_serve

from servelet.instance.channel import (
    BODY, MAX_ANSWER_MESSAGE_BYTES, PATH, START, body_frames, frame, frames, messages, start_payload,
)
from servelet.instance.channel_client import StreamChannel
from servelet.instance.channel_server import ChannelServer

LONG_ANSWER = bytes(range(256)) * (3 * MAX_ANSWER_MESSAGE_BYTES // 256 + 7)  # three messages' worth and a bit


def instance_app(sizes: list[int]) -> FastAPI:
    """An instance's two routes: /invocations answers LONG_ANSWER; the channel notes each message's size."""
    app = FastAPI()

    @app.post("/invocations")
    async def invocations():
        return Response(LONG_ANSWER, media_type="application/octet-stream")

    @app.websocket(PATH)
    async def channel(websocket: WebSocket):
        send_bytes = websocket.send_bytes

        async def noted(data: bytes) -> None:
            sizes.append(len(data))
            await send_bytes(data)

        websocket.send_bytes = noted
        await ChannelServer(app, websocket).serve()

    return app


@contextlib.asynccontextmanager
async def serving(app, socket_path):
    server = uvicorn.Server(uvicorn.Config(app, uds=str(socket_path), log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield
    finally:
        server.should_exit = True
        await task


async def test_a_long_answer_arrives_whole_in_messages_within_the_bound(tmp_path):
    sizes: list[int] = []
    async with serving(instance_app(sizes), tmp_path / "instance.sock"):
        channel = StreamChannel(f"unix:{tmp_path / 'instance.sock'}")
        try:
            async with channel.open_stream("/invocations", b"{}", {"Content-Type": "application/json"}, 30) as answer:
                assert answer.status_code == 200
                assert await answer.aread() == LONG_ANSWER
        finally:
            await channel.aclose()
    assert len(sizes) >= 4 and max(sizes) <= MAX_ANSWER_MESSAGE_BYTES


async def test_a_message_over_the_bound_fails_the_streams_instead_of_being_held(tmp_path):
    """An instance that sends one message larger than the bound (no servelet instance does): the channel closes."""
    socket_path = tmp_path / "rogue.sock"

    async def rogue(connection):
        async for message in connection:
            stream_id = next(frames(message))[0]
            head = frame(stream_id, START, start_payload(200, [(b"content-type", b"application/octet-stream")]))
            await connection.send(head + frame(stream_id, BODY, b"x" * (2 * MAX_ANSWER_MESSAGE_BYTES)))

    async with unix_serve(rogue, str(socket_path), max_size=None):
        channel = StreamChannel(f"unix:{socket_path}")
        try:
            with pytest.raises(httpx.TransportError, match="channel to the instance closed"):
                async with channel.open_stream("/invocations", b"{}", {}, 30) as answer:
                    await answer.aread()
        finally:
            await channel.aclose()


def test_frames_are_grouped_into_messages_within_the_bound():
    chunk = b"y" * (2 * 1000 + 5)
    pieces = list(body_frames(3, chunk, limit=1000))
    assert all(len(piece) <= 1000 for piece in pieces) and len(pieces) == 3
    assert b"".join(payload for _, _, payload in frames(b"".join(pieces))) == chunk
    small = [frame(1, BODY, b"z" * 100)] * 25  # 109 bytes each
    grouped = list(messages(small + pieces, limit=1000))
    assert all(len(message) <= 1000 for message in grouped)
    assert b"".join(grouped) == b"".join(small + pieces)
    assert len(grouped) == 3 + 3  # 9 small frames fit a message; each piece fills one
