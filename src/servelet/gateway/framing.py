"""Stream framings, each written once: server-sent events, JSON lines, and AWS event-stream messages."""

from __future__ import annotations

import asyncio
import json
import struct
import zlib
from collections.abc import AsyncIterator

from starlette.responses import StreamingResponse

SSE = "text/event-stream"
JSON_LINES = "application/jsonlines"
EVENT_STREAM = "application/vnd.amazon.eventstream"
# Headers that keep proxies (nginx, ALBs) from buffering a stream: tokens must reach the client as they come.
UNBUFFERED = {"X-Accel-Buffering": "no", "Cache-Control": "no-cache"}
KEEPALIVE_SECONDS = 15.0


class ClosingStreamingResponse(StreamingResponse):
    """Closes its stream however the response ends (done, client gone, error), cancelling the generation at once.

    Starlette leaves a body iterator suspended at its last `yield` when the client goes away during a send;
    it would be closed only when garbage-collected, keeping the engine slot busy until then.
    """

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


# -- server-sent events ----------------------------------------------------------------------------
def sse(data: dict | str, event: str | None = None) -> bytes:
    """One SSE event; `data` is JSON-encoded unless it is already a string (e.g. `[DONE]`)."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    head = f"event: {event}\n" if event else ""
    return (head + "".join(f"data: {line}\n" for line in text.split("\n")) + "\n").encode()


SSE_KEEPALIVE = b": keep-alive\n\n"


async def with_keepalive(
    items: AsyncIterator[bytes], keepalive: bytes, seconds: float = KEEPALIVE_SECONDS
) -> AsyncIterator[bytes]:
    """Pass `items` through, sending `keepalive` whenever nothing else was sent for `seconds`."""
    iterator = items.__aiter__()
    pending: asyncio.Future | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(iterator.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=seconds)
            if not done:
                yield keepalive
                continue
            finished, pending = pending, None
            try:
                item = finished.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            await asyncio.wait({pending})  # the source must stop running before it can be closed
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()


# -- JSON lines -------------------------------------------------------------------------------------
def json_line(obj: dict) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode()


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
