"""Routing an invocation: endpoint → deployment (blue or green, by the update's traffic share) → variant (by
weight, or pinned) → ready instance, and forwarding to it. Each forwarded request is counted in flight while it
runs (so a fleet can drain before it stops) and its outcome is recorded for the update alarms. A real-time request
(`invoke`, `stream`: every API family's) is also copied to the deployment's shadow variant, if any (shadows.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx

from ..errors import (
    BadRequest, GatewayError, ModelFailed, ModelTimedOut, NoReadyInstance, NotFound, PayloadTooLarge, Throttled,
    Unprocessable, UnsupportedMediaType, from_instance,
)
from ..instance.contract import ASYNC_INVOCATION_HEADER
from ..instance.stream import QueuedAnswer
from .admission import Admission
from .catalog import CATALOG_HINT
from .endpoints import Deployment, EndpointNotFound, Fleet, Variant, VariantNotFound
from .instances import Instance
from .invocation import Answer, ChunkStream, Invocation
from .shadows import ShadowCopies, VariantReport

if TYPE_CHECKING:
    from .catalog import Catalog
    from .serverless import ServerlessScaler
    from .usage import CostMeter

# The caller's mistakes: they say nothing about the fleet's health, so alarms do not count them.
CLIENT_ERRORS = (BadRequest, NotFound, PayloadTooLarge, UnsupportedMediaType, Unprocessable)


@dataclass
class Route:
    deployment: Deployment
    variant: Variant
    instance: Instance

    @contextmanager
    def serving(
        self, meter: CostMeter | None = None, endpoint: str = "", report: VariantReport | None = None
    ) -> Iterator[dict]:
        """Count the request in flight on its instance; record its outcome and latency (until `first_byte`
        is set, for streams) for the alarms and on `report`. Only the fleet's own errors count as failures; a request
        the client abandoned is no outcome. A serverless variant's request is billed to `endpoint` on `meter`,
        whatever its outcome."""
        in_flight = self.variant.in_flight
        in_flight[self.instance.name] += 1
        started = self.variant.last_request = time.monotonic()
        timing: dict = {}
        failed = True
        try:
            yield timing
            failed = False
        except CLIENT_ERRORS:
            failed = False
            raise
        except GatewayError:
            raise
        except BaseException:  # cancelled, or the client left
            failed = None
            raise
        finally:
            in_flight[self.instance.name] -= 1
            if in_flight[self.instance.name] <= 0:
                del in_flight[self.instance.name]
            self.variant.last_request = ended = time.monotonic()
            if meter is not None and self.variant.serverless is not None:
                meter.bill(endpoint, self.variant.name, self.variant.serverless.memory_size_in_mb,
                           ended - started)
            if failed is not None:
                latency = timing.get("first_byte", ended) - started
                self.deployment.outcomes.record(failed, latency)
                self.variant.served.record(failed, latency)
                if report is not None:
                    report.answered(endpoint, self.variant.name, latency)


class Cold(Exception):
    """A serverless variant with no ready instance, or a variant scaled to zero: the request waits for one to start."""

    def __init__(self, deployment: Deployment, variant: Variant):
        self.deployment, self.variant = deployment, variant


class Router:
    def __init__(
        self, fleet: Fleet, invocation_timeout: float | None = None, serverless: ServerlessScaler | None = None,
        meter: CostMeter | None = None, max_in_flight_per_endpoint: int | None = None, max_shadow_copies: int = 32,
    ):
        self.fleet = fleet
        self.admission = Admission(max_in_flight_per_endpoint)  # real-time requests only: async jobs have slots
        self.invocation_timeout = invocation_timeout  # seconds an instance may take to answer (a stream: to start)
        self.serverless = serverless  # starts instances of serverless variants at zero
        self.meter = meter  # bills serverless invocations
        self.catalog: Catalog | None = None  # deploys a catalog id on its first invocation (set by the gateway)
        # Copies real-time requests to shadow variants, at most `max_shadow_copies` in flight per shadow; its report
        # (set by the gateway) also takes the production variant's latency in a shadow test.
        self.shadows = ShadowCopies(max_shadow_copies, invocation_timeout)

    def route(self, invocation: Invocation) -> Route:
        """The deployment, variant and instance that will serve `invocation`; NotFound / Unavailable / Throttled
        otherwise, or Cold for a serverless variant that must start an instance first."""
        try:
            deployment, variant = self.fleet.get(invocation.endpoint).route(invocation.target_variant)
        except EndpointNotFound as exc:
            raise NotFound(f"{exc}; {CATALOG_HINT}") from None
        except VariantNotFound as exc:
            raise NotFound(str(exc)) from None
        if variant.serverless is not None and variant.busy() >= variant.serverless.max_concurrency:
            raise Throttled(
                f"endpoint {invocation.endpoint!r} variant {variant.name!r} already has its MaxConcurrency of "
                f"{variant.serverless.max_concurrency} requests in flight; retry after one is answered"
            )
        instance = variant.pick_instance()
        if instance is None:
            # Serverless, or scaled to zero (target tracking with MinCapacity 0): the request starts an instance.
            if (variant.serverless is not None or not variant.instances) and self.serverless is not None:
                raise Cold(deployment, variant)
            raise NoReadyInstance(
                f"endpoint {invocation.endpoint!r} has no ready instance yet (its model may still be loading)"
            )
        return Route(deployment, variant, instance)

    async def _resolve(self, invocation: Invocation) -> Route:
        """The route, after deploying a catalog id on its first use and waiting for a serverless start where the
        variant has no ready instance (only `Cold` awaits the start: a ready instance costs no wait)."""
        if self.catalog is not None:
            await self.catalog.ensure(invocation.endpoint)
        try:
            return self.route(invocation)
        except Cold as cold:
            instance = await self.serverless.wake(invocation.endpoint, cold.variant)
            return Route(cold.deployment, cold.variant, instance)

    async def invoke(self, invocation: Invocation) -> Answer:
        route = await self._resolve(invocation)
        instance = route.instance
        with self.admission.admit(invocation.endpoint), self._serving(route, invocation):
            try:
                async with asyncio.timeout(invocation.timeout or self.invocation_timeout):
                    response = await instance.client.post(invocation.body, invocation.instance_headers())
            except TimeoutError:
                raise self._timed_out(instance, invocation) from None
            except httpx.TransportError as exc:
                raise _instance_failed(instance, exc) from None
            if response.status_code != 200:
                raise from_instance(response.status_code, response.content)
            instance.served = True
        return Answer(
            body=response.content,
            content_type=response.headers.get("content-type", "application/json"),
            variant=route.variant.name,
            custom_attributes=response.headers.get("x-amzn-sagemaker-custom-attributes"),
        )

    @asynccontextmanager
    async def stream(self, invocation: Invocation) -> AsyncIterator[ChunkStream]:
        """Open a streamed answer; errors before the first byte raise here, so routes can still answer 4xx/5xx."""
        route = await self._resolve(invocation)
        instance = route.instance
        with self.admission.admit(invocation.endpoint), self._serving(route, invocation) as timing:
            try:
                async with AsyncExitStack() as stack:
                    opening = instance.client.open_stream(invocation.body, invocation.instance_headers())
                    try:
                        async with asyncio.timeout(invocation.timeout or self.invocation_timeout):
                            response = await stack.enter_async_context(opening)
                    except TimeoutError:
                        raise self._timed_out(instance, invocation) from None
                    if response.status_code != 200:
                        raise from_instance(response.status_code, await response.aread())
                    # A stream's latency, for alarms, is the time to its answer's start: its length is the caller's.
                    timing["first_byte"] = time.monotonic()
                    yield ChunkStream(
                        chunks=_chunks(response, instance),
                        content_type=response.headers.get("content-type", "application/octet-stream"),
                        variant=route.variant.name,
                        headers=servelet_headers(response.headers),
                    )
            except httpx.TransportError as exc:
                raise _instance_failed(instance, exc) from None

    @asynccontextmanager
    async def upload(self, invocation: Invocation, chunks: AsyncIterator[bytes], length: int) -> AsyncIterator[ChunkStream]:
        """Like `stream`, for a body of `length` bytes that arrives in `chunks` (`invocation.body` unused): what
        async jobs send, whose inputs may be far larger than the gateway should hold."""
        route = await self._resolve(invocation)
        instance = route.instance
        headers = invocation.instance_headers() | {"Content-Length": str(length), ASYNC_INVOCATION_HEADER: invocation.inference_id or ""}
        with route.serving(self.meter, invocation.endpoint):
            try:
                async with instance.client.open_upload(chunks, headers) as response:
                    if response.status_code != 200:
                        raise from_instance(response.status_code, await response.aread())
                    instance.served = True
                    yield ChunkStream(
                        chunks=response.aiter_raw(),
                        content_type=response.headers.get("content-type", "application/octet-stream"),
                        variant=route.variant.name,
                    )
            except httpx.TransportError as exc:
                raise _instance_failed(instance, exc) from None

    @contextmanager
    def _serving(self, route: Route, invocation: Invocation) -> Iterator[dict]:
        """A real-time request admitted: copied to the shadow variant if its deployment has one, then served. In a
        shadow test the production variant's latency is reported beside the shadow's (only there: a transform job's
        own fleet entry, one per job, would leave a series per job)."""
        report = None
        if route.deployment.shadows:
            self.shadows.send(invocation.endpoint, route.deployment, route.variant, invocation)
            report = self.shadows.report
        with route.serving(self.meter, invocation.endpoint, report) as timing:
            yield timing

    def _timed_out(self, instance: Instance, invocation: Invocation) -> ModelTimedOut:
        """The call is abandoned (the instance sees its client leave, so a generation stops); the instance stays
        in service: a slow answer says nothing of its health."""
        if invocation.timeout:
            limit = f"{invocation.timeout:g} s"
        else:
            limit = f"{self.invocation_timeout:g} s (SERVELET_INVOCATION_TIMEOUT)"
        return ModelTimedOut(f"instance {instance.name} did not answer within {limit}")


def servelet_headers(headers) -> dict[str, str]:
    """The instance's own `X-Servelet-*` facts about an answer (its token rates), passed on to the caller."""
    return {name: value for name, value in headers.items() if name.startswith("x-servelet-")}


def _instance_failed(instance: Instance, exc: Exception, when: str = "while answering") -> ModelFailed:
    """The connection broke: route around the instance until its health poll sees it answer again (or, stopped
    for going over its MemorySizeInMB, say so)."""
    instance.ready = False
    return ModelFailed(instance.over_memory or f"instance {instance.name} failed {when}: {exc!r}", 500)


async def _chunks(response: QueuedAnswer, instance: Instance) -> AsyncIterator[bytes]:
    try:
        async for chunk in response.aiter_raw():
            # Its 200 comes before the model has run, its first chunk after: a process killed later, mid-stream,
            # had served (under load a stream may take longer than the process lives), and is no broken build.
            instance.served = True
            yield chunk
    except httpx.TransportError as exc:
        raise _instance_failed(instance, exc, "mid-stream") from None
