"""The instance's end of the stream channel (wire format: channel.py).

Each REQUEST runs through the instance's own app, just as if it had come on a connection of its own: the same
routes, limits and error answers. What the app sends is framed and gathered; one writer sends everything gathered
in an event-loop turn as one message. The engine hands a step's tokens to all its streams in one turn, so a step
leaves in one message.
"""

from __future__ import annotations

import asyncio
import logging

import orjson
from starlette.types import ASGIApp, Message
from starlette.websockets import WebSocket

from .channel import (
    ABORT, BODY, CANCEL, END, REQUEST, START, ChannelProtocolError, body_frames, frame, frames, messages, parse_request,
    start_payload,
)

log = logging.getLogger("servelet.instance")

JSON_HEADERS = [(b"content-type", b"application/json")]


class ChannelServer:
    """Serves one gateway's channel until it closes; a closed channel is a disconnect for every stream on it."""

    def __init__(self, app: ASGIApp, websocket: WebSocket):
        self._app = app
        self._websocket = websocket
        self._gone: dict[int, asyncio.Event] = {}  # stream id → set when the gateway cancels it
        self._tasks: set[asyncio.Task] = set()
        self._pending: list[bytes] = []
        self._has_pending = asyncio.Event()

    async def serve(self) -> None:
        await self._websocket.accept()
        writer = asyncio.create_task(self._write())
        try:
            while True:
                message = await self._websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                if message.get("bytes") is None:
                    raise ChannelProtocolError("the channel carries binary messages; a text message came")
                for stream_id, kind, payload in frames(message["bytes"]):
                    if kind == REQUEST:
                        self._open(stream_id, payload)
                    elif kind == CANCEL:
                        if gone := self._gone.get(stream_id):
                            gone.set()
                    else:
                        raise ChannelProtocolError(f"frame kind {kind} is not one a gateway sends")
        except ChannelProtocolError as exc:
            log.error("closing a stream channel: %s", exc)
            await self._websocket.close(code=1002, reason=str(exc)[:120])
        finally:
            for gone in self._gone.values():
                gone.set()
            writer.cancel()

    def _queue(self, stream_id: int, kind: int, payload: bytes = b"") -> None:
        if kind == BODY:
            self._pending.extend(body_frames(stream_id, payload))
        else:
            self._pending.append(frame(stream_id, kind, payload))
        self._has_pending.set()

    async def _write(self) -> None:
        """Wakes a turn after the first frame was queued, so the frames of that whole turn leave together (in
        messages no larger than the gateway reads)."""
        while True:
            await self._has_pending.wait()
            self._has_pending.clear()
            pending, self._pending = self._pending, []
            try:
                for message in messages(pending):
                    await self._websocket.send_bytes(message)
            except Exception as exc:  # the gateway left; the reader sees the disconnect
                log.debug("stream channel write failed: %r", exc)
                return

    def _refuse(self, stream_id: int, status: int, message: str, kind: str = "bad_request") -> None:
        """An answer in the instance's error shape (app.error_response), for a request the app never saw."""
        self._queue(stream_id, START, start_payload(status, JSON_HEADERS))
        self._queue(stream_id, BODY, orjson.dumps({"code": status, "error_type": kind, "error": message}))
        self._queue(stream_id, END)

    def _open(self, stream_id: int, payload: bytes) -> None:
        if stream_id in self._gone:  # an answer to it would mix with the open stream's frames
            raise ChannelProtocolError(f"stream {stream_id} is already open on this channel")
        try:
            path, headers, body = parse_request(payload)
            raw_headers = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers]
        except (ChannelProtocolError, UnicodeEncodeError) as exc:
            self._refuse(stream_id, 400, str(exc))
            return
        raw_headers = [(b"host", b"instance"), (b"content-length", str(len(body)).encode())] + [
            header for header in raw_headers if header[0] not in (b"host", b"content-length")
        ]
        self._gone[stream_id] = asyncio.Event()
        task = asyncio.create_task(self._run(stream_id, path, raw_headers, body))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _scope(self, path: str, headers: list[tuple[bytes, bytes]]) -> dict:
        path, _, query = path.partition("?")
        channel = self._websocket.scope
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},  # 2.3: a disconnect is told through receive()
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": query.encode(),
            "root_path": "",
            "headers": headers,
            "client": channel.get("client"),
            "server": channel.get("server"),
            "state": dict(channel.get("state") or {}),
        }

    async def _run(self, stream_id: int, path: str, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        gone = self._gone[stream_id]
        body_taken = started = finished = False

        async def receive() -> Message:
            nonlocal body_taken
            if not body_taken:
                body_taken = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            nonlocal started, finished
            if gone.is_set() or finished:
                return
            if message["type"] == "http.response.start":
                started = True
                self._queue(stream_id, START, start_payload(message["status"], message.get("headers", [])))
            elif message["type"] == "http.response.body":
                if chunk := message.get("body", b""):
                    self._queue(stream_id, BODY, bytes(chunk))
                if not message.get("more_body", False):
                    finished = True
                    self._queue(stream_id, END)

        try:
            await self._app(self._scope(path, headers), receive, send)
            if not (finished or gone.is_set()):
                self._queue(stream_id, ABORT, b"the answer ended before it was complete")
        except Exception as exc:
            if not (finished or gone.is_set()):
                if started:
                    self._queue(stream_id, ABORT, f"the answer broke off: {exc!r}".encode())
                else:
                    self._refuse(stream_id, 500, f"the instance failed: {exc!r}", "internal")
            log.error("stream %d on the channel failed: %r", stream_id, exc)
        finally:
            del self._gone[stream_id]
