"""Endpoints, their production variants and instances; `serve` deploys the endpoint `default`."""

from __future__ import annotations

import asyncio
import logging
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .instances import Instance

log = logging.getLogger("servelet.control")

DEFAULT_ENDPOINT = "default"
DEFAULT_VARIANT = "AllTraffic"  # the name SageMaker's console gives a single variant
RESTART_BACKOFF_SECONDS = 1.0
MAX_RESTART_BACKOFF_SECONDS = 30.0


@dataclass
class VariantPlan:
    """What to run for one production variant."""

    name: str
    model_uri: str
    instances: int = 1
    weight: float = 1.0
    env: dict[str, str] = field(default_factory=dict)


class EndpointNotFound(LookupError):
    pass


class VariantNotFound(LookupError):
    pass


@dataclass
class Variant:
    name: str
    model_uri: str
    weight: float = 1.0
    instances: list[Instance] = field(default_factory=list)
    _next: int = 0

    def ready_instances(self) -> list[Instance]:
        return [i for i in self.instances if i.ready]

    def pick_instance(self) -> Instance | None:
        """Round robin over ready instances."""
        ready = self.ready_instances()
        if not ready:
            return None
        self._next = (self._next + 1) % len(ready)
        return ready[self._next]


@dataclass
class Endpoint:
    name: str
    variants: list[Variant]

    @property
    def ready(self) -> bool:
        return any(v.ready_instances() for v in self.variants)

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise VariantNotFound(
            f"variant {name!r} is not on endpoint {self.name!r} (it has: {', '.join(v.name for v in self.variants)})"
        )

    def pick_variant(self) -> Variant:
        """By weight among variants with a ready instance (all variants while none is ready)."""
        candidates = [v for v in self.variants if v.ready_instances() and v.weight > 0] or self.variants
        return random.choices(candidates, weights=[max(v.weight, 1e-9) for v in candidates])[0]

    def facts(self) -> dict:
        """The model facts of the first ready instance (name, context length, chat template)."""
        for v in self.variants:
            for i in v.ready_instances():
                return i.facts
        return {}


class Fleet:
    """Every endpoint this gateway serves, and the instance processes behind them."""

    def __init__(self, run_dir: Path | None = None, instance_env: dict[str, str] | None = None):
        self.run_dir = run_dir or Path(tempfile.mkdtemp(prefix="servelet-"))
        # The gateway logs every request itself; instances would log each health poll too.
        self.instance_env = {"SERVELET_ACCESS_LOG": "false"} | (instance_env or {})
        self.endpoints: dict[str, Endpoint] = {}
        self._tasks: set[asyncio.Task] = set()

    def get(self, name: str) -> Endpoint:
        try:
            return self.endpoints[name]
        except KeyError:
            known = ", ".join(sorted(self.endpoints)) or "none"
            raise EndpointNotFound(f"endpoint {name!r} does not exist (endpoints: {known})") from None

    async def deploy(self, name: str, model_uri: str, instances: int = 1, start_timeout: float = 600.0) -> Endpoint:
        """One variant (`AllTraffic`) of `instances` instances of `model_uri`."""
        return await self.deploy_variants(name, [VariantPlan(DEFAULT_VARIANT, model_uri, instances)], start_timeout)

    async def deploy_variants(self, name: str, plans: list["VariantPlan"], start_timeout: float = 600.0) -> Endpoint:
        """Start every variant's instances; the endpoint serves as soon as one is ready (readiness is awaited in
        the background, and an instance that dies after it was ready is replaced)."""
        variants = []
        for plan in plans:
            variant = Variant(plan.name, plan.model_uri, plan.weight)
            for n in range(plan.instances):
                socket_path = self.run_dir / f"{name}-{plan.name}-{n}.sock"
                env = self.instance_env | plan.env
                variant.instances.append(Instance(f"{name}/{plan.name}/{n}", plan.model_uri, socket_path, env))
            variants.append(variant)
        endpoint = Endpoint(name, variants)
        self.endpoints[name] = endpoint
        for variant in variants:
            for instance in variant.instances:
                await instance.start()
                self._spawn(self._keep_running(endpoint, instance, start_timeout))
        return endpoint

    async def wait_ready(self, name: str, timeout: float) -> str | None:
        """Wait until every instance of the endpoint is ready: None, or why it cannot be."""
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            endpoint = self.endpoints.get(name)
            if endpoint is None:
                return f"endpoint {name!r} was removed while starting"
            instances = [i for v in endpoint.variants for i in v.instances]
            failed = [i.failure for i in instances if i.failure and not i.ever_ready]
            if failed:
                return failed[0]
            if all(i.ready for i in instances):
                return None
            await asyncio.sleep(0.2)
        return f"the instances of {name!r} were not all ready after {timeout:.0f} s"

    async def remove(self, name: str) -> None:
        """Stop the endpoint's instances and forget it."""
        endpoint = self.endpoints.pop(name, None)
        if endpoint is None:
            return
        await asyncio.gather(*(i.stop() for v in endpoint.variants for i in v.instances), return_exceptions=True)

    async def _keep_running(self, endpoint: Endpoint, instance: Instance, timeout: float) -> None:
        """Bring the instance up; if it dies after it was ready, start a new one (with backoff) while the endpoint exists."""
        backoff = RESTART_BACKOFF_SECONDS
        while True:
            try:
                await instance.wait_ready(timeout)
            except Exception as exc:
                log.error("%s", exc)
                if not instance.ever_ready:
                    return  # a model that never loads: the endpoint fails rather than retrying forever
            else:
                backoff = RESTART_BACKOFF_SECONDS
                await instance.watch()
            if self.endpoints.get(endpoint.name) is not endpoint or instance.stopping:
                return
            log.warning("instance %s exited; starting a replacement in %.0f s", instance.name, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_RESTART_BACKOFF_SECONDS)
            if self.endpoints.get(endpoint.name) is not endpoint or instance.stopping:
                return
            await instance.start()

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(
            *(i.stop() for e in self.endpoints.values() for v in e.variants for i in v.instances),
            return_exceptions=True,
        )
