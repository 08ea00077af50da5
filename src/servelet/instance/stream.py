"""One streamed call to an instance on a connection of its own, its answer parsed by httptools (uvicorn's C parser).

The gateway streams over an instance's stream channel (channel.py); it comes here when the channel is off, the
body too large for it, or the instance has none. Through httpx (httpcore, h11 and anyio under it) a chunk that
arrives alone cost ~280 µs of CPU (16 paced streams, a /tmp probe); here ~20 µs. On a small machine llama.cpp's
threads take every core and wait for each other, so CPU the relay takes is paid about twice in tokens/s
(docs/benchmarks.md). Whole answers, pings and everything else stay on httpx.

Errors are httpx's transport errors, so callers handle both paths alike.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import httptools
import httpx

READ_SIZE = 64 * 1024
# A header value holding one of these would end its line early: it could smuggle headers or a second request in.
HEADER_BREAKERS = ("\r", "\n", "\0")


class _Parsed:
    """httptools' callbacks: the answer's headers and body chunks as they are parsed."""

    def __init__(self) -> None:
        self.headers: list[tuple[str, str]] = []
        self.chunks: deque[bytes] = deque()
        self.head_done = False
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        self.chunks.append(bytes(body))

    def on_message_complete(self) -> None:
        self.complete = True


class QueuedAnswer:
    """An answer whose body chunks queue up as they arrive (here, or on the stream channel); read like httpx's
    streamed Response: status_code, headers, aiter_raw() and aread(). Subclasses say how more arrives."""

    status_code: int
    headers: httpx.Headers

    def _queue(self) -> deque[bytes]:
        raise NotImplementedError

    def _complete(self) -> bool:
        raise NotImplementedError

    async def _more(self) -> None:
        """Wait until something more arrives; raise httpx's transport errors if it cannot."""
        raise NotImplementedError

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive (chunked transfer encoding already undone); the chunks that came before
        an error are still read."""
        chunks = self._queue()
        while True:
            while chunks:
                yield chunks.popleft()
            if self._complete():
                return
            await self._more()

    async def aread(self) -> bytes:
        return b"".join([chunk async for chunk in self.aiter_raw()])


class StreamedAnswer(QueuedAnswer):
    """The answer on a connection of its own, parsed by httptools as it is read."""

    def __init__(self, reader: asyncio.StreamReader, read_timeout: float | None):
        self._reader = reader
        self._read_timeout = read_timeout
        self._parsed = _Parsed()
        self._parser = httptools.HttpResponseParser(self._parsed)
        self.status_code = 0
        self.headers = httpx.Headers()

    def _queue(self) -> deque[bytes]:
        return self._parsed.chunks

    def _complete(self) -> bool:
        return self._parsed.complete

    async def _read_head(self) -> None:
        while not self._parsed.head_done:
            await self._more()
        self.status_code = self._parser.get_status_code()
        self.headers = httpx.Headers(self._parsed.headers)

    async def _more(self) -> None:
        try:
            async with asyncio.timeout(self._read_timeout):
                data = await self._reader.read(READ_SIZE)
        except TimeoutError:
            raise httpx.ReadTimeout(f"the instance sent nothing for {self._read_timeout} s") from None
        except OSError as exc:
            raise httpx.ReadError(f"reading from the instance failed: {exc!r}") from None
        if not data:
            raise httpx.RemoteProtocolError("the instance closed the connection before its answer ended")
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            raise httpx.RemoteProtocolError(f"the instance's answer is not valid HTTP: {exc}") from None


def check_headers(headers: dict[str, str]) -> None:
    """Refuse headers HTTP cannot carry: a line break or NUL, or a character outside latin-1."""
    for name, value in headers.items():
        if any(c in name or c in value for c in HEADER_BREAKERS):
            raise httpx.LocalProtocolError(f"header {name!r} holds a line break or NUL, which HTTP cannot carry")
        try:
            f"{name}{value}".encode("latin-1")
        except UnicodeEncodeError as exc:
            raise httpx.LocalProtocolError(f"a header holds {exc.object[exc.start:exc.end]!r}, which HTTP cannot carry") from None


def _request_head(path: str, body: bytes, headers: dict[str, str]) -> bytes:
    check_headers(headers)
    lines = [f"POST {path} HTTP/1.1", "Host: instance", f"Content-Length: {len(body)}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _connect(address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if address.startswith("unix:"):
        return await asyncio.open_unix_connection(address.removeprefix("unix:"))
    url = urlsplit(address)
    return await asyncio.open_connection(url.hostname, url.port or 80)


@asynccontextmanager
async def open_stream(
    address: str, path: str, body: bytes, headers: dict[str, str], timeout: float | None
) -> AsyncIterator[StreamedAnswer]:
    """POST `body` to `path` and yield the answer once its headers are in; leaving closes the connection, which
    the instance takes as its client leaving (so a generation stops)."""
    head = _request_head(path, body, headers)
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await _connect(address)
    except TimeoutError:
        raise httpx.ConnectTimeout(f"connecting to the instance took over {timeout} s") from None
    except OSError as exc:
        raise httpx.ConnectError(f"cannot connect to the instance at {address}: {exc!r}") from None
    try:
        writer.write(head + body)
        answer = StreamedAnswer(reader, timeout)
        await answer._read_head()
        yield answer
    finally:
        writer.close()
