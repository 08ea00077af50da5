"""Gateway admission: a bound on the requests in flight per endpoint, so a burst is refused at once (429 with
Retry-After) instead of queueing in the gateway's memory without end."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import Throttled

LIMIT_SETTING = "SERVELET_MAX_IN_FLIGHT_PER_ENDPOINT"


class Admission:
    """Counts each endpoint's real-time requests from routing to their answer's end (a stream: its last chunk)."""

    def __init__(self, limit: int | None):
        self.limit = limit  # None: unbounded
        self.in_flight: Counter[str] = Counter()

    @contextmanager
    def admit(self, endpoint: str) -> Iterator[None]:
        if self.limit is not None and self.in_flight[endpoint] >= self.limit:
            raise Throttled(
                f"endpoint {endpoint!r} already has {self.in_flight[endpoint]} requests in flight, its limit "
                f"({LIMIT_SETTING}={self.limit}); retry after one is answered"
            )
        self.in_flight[endpoint] += 1
        try:
            yield
        finally:
            self.in_flight[endpoint] -= 1
            if self.in_flight[endpoint] <= 0:
                del self.in_flight[endpoint]
