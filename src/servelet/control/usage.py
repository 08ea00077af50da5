"""The cost meter: what each invocation of a serverless variant is billed, as Lambda bills a function.

An invocation costs `MemorySizeInMB / 1024 × duration` GB-seconds (its duration rounded up to the millisecond,
from the router handing it to an instance to its answer's last byte; time held for a start is not billed, as
SageMaker serverless does not bill its cold starts) plus one request. The request path only adds to two dicts;
the `CostMeter` loop writes what came in to the store once a second (a row per endpoint, variant and UTC day),
off the event loop, and once more when it closes.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from datetime import date, datetime, timezone

from .loop import ControlLoop
from .resources import UsageDay
from .store import Store

FLUSH_INTERVAL_S = 1.0


@dataclass
class Billed:
    """GB-seconds and requests, added up."""

    gb_seconds: float = 0.0
    requests: int = 0

    def add(self, gb_seconds: float, requests: int) -> None:
        self.gb_seconds += gb_seconds
        self.requests += requests


@dataclass(frozen=True)
class Rates:
    """Prices of the meter's two units (the settings' defaults are AWS Lambda's x86 list prices)."""

    per_gb_second: float
    per_million_requests: float

    def cost(self, gb_seconds: float, requests: int) -> float:
        return gb_seconds * self.per_gb_second + requests * self.per_million_requests / 1e6


def gb_seconds(memory_size_in_mb: int, seconds: float) -> float:
    """One invocation's GB-seconds: its duration rounded up to the millisecond, times its memory in GB."""
    return memory_size_in_mb / 1024 * math.ceil(seconds * 1000) / 1000


class CostMeter(ControlLoop):
    """Bills serverless invocations in memory and writes them to the store in batches."""

    doing = "writing usage to the store"

    def __init__(self, store: Store, interval: float = FLUSH_INTERVAL_S):
        self.store = store
        self.interval = interval
        self.totals: dict[tuple[str, str], Billed] = {}  # by (endpoint, variant), since start: for /metrics
        self._pending: dict[tuple[str, str, date], Billed] = {}  # not in the store yet

    def bill(self, endpoint: str, variant: str, memory_size_in_mb: int, seconds: float) -> None:
        """One invocation, on the request path: two dict updates, no I/O."""
        billed = gb_seconds(memory_size_in_mb, seconds)
        day = datetime.now(timezone.utc).date()
        self._pending.setdefault((endpoint, variant, day), Billed()).add(billed, 1)
        self.totals.setdefault((endpoint, variant), Billed()).add(billed, 1)

    async def flush(self) -> None:
        """Write what came in since the last flush; kept for the next one if the store refuses it."""
        pending, self._pending = self._pending, {}
        if not pending:
            return
        days = [
            UsageDay(endpoint_name=e, variant_name=v, day=d, gb_seconds=b.gb_seconds, requests=b.requests)
            for (e, v, d), b in pending.items()
        ]
        try:
            await asyncio.to_thread(self.store.add_usage, days)
        except Exception:
            for key, billed in pending.items():
                self._pending.setdefault(key, Billed()).add(billed.gb_seconds, billed.requests)
            raise

    async def tick(self) -> None:
        await self.flush()

    async def close(self) -> None:
        """Stop the loop and write what is left, so a clean stop loses nothing."""
        await super().close()
        await self.flush()
