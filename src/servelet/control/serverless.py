"""Serverless variants, as SageMaker runs them: instances only while there are requests.

A variant with a `ServerlessConfig` is deployed with `ProvisionedConcurrency` instances, or one when it has none
(creation then proves that the model loads, as it does for any endpoint, and the idle timeout takes it to zero).
Its instances get `SERVELET_THREADS` from `MemorySizeInMB` (one vCPU per 1,769 MB, as Lambda sells CPU).

The router holds a request to a variant with no ready instance (or an ordinary variant that target tracking
scaled to zero) while `wake` starts one (bounded by
SERVELET_SERVERLESS_START_TIMEOUT, then 429 ModelNotReadyException), and refuses requests over `MaxConcurrency`.
The `ServerlessScaler` loop, beside the deployer and the autoscaler, compares the store's serverless variants
with what runs and scales them through the fleet:

    in     nothing came in for SERVELET_SERVERLESS_IDLE_SECONDS: down to ProvisionedConcurrency (or none);
           otherwise, once per idle timeout, down to what the busiest moment of that period needed
    out    every ready instance has a full batch in flight, the variant is below MaxConcurrency, none is
           starting already, and the machine has the cores for one more
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from dataclasses import dataclass

from ..errors import ModelNotReady, Unavailable
from ..sizing import serverless_threads
from .endpoints import Fleet, Variant, VariantNotFound, VariantPlan
from .instances import Instance
from .loop import ControlLoop
from .resources import EndpointStatus, ServerlessConfig
from .store import Store

log = logging.getLogger("servelet.serverless")

DEFAULT_MAX_BATCH_SIZE = 32  # the instances' own default (InstanceSettings.max_batch_size)
DRAIN_TIMEOUT_S = 120.0  # the longest a removed instance may take to finish its requests
START_POLL_S = 0.005  # a snapshot start is ready within about 0.1 s


def serverless_plan(plan: VariantPlan, config: ServerlessConfig) -> None:
    """Run `plan` serverless: its first instances (see the module's docstring) and the threads its memory buys."""
    plan.serverless = config
    plan.instances = config.provisioned_concurrency or 1
    cores = os.cpu_count() or 1
    plan.env = plan.env | {"SERVELET_THREADS": str(serverless_threads(config.memory_size_in_mb, cores))}


def max_batch_size(variant: Variant) -> int:
    """Sequences one instance decodes together: its SERVELET_MAX_BATCH_SIZE (or LMI's name), else the default."""
    env = os.environ | variant.env
    setting = env.get("SERVELET_MAX_BATCH_SIZE") or env.get("OPTION_MAX_ROLLING_BATCH_SIZE") or ""
    return int(setting) if setting.isdigit() and int(setting) > 0 else DEFAULT_MAX_BATCH_SIZE


@dataclass
class _Period:
    """One idle-timeout period of a variant: when it began and the most requests it had at once."""

    started: float
    peak: int = 0


class ServerlessScaler(ControlLoop):
    """The serverless reconciler, and the start of an instance for a request that finds none."""

    doing = "serverless scaling"

    def __init__(self, store: Store, fleet: Fleet, start_timeout: float, idle_seconds: float, request_timeout: float):
        self.store = store
        self.fleet = fleet
        self.start_timeout = start_timeout  # how long an instance may take to load (as for any endpoint)
        self.idle_seconds = idle_seconds
        self.request_timeout = request_timeout  # how long a request waits for a start
        # Often enough to see the idle timeout pass within a quarter of it, and to sample the load between.
        self.interval = min(max(idle_seconds / 4, 0.1), 5.0)
        self._periods: dict[int, _Period] = {}  # by id(Variant): a replaced variant starts a period of its own

    # -- a request finds no ready instance ------------------------------------------------------------------
    async def wake(self, endpoint: str, variant: Variant) -> Instance:
        """Start an instance (unless one is starting) and hold the caller until one is ready: its instance, or
        ModelNotReady past the bound. The held request counts toward MaxConcurrency and keeps the variant awake."""
        variant.waiting += 1
        try:
            if not variant.live_instances():
                log.info("endpoint %s variant %s has no instance: starting one for a request", endpoint, variant.name)
                try:
                    await self.fleet.scale(endpoint, variant.name, len(variant.instances) + 1, self.start_timeout, 0)
                except VariantNotFound:  # a variant of an update's new fleet: it starts with its own instances
                    raise Unavailable(f"variant {variant.name!r} of endpoint {endpoint!r} has no ready instance yet") from None
            deadline = time.monotonic() + self.request_timeout
            while (instance := variant.pick_instance()) is None:
                if not variant.live_instances():
                    reasons = [i.given_up for i in variant.instances if i.given_up]
                    why = reasons[-1] if reasons else "it was stopped"
                    raise Unavailable(f"endpoint {endpoint!r} could not start an instance of variant {variant.name!r}: {why}")
                if time.monotonic() >= deadline:
                    raise ModelNotReady(
                        f"endpoint {endpoint!r} is starting an instance of its variant {variant.name!r} (it had none); it "
                        f"was not ready within {self.request_timeout:g} s (SERVELET_SERVERLESS_START_TIMEOUT): retry shortly"
                    )
                await asyncio.sleep(START_POLL_S)
            return instance
        finally:
            variant.waiting -= 1
            variant.last_request = time.monotonic()

    # -- the loop -------------------------------------------------------------------------------------------
    async def tick(self) -> None:
        await self.reconcile()

    async def reconcile(self) -> None:
        """One pass over the InService endpoints' serverless variants (others are being created or updated)."""
        seen = set()
        for record in await asyncio.to_thread(self.store.list_endpoints):  # a slow store must not stall the data plane
            endpoint = self.fleet.endpoints.get(record.endpoint_name)
            if endpoint is None or record.endpoint_status is not EndpointStatus.IN_SERVICE:
                continue
            for variant in endpoint.blue.variants:
                if variant.serverless is not None:
                    seen.add(id(variant))
                    await self._reconcile(record.endpoint_name, variant)
        self._periods = {k: p for k, p in self._periods.items() if k in seen}

    async def _reconcile(self, endpoint: str, variant: Variant) -> None:
        now = time.monotonic()
        period = self._periods.setdefault(id(variant), _Period(now))
        period.peak = max(period.peak, variant.busy())
        live = len(variant.live_instances())
        if live > len(variant.ready_instances()):
            # A start in progress (perhaps for a request that gave up waiting): the idle clock begins once it is
            # ready, or a slow start would be stopped before it could serve anyone.
            variant.last_request = now
            return
        if self._saturated(variant):
            log.info("endpoint %s variant %s: every instance has a full batch in flight; starting instance %d",
                     endpoint, variant.name, live + 1)
            self._periods[id(variant)] = _Period(now, variant.busy())
            await self.fleet.scale(endpoint, variant.name, len(variant.instances) + 1, self.start_timeout, DRAIN_TIMEOUT_S)
            return
        if now - period.started < self.idle_seconds:
            return
        floor = variant.serverless.provisioned_concurrency or 0
        if variant.busy() == 0 and now - variant.last_request >= self.idle_seconds:
            keep = floor
        else:
            keep = max(floor, 1, math.ceil(period.peak / max_batch_size(variant)))
        self._periods[id(variant)] = _Period(now, variant.busy())
        if live > keep:
            log.info("endpoint %s variant %s: idle for %g s; %d instances -> %d",
                     endpoint, variant.name, self.idle_seconds, live, keep)
            await self.fleet.scale(endpoint, variant.name, keep, self.start_timeout, DRAIN_TIMEOUT_S)

    def _saturated(self, variant: Variant) -> bool:
        """Scale out only when every ready instance has a full batch (SERVELET_MAX_BATCH_SIZE) in flight: a
        llama.cpp instance decodes its whole batch in one step for little more than one sequence costs, so a
        second instance below that would only split the cores between two half-empty batches. Also only below
        MaxConcurrency (more instances would not be allowed more requests), with none starting already, and
        with the cores a new instance's threads need still free."""
        ready = variant.ready_instances()
        if not ready or len(variant.live_instances()) > len(ready):
            return False
        if variant.busy() >= variant.serverless.max_concurrency:
            return False
        if any(variant.in_flight[i.name] < max_batch_size(variant) for i in ready):
            return False
        return self.fleet.free_cores() >= int(variant.env.get("SERVELET_THREADS", "1"))
