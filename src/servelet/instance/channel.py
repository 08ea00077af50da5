"""The stream channel's wire format: many streamed calls to one instance over one WebSocket.

Each streamed call on its own connection costs the gateway a read, a parse and often a wakeup for every token,
and the instance a write for every token: with 16 streams that is 16 of each per engine step, spread over the
step and woven between llama.cpp's threads (docs/benchmarks.md). On the channel the instance sends one message
per event-loop turn carrying every stream's new chunks, so a step's tokens cross in one write and one read.

A WebSocket message is a run of frames; a frame is a 9-byte head (stream id, kind, payload length; network
order) and its payload. Gateway → instance: REQUEST (a JSON head `{"path", "headers"}`, its length first, then
the body) and CANCEL. Instance → gateway: START (JSON `{"status", "headers"}`), BODY (a chunk), END, and ABORT
(the answer broke off after it started; the payload says why).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import orjson

PATH = "/channel"
FRAME_HEAD = struct.Struct("!IBI")
REQUEST_HEAD_LENGTH = struct.Struct("!I")

REQUEST, CANCEL, START, BODY, END, ABORT = range(1, 7)
# Calls with larger bodies go on a connection of their own, so one big message never holds up the others.
MAX_CHANNEL_BODY_BYTES = 1024 * 1024
# The instance accepts messages up to this size: the largest request plus its head.
MAX_MESSAGE_BYTES = MAX_CHANNEL_BODY_BYTES + 64 * 1024
# The instance's messages stay within this (a longer chunk goes as several BODY frames), so the gateway can refuse
# anything larger instead of holding whatever an instance sends in memory.
MAX_ANSWER_MESSAGE_BYTES = 1024 * 1024


class ChannelProtocolError(ValueError):
    """A message that does not parse as frames."""


def frame(stream_id: int, kind: int, payload: bytes = b"") -> bytes:
    return FRAME_HEAD.pack(stream_id, kind, len(payload)) + payload


def frames(message: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(stream id, kind, payload) for each frame in a message."""
    view, offset, size = memoryview(message), 0, len(message)
    while offset < size:
        if size - offset < FRAME_HEAD.size:
            raise ChannelProtocolError(f"a frame head at byte {offset} is cut short")
        stream_id, kind, length = FRAME_HEAD.unpack_from(view, offset)
        offset += FRAME_HEAD.size
        if size - offset < length:
            raise ChannelProtocolError(f"frame {kind} of stream {stream_id} claims {length} bytes; {size - offset} remain")
        yield stream_id, kind, bytes(view[offset : offset + length])
        offset += length


def body_frames(stream_id: int, chunk: bytes, limit: int = MAX_ANSWER_MESSAGE_BYTES) -> Iterator[bytes]:
    """A chunk as BODY frames of at most `limit` bytes each, head included."""
    size = limit - FRAME_HEAD.size
    for start in range(0, len(chunk), size):
        yield frame(stream_id, BODY, chunk[start : start + size])


def messages(pending: list[bytes], limit: int = MAX_ANSWER_MESSAGE_BYTES) -> Iterator[bytes]:
    """Frames joined into as few messages as stay within `limit` (a frame longer than it goes alone)."""
    group: list[bytes] = []
    size = 0
    for item in pending:
        if group and size + len(item) > limit:
            yield b"".join(group)
            group, size = [], 0
        group.append(item)
        size += len(item)
    if group:
        yield b"".join(group)


def request_frame(stream_id: int, path: str, headers: dict[str, str], body: bytes) -> bytes:
    head = orjson.dumps({"path": path, "headers": list(headers.items())})
    return frame(stream_id, REQUEST, REQUEST_HEAD_LENGTH.pack(len(head)) + head + body)


def parse_request(payload: bytes) -> tuple[str, list[tuple[str, str]], bytes]:
    """(path, headers, body) of a REQUEST frame's payload."""
    if len(payload) < REQUEST_HEAD_LENGTH.size:
        raise ChannelProtocolError("a request frame is too short to hold its head's length")
    (head_length,) = REQUEST_HEAD_LENGTH.unpack_from(payload)
    head_end = REQUEST_HEAD_LENGTH.size + head_length
    try:
        head = orjson.loads(payload[REQUEST_HEAD_LENGTH.size : head_end])
        path, headers = head["path"], [(str(name), str(value)) for name, value in head["headers"]]
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ChannelProtocolError(f"a request frame's head is not {{'path', 'headers'}} JSON: {exc}") from None
    if not isinstance(path, str) or not path.startswith("/"):
        raise ChannelProtocolError(f"a request frame's path {path!r} does not start with /")
    return path, headers, payload[head_end:]


def start_payload(status: int, headers: list[tuple[bytes, bytes]]) -> bytes:
    return orjson.dumps({"status": status, "headers": [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers]})


def parse_start(payload: bytes) -> tuple[int, list[tuple[str, str]]]:
    head = orjson.loads(payload)
    return int(head["status"]), [(name, value) for name, value in head["headers"]]
