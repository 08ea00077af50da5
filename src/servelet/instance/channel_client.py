"""The gateway's end of the stream channel (wire format: channel.py).

One WebSocket per instance, opened by the first streamed call and again by the first call after it closed. One
reader task takes each message apart and hands every frame to its stream's answer, so a step's tokens wake the
gateway once and its streams' writes to their clients follow one another in the next loop turn. The other way, the
requests (and cancels) of a loop turn leave together in one message: a message each cost the gateway a write and
websockets' framing per call (docs/benchmarks.md, the async queue).

Errors are httpx's transport errors, as on a connection of its own (stream.py), so callers handle both alike.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import httpx
from websockets.asyncio.client import ClientConnection, connect, unix_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from .channel import (
    ABORT, BODY, CANCEL, END, MAX_ANSWER_MESSAGE_BYTES, MAX_MESSAGE_BYTES, PATH, START, ChannelProtocolError, frame,
    frames, messages, parse_start, request_frame,
)
from .stream import QueuedAnswer, check_headers

CLOSE_TIMEOUT_S = 2.0
# An instance answers the handshake from its event loop at once; one that does not should not hold every stream.
HANDSHAKE_TIMEOUT_S = 10.0
# How an ASGI server refuses a WebSocket to a route it lacks (Starlette: 403, others 404).
NO_SUCH_ROUTE = (403, 404)


class ChannelUnsupported(Exception):
    """The instance refused the channel's handshake (an instance that predates it, or another container)."""


class ChannelAnswer(QueuedAnswer):
    """One call's answer on the channel, filled by the channel's reader as its frames arrive."""

    def __init__(self, connection: ClientConnection, read_timeout: float | None):
        self.connection = connection
        self.status_code = 0
        self.headers = httpx.Headers()
        self.complete = False
        self.error: Exception | None = None
        self._read_timeout = read_timeout
        self._started = False
        self._chunks: deque[bytes] = deque()
        self._arrival: asyncio.Future | None = None

    def deliver(self, kind: int, payload: bytes) -> None:
        if kind == BODY:
            self._chunks.append(payload)
        elif kind == START:
            # Latin-1, as HTTP/1.1 carries headers (the instance's server writes them so): a model answering with a
            # Content-Type past ASCII fails no other answer on the channel.
            self.status_code, headers = parse_start(payload)
            self.headers = httpx.Headers(headers, encoding="latin-1")
            self._started = True
        elif kind == END:
            self.complete = True
        elif kind == ABORT:
            self.error = httpx.RemoteProtocolError(f"the instance broke off its answer: {payload.decode(errors='replace')}")
        else:
            self.error = httpx.RemoteProtocolError(f"the instance sent frame kind {kind}, which no answer carries")
        self._wake()

    def fail(self, error: Exception) -> None:
        if not self.complete and self.error is None:
            self.error = error
            self._wake()

    def _wake(self) -> None:
        if self._arrival is not None and not self._arrival.done():
            self._arrival.set_result(None)

    def _queue(self) -> deque[bytes]:
        return self._chunks

    def _complete(self) -> bool:
        return self.complete

    async def _more(self) -> None:
        if self.error is not None:
            raise self.error
        self._arrival = asyncio.get_running_loop().create_future()
        try:
            if self._read_timeout is None:
                await self._arrival
            else:
                async with asyncio.timeout(self._read_timeout):
                    await self._arrival
        except TimeoutError:
            raise httpx.ReadTimeout(f"the instance sent nothing for {self._read_timeout} s") from None
        finally:
            self._arrival = None

    async def read_head(self) -> None:
        while not self._started:
            await self._more()


