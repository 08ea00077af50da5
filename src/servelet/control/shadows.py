"""Shadow variants (SageMaker's shadow tests): a copy of a real-time request for the endpoint's shadow variant.

The router hands each request it forwards to a production variant here; the shadow gets a copy of the sampled
share (its InitialVariantWeight over the production variant's, at most all), sent in a task of its own beside the
production call, so the client's answer never waits for it and never sees it fail. The shadow's answer is read to
its end and discarded; its latency and status go to the report per variant, where the production variant's are
too, so the two compare in /metrics. A copy is dropped, and counted, when the shadow has no ready instance or
already has its bound of copies in flight (SERVELET_SHADOW_MAX_IN_FLIGHT): copies never queue.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

from ..errors import GatewayError
from .endpoints import Deployment, Variant
from .instances import Instance
from .invocation import Invocation

log = logging.getLogger("servelet.control")

LIMIT_SETTING = "SERVELET_SHADOW_MAX_IN_FLIGHT"
NOT_READY, AT_BOUND = "not_ready", "in_flight_bound"  # why a copy was dropped


class VariantReport(Protocol):
    """Where per-variant figures go (the gateway's metrics); nothing in control/ imports the gateway."""

    def answered(self, endpoint: str, variant: str, seconds: float) -> None:
        """A request or copy answered by `variant` in `seconds` (a stream: to its answer's start)."""

    def copied(self, endpoint: str, variant: str, status: str) -> None:
        """A copy's end: the shadow's HTTP status, or `timeout` / `error` when it gave none."""

    def dropped(self, endpoint: str, variant: str, reason: str) -> None:
        """A copy not sent: NOT_READY or AT_BOUND."""


def sampled(shadow: Variant, production: Variant) -> bool:
    """Whether this request is copied: the shadow's weight relative to the production variant's, accumulated, so
    that 0.5 copies every other request, 1 (or more) every request, 0 none."""
    share = min(1.0, shadow.weight / production.weight) if production.weight > 0 else 1.0
    shadow.copy_credit += share
    if shadow.copy_credit < 1 - 1e-9:
        return False
    shadow.copy_credit = max(0.0, shadow.copy_credit - 1)
    return True


class ShadowCopies:
    """Sends the copies, each bounded by the invocation timeout; at most `max_in_flight` per shadow variant."""

    def __init__(self, max_in_flight: int, timeout: float | None, report: VariantReport | None = None):
        self.max_in_flight = max_in_flight
        self.timeout = timeout
        self.report = report
        self._tasks: set[asyncio.Task] = set()  # held, so a copy in flight is not collected

    def send(self, endpoint: str, deployment: Deployment, production: Variant, invocation: Invocation) -> None:
        """Copy `invocation` to the deployment's shadow variants that sample it; returns at once."""
        for shadow in deployment.shadows:
            if not sampled(shadow, production):
                continue
            instance = shadow.pick_instance()
            reason = NOT_READY if instance is None else AT_BOUND if shadow.busy() >= self.max_in_flight else None
            if reason is not None:
                if self.report is not None:
                    self.report.dropped(endpoint, shadow.name, reason)
                continue
            try:
                headers = invocation.instance_headers()
            except GatewayError:
                return  # the production call refuses the same headers, with the client's answer
            shadow.in_flight[instance.name] += 1  # now, so the bound holds for the copies sent before this one runs
            task = asyncio.create_task(self._copy(endpoint, shadow, instance, invocation.body, headers))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _copy(self, endpoint: str, shadow: Variant, instance: Instance, body: bytes, headers: dict) -> None:
        """Forward the copy and drain its answer (streamed or whole alike); only the figures are kept."""
        started = shadow.last_request = time.monotonic()
        answered, status = None, "error"
        try:
            async with asyncio.timeout(self.timeout):
                async with instance.client.open_stream(body, headers) as response:
                    answered, status = time.monotonic() - started, str(response.status_code)
                    async for _ in response.aiter_raw():
                        pass
        except TimeoutError:
            status = "timeout"
        except Exception as exc:  # noqa: BLE001 - a copy's failure is a figure, never the client's problem
            status = "error"
            log.debug("endpoint %s: the copy to shadow variant %s failed: %r", endpoint, shadow.name, exc)
        finally:
            shadow.in_flight[instance.name] -= 1
            if shadow.in_flight[instance.name] <= 0:
                del shadow.in_flight[instance.name]
            shadow.last_request = ended = time.monotonic()
        latency = answered if answered is not None else ended - started
        shadow.served.record(status != "200", latency)
        if self.report is not None:
            self.report.copied(endpoint, shadow.name, status)
            self.report.answered(endpoint, shadow.name, latency)
