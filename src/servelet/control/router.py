"""Routing an invocation: endpoint → variant (by weight, or pinned) → ready instance, and forwarding to it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx

from ..errors import ModelFailed, NotFound, Unavailable, from_instance
from .endpoints import EndpointNotFound, Fleet, VariantNotFound
from .instances import Instance
from .invocation import Answer, ChunkStream, Invocation


class Router:
    def __init__(self, fleet: Fleet):
        self.fleet = fleet

    def choose(self, invocation: Invocation) -> tuple[str, Instance]:
        """The variant name and instance that will serve `invocation`; NotFound / Unavailable otherwise."""
        try:
            endpoint = self.fleet.get(invocation.endpoint)
            variant = endpoint.variant(invocation.target_variant) if invocation.target_variant else endpoint.pick_variant()
        except (EndpointNotFound, VariantNotFound) as exc:
            raise NotFound(str(exc)) from None
        instance = variant.pick_instance()
        if instance is None:
            raise Unavailable(f"endpoint {invocation.endpoint!r} has no ready instance yet (its model may still be loading)")
        return variant.name, instance

    async def invoke(self, invocation: Invocation) -> Answer:
        variant, instance = self.choose(invocation)
        try:
            response = await instance.client.post(invocation.body, invocation.instance_headers())
        except httpx.TransportError as exc:
            raise _instance_failed(instance, exc) from None
        if response.status_code != 200:
            raise from_instance(response.status_code, response.content)
        return Answer(
            body=response.content,
            content_type=response.headers.get("content-type", "application/json"),
            variant=variant,
            custom_attributes=response.headers.get("x-amzn-sagemaker-custom-attributes"),
        )

    @asynccontextmanager
    async def stream(self, invocation: Invocation) -> AsyncIterator[ChunkStream]:
        """Open a streamed answer; errors before the first byte raise here, so routes can still answer 4xx/5xx."""
        variant, instance = self.choose(invocation)
        try:
            async with instance.client.open_stream(invocation.body, invocation.instance_headers()) as response:
                if response.status_code != 200:
                    raise from_instance(response.status_code, await response.aread())
                yield ChunkStream(
                    chunks=_chunks(response, instance),
                    content_type=response.headers.get("content-type", "application/octet-stream"),
                    variant=variant,
                )
        except httpx.TransportError as exc:
            raise _instance_failed(instance, exc) from None


def _instance_failed(instance: Instance, exc: Exception, when: str = "while answering") -> ModelFailed:
    """The connection broke: route around the instance until its health poll sees it answer again."""
    instance.ready = False
    return ModelFailed(f"instance {instance.name} failed {when}: {exc!r}", 500)


async def _chunks(response: httpx.Response, instance: Instance) -> AsyncIterator[bytes]:
    try:
        async for chunk in response.aiter_raw():
            yield chunk
    except httpx.TransportError as exc:
        raise _instance_failed(instance, exc, "mid-stream") from None
