"""Talking to an instance: over TCP or its Unix socket, whole answers or JSON-lines streams."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import httpx
import orjson

from . import stream as lean_stream
from .channel import MAX_CHANNEL_BODY_BYTES
from .channel_client import ChannelUnsupported, StreamChannel


class JsonLines:
    """Reassembles JSON lines from byte chunks split anywhere, even inside a UTF-8 character."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, chunk: bytes) -> list[dict]:
        self._buffer += chunk
        objects = []
        while (end := self._buffer.find(b"\n")) >= 0:
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if line.strip():
                objects.append(orjson.loads(line))
        return objects

    def close(self) -> list[dict]:
        """The last line may lack its newline; anything else left over is a truncated stream."""
        rest, self._buffer = bytes(self._buffer), bytearray()
        return [orjson.loads(rest)] if rest.strip() else []


async def iter_json_lines(chunks: AsyncIterator[bytes]) -> AsyncIterator[dict]:
    lines = JsonLines()
    async for chunk in chunks:
        for obj in lines.feed(chunk):
            yield obj
    for obj in lines.close():
        yield obj


@dataclass
class WholeAnswer:
    """An invocation's answer, read whole."""

    status_code: int
    headers: httpx.Headers
    content: bytes


class InstanceClient:
    """An async client for one instance; `address` is `http://host:port` or `unix:/path/to.sock`.

    Invocations, streamed or whole, share one stream channel (channel.py) unless `stream_channel` is off, the body
    is too large for it, or the instance refuses it; then a streamed call goes on a connection of its own
    (stream.py) and a whole one through httpx's pool."""

    def __init__(self, address: str, timeout: float | None = 300.0, stream_channel: bool = True):
        self._address, self._timeout = address, timeout
        self._channel = StreamChannel(address) if stream_channel else None
        # Plain HTTP to our own worker: no TLS context (building httpx's default one reads the CA bundle, 20 ms
        # on every instance start) and no proxy from the environment.
        if address.startswith("unix:"):
            transport = httpx.AsyncHTTPTransport(uds=address.removeprefix("unix:"), verify=False)
            self._http = httpx.AsyncClient(transport=transport, base_url="http://instance", timeout=timeout, trust_env=False)
        else:
            self._http = httpx.AsyncClient(base_url=address, timeout=timeout, verify=False, trust_env=False)

    async def ping(self) -> bool:
        try:
            return (await self._http.get("/ping")).status_code == 200
        except httpx.TransportError:
            return False

    async def health(self, timeout: float | None) -> tuple[dict | None, str | None]:
        """The /ping body when it answers 200 within `timeout` seconds (it carries running / waiting counts), and
        None; else None and what went wrong: a stopped process accepts the connection and never answers."""
        try:
            response = await self._http.get("/ping", timeout=timeout)
        except httpx.TimeoutException:
            return None, f"no answer to /ping within {timeout:g} s"
        except httpx.TransportError as exc:
            return None, f"/ping failed: {type(exc).__name__}: {exc}"
        if response.status_code != 200:
            return None, f"/ping answered {response.status_code}: {response.text[:300]}"
        return response.json(), None

    async def model_facts(self) -> dict | None:
        try:
            response = await self._http.get("/model")
        except httpx.TransportError:
            return None
        return response.json() if response.status_code == 200 else None

    def _channel_for(self, body: bytes) -> StreamChannel | None:
        """The stream channel, where a call with this body may go on it."""
        channel = self._channel
        if channel is None or channel.unsupported or len(body) > MAX_CHANNEL_BODY_BYTES:
            return None
        return channel

    async def post(self, body: bytes, headers: dict[str, str]) -> WholeAnswer:
        """Forward raw invocation bytes with their headers; the whole answer is read. On the channel where it can
        go: httpx's pool checks every idle connection for each request it sends (a `getpeername` and a `poll`
        each), which with many calls in flight cost the gateway more than the call itself (docs/benchmarks.md)."""
        if (channel := self._channel_for(body)) is not None:
            try:
                async with channel.open_stream("/invocations", body, headers, self._timeout) as answer:
                    return WholeAnswer(answer.status_code, answer.headers, await answer.aread())
            except ChannelUnsupported:
                pass
        response = await self._http.post("/invocations", content=body, headers=headers)
        return WholeAnswer(response.status_code, response.headers, response.content)

    @asynccontextmanager
    async def open_stream(self, body: bytes, headers: dict[str, str]):
        """Forward raw invocation bytes; yields the answer with its head read and its body not yet."""
        async with AsyncExitStack() as stack:
            answer = None
            if (channel := self._channel_for(body)) is not None:
                try:
                    answer = await stack.enter_async_context(channel.open_stream("/invocations", body, headers, self._timeout))
                except ChannelUnsupported:
                    pass
            if answer is None:
                answer = await stack.enter_async_context(
                    lean_stream.open_stream(self._address, "/invocations", body, headers, self._timeout)
                )
            yield answer

    @asynccontextmanager
    async def open_upload(self, chunks: AsyncIterator[bytes], headers: dict[str, str]):
        """Forward a body that arrives in chunks (an async job's input, read from the object store as it is sent);
        yields the answer with its head read and its body not yet, so neither side is ever whole in memory."""
        request = self._http.build_request("POST", "/invocations", content=chunks, headers=headers)
        response = await self._http.send(request, stream=True)
        try:
            yield response
        finally:
            await response.aclose()

    async def invoke(self, body: dict) -> httpx.Response:
        return await self._http.post("/invocations", json=body)

    async def stream(self, body: dict) -> AsyncIterator[dict]:
        """Yield the stream's JSON lines; raises httpx.HTTPStatusError if the instance refuses the request."""
        async with self._http.stream("POST", "/invocations", json=body | {"stream": True}) as response:
            if response.status_code != 200:
                await response.aread()
                response.raise_for_status()
            async for obj in iter_json_lines(response.aiter_raw()):
                yield obj

    async def aclose(self) -> None:
        if self._channel is not None:
            await self._channel.aclose()
        await self._http.aclose()