class StreamChannel:
    """Streamed calls to one instance (`http://host:port` or `unix:/path`), all on one WebSocket.

    A message over `max_message_bytes` closes the channel (its streams fail as on a broken connection)."""

    def __init__(self, address: str, max_message_bytes: int = MAX_ANSWER_MESSAGE_BYTES):
        self._address = address
        self._max_message_bytes = max_message_bytes
        self._connection: ClientConnection | None = None
        self._connecting = asyncio.Lock()
        self._answers: dict[int, ChannelAnswer] = {}
        self._stream_ids = itertools.cycle(range(1, 2**32))  # a frame head holds 32 bits
        self._background: set[asyncio.Task] = set()
        self._outbox: list[tuple[ClientConnection, int, bytes]] = []  # frames to send: (connection, stream id, frame)
        self._sending = False
        self.unsupported = False

    async def _connect(self) -> ClientConnection:
        options = dict(
            compression=None, max_size=self._max_message_bytes, open_timeout=None, close_timeout=CLOSE_TIMEOUT_S
        )
        if self._address.startswith("unix:"):
            return await unix_connect(self._address.removeprefix("unix:"), uri=f"ws://instance{PATH}", **options)
        url = urlsplit(self._address)
        return await connect(f"ws://{url.hostname}:{url.port or 80}{PATH}", proxy=None, **options)

    async def _connection_for_call(self, timeout: float | None) -> ClientConnection:
        async with self._connecting:
            if self._connection is not None:
                return self._connection
            limit = HANDSHAKE_TIMEOUT_S if timeout is None else min(timeout, HANDSHAKE_TIMEOUT_S)
            try:
                async with asyncio.timeout(limit):
                    connection = await self._connect()
            except InvalidStatus as exc:
                if exc.response.status_code not in NO_SUCH_ROUTE:
                    raise httpx.ConnectError(f"the instance at {self._address} failed the channel's handshake: {exc}") from None
                self.unsupported = True
                raise ChannelUnsupported(f"the instance at {self._address} has no stream channel: {exc}") from None
            except TimeoutError:
                raise httpx.ConnectTimeout(f"opening the stream channel took over {limit} s") from None
            except (OSError, InvalidHandshake) as exc:
                raise httpx.ConnectError(f"cannot connect to the instance at {self._address}: {exc!r}") from None
            self._connection = connection
            self._spawn(self._read(connection))
            return connection

    def _spawn(self, work) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _read(self, connection: ClientConnection) -> None:
        error: Exception = httpx.ReadError("the channel to the instance closed")
        try:
            async for message in connection:
                if isinstance(message, str):
                    raise ChannelProtocolError("the channel carries binary messages; a text message came")
                answers = self._answers
                for stream_id, kind, payload in frames(message):
                    if (answer := answers.get(stream_id)) is not None:
                        answer.deliver(kind, payload)
        except ConnectionClosed as exc:
            error = httpx.ReadError(f"the channel to the instance closed: {exc}")
        except (ChannelProtocolError, ValueError, KeyError, TypeError) as exc:
            error = httpx.RemoteProtocolError(f"the instance sent a malformed channel message: {exc}")
            await connection.close(code=1002)
        finally:
            if self._connection is connection:
                self._connection = None
            for answer in list(self._answers.values()):
                if answer.connection is connection:
                    answer.fail(error)

    @asynccontextmanager
    async def open_stream(
        self, path: str, body: bytes, headers: dict[str, str], timeout: float | None
    ) -> AsyncIterator[ChannelAnswer]:
        """POST `body` to `path` and yield the answer once its head is in; leaving before its end cancels the
        call in the instance (a generation stops), as closing its own connection would."""
        check_headers(headers)
        connection = await self._connection_for_call(timeout)
        stream_id = next(self._stream_ids)
        answer = self._answers[stream_id] = ChannelAnswer(connection, timeout)
        try:
            self._post(connection, stream_id, request_frame(stream_id, path, headers, body))
            await answer.read_head()  # a request that could not be sent fails its answer (httpx.WriteError)
            yield answer
        finally:
            del self._answers[stream_id]
            if not answer.complete and answer.error is None:
                self._post(connection, stream_id, frame(stream_id, CANCEL))

    def _post(self, connection: ClientConnection, stream_id: int, data: bytes) -> None:
        """Queue a frame; one task sends what a loop turn queued, in order, as few messages as the instance takes."""
        self._outbox.append((connection, stream_id, data))
        if not self._sending:
            self._sending = True
            self._spawn(self._send_outbox())

    async def _send_outbox(self) -> None:
        try:
            while self._outbox:
                connection = self._outbox[0][0]
                queued = [item for item in self._outbox if item[0] is connection]  # another: a channel opened since
                self._outbox = [item for item in self._outbox if item[0] is not connection]
                try:
                    for message in messages([data for _, _, data in queued], MAX_MESSAGE_BYTES):
                        await connection.send(message)
                except Exception as exc:  # noqa: BLE001 - closed or broken: each call whose frame did not go hears
                    error = httpx.WriteError(f"the channel to the instance closed: {exc}")
                    for _, stream_id, _ in queued:
                        if (answer := self._answers.get(stream_id)) is not None and answer.connection is connection:
                            answer.fail(error)
        finally:
            self._sending = False

    async def aclose(self) -> None:
        if self._connection is not None:
            await self._connection.close()
