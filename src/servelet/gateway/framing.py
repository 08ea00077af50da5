"""Stream framings, each written once: server-sent events and AWS event-stream messages; the JSON-lines media type."""

from __future__ import annotations

import asyncio
import json
import struct
import zlib

import orjson
from starlette.responses import StreamingResponse

SSE = "text/event-stream"
JSON_LINES = "application/jsonlines"
EVENT_STREAM = "application/vnd.amazon.eventstream"
# Headers that keep proxies (nginx, ALBs) from buffering a stream: tokens must reach the client as they come.
UNBUFFERED = {"X-Accel-Buffering": "no", "Cache-Control": "no-cache"}
KEEPALIVE_SECONDS = 15.0


class ClosingStreamingResponse(StreamingResponse):
    """A stream sent as it comes: closes its body however the answer ends (done, client gone, error), cancelling
    the generation at once, and sends `keepalive` after `keepalive_seconds` without a chunk, if given one.

    Starlette leaves a body iterator suspended at its last `yield` when the client goes away during a send;
    it would be closed only when garbage-collected, keeping the engine slot busy until then. The keep-alive is a
    watchdog task beside the stream, so a token costs a clock read, not a task and a timer of its own (waiting
    for each item with a timeout took ~8 us per token more, measured in an event loop alone).
    """

    def __init__(  # StreamingResponse's parameters, spelled out: FastAPI reads `status_code`'s default from here
        self,
        content,
        status_code: int = 200,
        headers: dict[str, str] | None = None,
        media_type: str | None = None,
        *,
        keepalive: bytes | None = None,
        keepalive_seconds: float = KEEPALIVE_SECONDS,
    ):
        super().__init__(content, status_code, headers, media_type)
        self.keepalive = keepalive
        self.keepalive_seconds = keepalive_seconds

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()

    async def stream_response(self, send) -> None:
        if self.keepalive is None:
            await super().stream_response(send)
            return
        loop = asyncio.get_running_loop()
        sending = asyncio.Lock()  # a keep-alive never lands inside, or after, the stream's own messages
        last_sent = loop.time()

        async def send_in_turn(message) -> None:
            nonlocal last_sent
            async with sending:
                await send(message)
            last_sent = loop.time()

        async def keep_alive() -> None:
            while True:
                await asyncio.sleep(last_sent + self.keepalive_seconds - loop.time())
                if loop.time() - last_sent >= self.keepalive_seconds:
                    await send_in_turn({"type": "http.response.body", "body": self.keepalive, "more_body": True})

        watchdog = asyncio.create_task(keep_alive())
        try:
            await super().stream_response(send_in_turn)
        finally:
            watchdog.cancel()
            await asyncio.gather(watchdog, return_exceptions=True)


# -- server-sent events ----------------------------------------------------------------------------
def sse(data: dict | str, event: str | None = None) -> bytes:
    """One SSE event; `data` is JSON-encoded unless it is already a string (e.g. `[DONE]`)."""
    head = f"event: {event}\n".encode() if event else b""
    if not isinstance(data, str):  # JSON text is one line: it escapes its line breaks
        return head + b"data: " + orjson.dumps(data) + b"\n\n"
    return head + "".join(f"data: {line}\n" for line in data.split("\n")).encode() + b"\n"


SSE_KEEPALIVE = b": keep-alive\n\n"


# -- AWS event stream (application/vnd.amazon.eventstream) -----------------------------------------
_STRING_HEADER = 7


def _headers(headers: dict[str, str]) -> bytes:
    out = bytearray()
    for name, value in headers.items():
        raw_name, raw_value = name.encode(), value.encode()
        out += struct.pack("!B", len(raw_name)) + raw_name
        out += struct.pack("!BH", _STRING_HEADER, len(raw_value)) + raw_value
    return bytes(out)


def event_message(headers: dict[str, str], payload: bytes) -> bytes:
    """One binary message: prelude (total and header lengths, CRC32), headers, payload, message CRC32."""
    raw_headers = _headers(headers)
    total = 12 + len(raw_headers) + len(payload) + 4
    prelude = struct.pack("!II", total, len(raw_headers))
    prelude += struct.pack("!I", zlib.crc32(prelude))
    message = prelude + raw_headers + payload
    return message + struct.pack("!I", zlib.crc32(message))


def payload_part(chunk: bytes) -> bytes:
    """A SageMaker `PayloadPart` event carrying `chunk` as its `Bytes`."""
    return event_message(
        {":event-type": "PayloadPart", ":content-type": "application/octet-stream", ":message-type": "event"}, chunk
    )


def model_stream_error(message: str, error_code: str = "ModelStreamError") -> bytes:
    """SageMaker's `ModelStreamError` exception event: botocore raises it while the client iterates."""
    body = json.dumps({"Message": message, "ErrorCode": error_code}).encode()
    return event_message(
        {":exception-type": "ModelStreamError", ":content-type": "application/json", ":message-type": "exception"}, body
    )
