"""The cost meter: what serverless variants are billed, as Lambda bills a function (with SnapStart).

An invocation costs `MemorySizeInMB / 1024 × duration` GB-seconds (its duration rounded up to the millisecond,
from the router handing it to an instance to its answer's last byte; time held for a start is not billed, as
SageMaker serverless does not bill its cold starts) plus one request. A serverless variant whose snapshot template
is ready is billed `MemorySizeInMB / 1024` GB for every second the template is held (cached GB-seconds), and each
instance forked from it one restore of `MemorySizeInMB / 1024` GB, as Lambda bills a SnapStart function's cache
and restores. The request path only adds to two dicts; the `CostMeter` loop adds the cache held since its last
pass and writes what came in to the store once a second (a row per endpoint, variant and UTC day), off the event
loop, and once more when it closes.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from datetime import date, datetime, timezone
from typing import NamedTuple

from .instances import SNAPSHOT, StartRecord
from .loop import ControlLoop
from .resources import UsageDay
from .store import Store

FLUSH_INTERVAL_S = 1.0


@dataclass
class Billed:
    """The meter's four units, added up (named as UsageDay's figures)."""

    gb_seconds: float = 0.0
    requests: int = 0
    cache_gb_seconds: float = 0.0
    restored_gb: float = 0.0

    def add(self, other: Billed) -> None:
        for figure in fields(self):
            setattr(self, figure.name, getattr(self, figure.name) + getattr(other, figure.name))


@dataclass(frozen=True)
class Rates:
    """Prices of the meter's units (the settings' defaults are AWS Lambda's x86 list prices)."""

    per_gb_second: float
    per_million_requests: float
    per_cached_gb_second: float = 0.0
    per_restored_gb: float = 0.0

    def cost(self, billed: Billed | UsageDay) -> float:
        return (billed.gb_seconds * self.per_gb_second + billed.requests * self.per_million_requests / 1e6
                + billed.cache_gb_seconds * self.per_cached_gb_second + billed.restored_gb * self.per_restored_gb)


class HeldTemplate(NamedTuple):
    """A serverless variant whose snapshot template is ready (the fleet's `serverless_templates_held` gives them)."""

    endpoint: str
    variant: str
    memory_size_in_mb: int
    ready_since: float  # time.monotonic() when the template became ready


HeldTemplates = Callable[[], Iterable[tuple[str, str, int, float]]]


def gb_seconds(memory_size_in_mb: int, seconds: float) -> float:
    """One invocation's GB-seconds: its duration rounded up to the millisecond, times its memory in GB."""
    return memory_size_in_mb / 1024 * math.ceil(seconds * 1000) / 1000


class CostMeter(ControlLoop):
    """Bills serverless invocations, snapshot caches and restores in memory and writes them to the store in batches.

    `held_templates` tells which serverless variants hold a ready template now (the fleet's answer), so that the
    meter needs nothing of the fleet or the gateway."""

    doing = "writing usage to the store"

    def __init__(self, store: Store, held_templates: HeldTemplates = tuple, interval: float = FLUSH_INTERVAL_S):
        self.store = store
        self.held_templates = held_templates
        self.interval = interval
        self.totals: dict[tuple[str, str], Billed] = {}  # by (endpoint, variant), since start: for /metrics
        self._pending: dict[tuple[str, str, date], Billed] = {}  # not in the store yet
        self._cache_billed_until = time.monotonic()

    def bill(self, endpoint: str, variant: str, memory_size_in_mb: int, seconds: float) -> None:
        """One invocation, on the request path: two dict updates, no I/O."""
        self._charge(endpoint, variant, Billed(gb_seconds=gb_seconds(memory_size_in_mb, seconds), requests=1))

    def instance_started(self, endpoint: str, variant: str, start: StartRecord) -> None:
        """The fleet's start hook: a snapshot start of a serverless variant is one restore of its memory. Its
        variant is found among those holding a template: the one it was forked from."""
        if start.kind != SNAPSHOT:
            return
        for held in map(HeldTemplate._make, self.held_templates()):
            if (held.endpoint, held.variant) == (endpoint, variant):
                self._charge(endpoint, variant, Billed(restored_gb=held.memory_size_in_mb / 1024))
                return

    def bill_cache(self, now: float | None = None) -> None:
        """The templates held since the last pass (or since each became ready), every serverless variant for its
        own memory even where variants share a template: Lambda caches each function's snapshot apart."""
        now = time.monotonic() if now is None else now
        since, self._cache_billed_until = self._cache_billed_until, now
        for held in map(HeldTemplate._make, self.held_templates()):
            seconds = now - max(since, held.ready_since)
            if seconds > 0:
                self._charge(held.endpoint, held.variant, Billed(cache_gb_seconds=held.memory_size_in_mb / 1024 * seconds))

    def _charge(self, endpoint: str, variant: str, billed: Billed) -> None:
        day = datetime.now(timezone.utc).date()
        self._pending.setdefault((endpoint, variant, day), Billed()).add(billed)
        self.totals.setdefault((endpoint, variant), Billed()).add(billed)

    async def flush(self) -> None:
        """Write what came in since the last flush; kept for the next one if the store refuses it."""
        pending, self._pending = self._pending, {}
        if not pending:
            return
        days = [
            UsageDay(endpoint_name=e, variant_name=v, day=d, **vars(billed)) for (e, v, d), billed in pending.items()
        ]
        try:
            await asyncio.to_thread(self.store.add_usage, days)
        except Exception:
            for key, billed in pending.items():
                self._pending.setdefault(key, Billed()).add(billed)
            raise

    async def tick(self) -> None:
        self.bill_cache()
        await self.flush()

    async def close(self) -> None:
        """Stop the loop and write what is left, so a clean stop loses nothing."""
        await super().close()
        self.bill_cache()
        await self.flush()
