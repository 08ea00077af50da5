"""Endpoint records, read and written in a thread, one change per endpoint at a time.

The store is synchronous SQLAlchemy and the event loop carries every stream, so the control plane never queries it
on the loop. A thread call lets other tasks run between a read and its save; a change (read, modify, save) therefore
holds its endpoint's lock, so that two changes to one record (the deployer's progress notes and a deletion, say)
never interleave and lose one another.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from .resources import EndpointRecord
from .store import Store


class EndpointRecords:
    def __init__(self, store: Store):
        self.store = store
        self._locks: dict[str, asyncio.Lock] = {}
        # Told of every record saved (None: deleted), on the event loop: the gateway's data capture follows it.
        self.on_change: Callable[[str, EndpointRecord | None], None] | None = None

    async def get(self, name: str) -> EndpointRecord | None:
        return await asyncio.to_thread(self.store.get_endpoint, name)

    async def add(self, record: EndpointRecord) -> None:
        """Insert a new record; the store's AlreadyExists if the name is taken."""
        await asyncio.to_thread(self.store.add_endpoint, record)
        self._changed(record.endpoint_name, record)

    async def save(self, record: EndpointRecord) -> EndpointRecord:
        saved = await asyncio.to_thread(self.store.save_endpoint, record)
        self._changed(record.endpoint_name, record)
        return saved

    async def delete(self, name: str) -> None:
        """The record and the endpoint's scaling targets."""
        await asyncio.to_thread(self.store.delete_endpoint, name)
        await asyncio.to_thread(self.store.delete_scaling_targets, name)
        self._changed(name, None)

    def _changed(self, name: str, record: EndpointRecord | None) -> None:
        if self.on_change is not None:
            self.on_change(name, record)

    @asynccontextmanager
    async def change(self, name: str) -> AsyncIterator[EndpointRecord | None]:
        """The stored record (None: there is none) for a read-modify-write no other change interleaves with;
        `save` it inside the block."""
        async with self._locks.setdefault(name, asyncio.Lock()):
            yield await self.get(name)
