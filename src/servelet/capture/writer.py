"""Captured invocations wait in memory, within a bound, and are written to the object store in the background.

The request path only appends (`add`: no await, no I/O, never raises); past the bound a record is dropped and
counted. A loop writes every `flush_seconds`, or at once when one folder's records reach `file_bytes`: one new
file per destination folder (endpoint, variant, hour) each time, through `objects` (s3:// or file://, atomic). A
write that fails is logged and counted and its records are dropped, so capture never fails an invocation; `close`
writes what is left.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

from .. import objects
from .records import CapturedInvocation, file_name, folder, line

log = logging.getLogger("servelet.capture")

CONTENT_TYPE = "application/jsonlines"
CLOSE_TIMEOUT_S = 30.0  # what a gateway's stop waits at most for the last writes


class CaptureWriter:
    def __init__(self, buffer_bytes: int, file_bytes: int, flush_seconds: float):
        self.buffer_bytes, self.file_bytes, self.flush_seconds = buffer_bytes, file_bytes, flush_seconds
        self._pending: dict[tuple[str, str], list[CapturedInvocation]] = {}  # (destination, folder) -> records
        self._pending_bytes: Counter[tuple[str, str]] = Counter()
        self.held_bytes = 0  # records waiting or being written: what the bound limits
        self.written: Counter[str] = Counter()  # records written, by endpoint
        self.dropped: Counter[tuple[str, str]] = Counter()  # records dropped, by endpoint and reason
        self.write_errors: Counter[str] = Counter()  # files that could not be written, by endpoint
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task | None = None

    def add(self, event: CapturedInvocation) -> None:
        """Buffer a record for the next write; drop it (counted) when the buffer cannot take it."""
        size = event.size
        if self.held_bytes + size > self.buffer_bytes:
            self.drop(event.endpoint, "buffer_full")
            return
        key = (event.destination, folder(event))
        self._pending.setdefault(key, []).append(event)
        self._pending_bytes[key] += size
        self.held_bytes += size
        if self._pending_bytes[key] >= self.file_bytes:
            self._wake.set()

    def drop(self, endpoint: str, reason: str) -> None:
        self.dropped[(endpoint, reason)] += 1

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="data-capture-writer")

    async def close(self) -> None:
        """Stop the loop and write what is buffered (at most CLOSE_TIMEOUT_S: a stop must end)."""
        self._closing = True
        self._wake.set()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                if self._task is not None:
                    await self._task
                await self.flush()
        except TimeoutError:
            log.warning("data capture: the last writes took over %g s; %d bytes of records were not written",
                        CLOSE_TIMEOUT_S, self.held_bytes)

    async def _run(self) -> None:
        while not self._closing:
            try:
                async with asyncio.timeout(self.flush_seconds):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        """Write every buffered record: one file per destination folder."""
        pending, self._pending, self._pending_bytes = self._pending, {}, Counter()
        for (destination, where), events in pending.items():
            try:
                await self._write(destination, where, events)
            except Exception as exc:  # noqa: BLE001 - a capture write never reaches the invocations
                endpoint = events[0].endpoint
                self.write_errors[endpoint] += 1
                self.dropped[(endpoint, "write_error")] += len(events)
                log.warning("data capture: endpoint %s: %d record(s) not written under %s: %s: %s",
                            endpoint, len(events), destination, type(exc).__name__, exc)
            finally:
                self.held_bytes -= sum(event.size for event in events)

    async def _write(self, destination: str, where: str, events: list[CapturedInvocation]) -> None:
        uri = objects.join(destination, f"{where}/{file_name(events[0].time)}")
        data = await asyncio.to_thread(_lines, events)  # base64 and JSON of megabytes: off the event loop
        await objects.write_bytes(uri, data, CONTENT_TYPE, events[0].kms_key_id)
        self.written[events[0].endpoint] += len(events)


def _lines(events: list[CapturedInvocation]) -> bytes:
    return b"".join(line(event) for event in events)
