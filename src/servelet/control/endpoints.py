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
        """Start the endpoint's instances; it serves as soon as one is ready (readiness is awaited in the background)."""
        variant = Variant(DEFAULT_VARIANT, model_uri)
        for n in range(instances):
            socket_path = self.run_dir / f"{name}-{variant.name}-{n}.sock"
            variant.instances.append(Instance(f"{name}/{variant.name}/{n}", model_uri, socket_path, self.instance_env))
        endpoint = Endpoint(name, [variant])
        self.endpoints[name] = endpoint
        for instance in variant.instances:
            await instance.start()
            self._spawn(self._bring_up(instance, start_timeout))
        return endpoint

    async def _bring_up(self, instance: Instance, timeout: float) -> None:
        try:
            await instance.wait_ready(timeout)
        except Exception as exc:
            log.error("%s", exc)
            return
        await instance.watch()

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
