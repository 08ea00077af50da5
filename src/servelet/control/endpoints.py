"""Endpoints, their production variants and instances; `serve` deploys the endpoint `default`.

An endpoint serves from its `blue` deployment (the variants of its endpoint config); during an update a `green`
deployment (the new config's variants) runs beside it and takes `green_share` of the traffic.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import math
import os
import random
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..artifacts import Materialized, materialize, shared_in_memory
from ..engine.errors import REBUILD_WITHOUT_AMX
from .health import HealthCheck
from .instances import Instance, StartRecord
from .resources import ServerlessConfig
from .snapshots import Snapshots, TemplateSpec

log = logging.getLogger("servelet.control")

DEFAULT_ENDPOINT = "default"
# A Unix socket's path must fit sun_path (108 bytes on Linux, with its terminating NUL).
MAX_SOCKET_PATH_BYTES = 100
DEFAULT_VARIANT = "AllTraffic"  # the name SageMaker's console gives a single variant
STARTS_KEPT = 5  # per variant, for DescribeEndpoint
LEAST_OUTSTANDING, RANDOM = "LEAST_OUTSTANDING_REQUESTS", "RANDOM"  # RoutingConfig.RoutingStrategy
RESTART_BACKOFF_SECONDS = 1.0
MAX_RESTART_BACKOFF_SECONDS = 30.0
# Instances killed by a signal before serving a request, in a row, after which the fleet stops restarting them: a
# model (or a llama.cpp build) that crashes every time would otherwise be restarted forever.
CRASHES_BEFORE_FAILING = 3
# Signals of native code gone wrong; a llama.cpp built for instructions this CPU lacks (or mishandles, AMX) dies so.
NATIVE_CRASHES = ("SIGSEGV", "SIGILL", "SIGBUS")


@dataclass
class VariantPlan:
    """What to run for one production variant."""

    name: str
    model_uri: str
    instances: int = 1
    weight: float = 1.0
    env: dict[str, str] = field(default_factory=dict)
    serverless: ServerlessConfig | None = None
    start_timeout: float | None = None  # ContainerStartupHealthCheckTimeoutInSeconds; None: the fleet's
    routing: str = LEAST_OUTSTANDING  # RoutingConfig.RoutingStrategy
    shadow: bool = False  # a ShadowProductionVariant: gets copies of requests (control/shadows.py), answers none


class Outcomes:
    """Each forwarded request's outcome and latency over the last `seconds`: what update alarms read."""

    def __init__(self, seconds: float = 60.0):
        self.seconds = seconds
        self._events: deque[tuple[float, bool, float]] = deque()  # (when, failed, latency)

    def record(self, failed: bool, latency: float) -> None:
        self._events.append((time.monotonic(), failed, latency))
        self._forget()

    def _forget(self) -> None:
        horizon = time.monotonic() - self.seconds
        while self._events and self._events[0][0] < horizon:
            self._events.popleft()

    @property
    def count(self) -> int:
        self._forget()
        return len(self._events)

    @property
    def error_rate(self) -> float | None:
        """Failed / all requests in the window; None without requests."""
        self._forget()
        return sum(f for _, f, _ in self._events) / len(self._events) if self._events else None

    @property
    def p99_latency(self) -> float | None:
        """Seconds; None without requests."""
        self._forget()
        latencies = sorted(latency for _, _, latency in self._events)
        return latencies[min(len(latencies) - 1, math.ceil(0.99 * len(latencies)) - 1)] if latencies else None


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
    env: dict[str, str] = field(default_factory=dict)  # the model's, to start more instances like these
    in_flight: Counter = field(default_factory=Counter)  # instance name -> requests it is answering now
    served: Outcomes = field(default_factory=Outcomes)  # its requests over the last minute (autoscaling reads it)
    serverless: ServerlessConfig | None = None
    start_timeout: float | None = None  # each of its instances' (None: the fleet's)
    waiting: int = 0  # requests held for an instance to start (serverless)
    last_request: float = field(default_factory=time.monotonic)  # when a request last came in or left
    scaled_to_zero: bool = False  # it was, once: its starts are worth a snapshot template
    starts: deque[StartRecord] = field(default_factory=lambda: deque(maxlen=STARTS_KEPT))  # the last ones
    routing: str = LEAST_OUTSTANDING  # RoutingConfig.RoutingStrategy
    shadow: bool = False  # a shadow variant: no request is routed to it, copies are sent (control/shadows.py)
    copy_credit: float = 0.0  # a shadow's share of requests, accumulated: one copy per whole unit
    _next: int = 0

    def wants_template(self) -> bool:
        """Whether its instances start from zero: serverless, or scaled to zero (by target tracking)."""
        return self.serverless is not None or self.scaled_to_zero

    def busy(self) -> int:
        """Requests in flight on its instances, and those held for one to start."""
        return sum(self.in_flight.values()) + self.waiting

    def live_instances(self) -> list[Instance]:
        """Instances ready or on their way (not given up, not stopping)."""
        return [i for i in self.instances if not i.given_up and not i.stopping]

    def ready_instances(self) -> list[Instance]:
        return [i for i in self.instances if i.ready]

    def pick_instance(self) -> Instance | None:
        """The ready instance answering the fewest requests (ties taken in turn), or any one for RANDOM. Round
        robin alone left a replaced instance idle while the survivor of a kill kept every stream."""
        ready = self.ready_instances()
        if not ready:
            return None
        if self.routing == RANDOM:
            return random.choice(ready)
        self._next = (self._next + 1) % len(ready)
        in_turn = ready[self._next:] + ready[:self._next]
        return min(in_turn, key=lambda instance: self.in_flight[instance.name])


@dataclass
class Deployment:
    """One fleet of an endpoint: the variants of one endpoint config (requests go to `variants`, copies of them to
    `shadows`), and how its requests went."""

    variants: list[Variant]
    config_name: str | None = None
    outcomes: Outcomes = field(default_factory=Outcomes)
    shadows: list[Variant] = field(default_factory=list)

    @property
    def every_variant(self) -> list[Variant]:
        return self.variants + self.shadows

    def instances(self) -> list[Instance]:
        return [i for v in self.every_variant for i in v.instances]

    def ready(self) -> bool:
        return any(v.ready_instances() for v in self.variants)

    def busy(self) -> int:
        """Requests its instances are answering now (shadow copies too: a retired fleet lets them end)."""
        return sum(sum(v.in_flight.values()) for v in self.every_variant)

    def find(self, name: str) -> Variant | None:
        """The production variant of that name (the one requests may be pinned to)."""
        return next((v for v in self.variants if v.name == name), None)

    def find_any(self, name: str) -> Variant | None:
        """The variant of that name, production or shadow (what instance counts and weights change)."""
        return next((v for v in self.every_variant if v.name == name), None)

    def pick_variant(self) -> Variant:
        """By weight among variants with a ready instance (all variants while none is ready)."""
        candidates = [v for v in self.variants if v.ready_instances() and v.weight > 0] or self.variants
        if len(candidates) == 1:
            return candidates[0]
        return random.choices(candidates, weights=[max(v.weight, 1e-9) for v in candidates])[0]


@dataclass
class Endpoint:
    name: str
    blue: Deployment
    green: Deployment | None = None
    green_share: float = 0.0  # of requests that go to green, while an update shifts traffic
    _facts: dict = field(default_factory=dict)  # the last ready instance's, kept while a variant is scaled to zero

    @property
    def variants(self) -> list[Variant]:
        """Every variant running, blue then green, shadows included."""
        return self.blue.every_variant + (self.green.every_variant if self.green else [])

    @property
    def ready(self) -> bool:
        """Whether a production variant can answer (a shadow answers no client)."""
        return any(d.ready() for d in (self.blue, self.green) if d is not None)

    def serving(self) -> list[Deployment]:
        """The deployments that may take traffic, the one to prefer first."""
        if self.green is None or self.green_share <= 0:
            return [self.blue]
        if self.green_share >= 1:
            return [self.green, self.blue]
        first = self.green if random.random() < self.green_share else self.blue
        return [first, self.blue if first is self.green else self.green]

    def route(self, variant_name: str | None = None) -> tuple[Deployment, Variant]:
        """The deployment and variant for one request: by traffic share then weight, or the variant named
        (the green one of that name while green takes traffic). A deployment with no ready instance is skipped."""
        if variant_name:
            order = [self.green, self.blue] if self.green is not None and self.green_share > 0 else [self.blue]
            found = [(d, d.find(variant_name)) for d in order if d.find(variant_name)]
            if not found and any(d.find_any(variant_name) for d in order):
                production = ", ".join(sorted({v.name for d in order for v in d.variants}))
                raise VariantNotFound(
                    f"variant {variant_name!r} of endpoint {self.name!r} is a shadow variant: it gets copies of the "
                    f"requests and answers none; target the production variant ({production}) or none"
                )
            if not found:
                raise VariantNotFound(
                    f"variant {variant_name!r} is not on endpoint {self.name!r} "
                    f"(it has: {', '.join(sorted({v.name for d in order for v in d.variants}))})"
                )
            return next(((d, v) for d, v in found if v.ready_instances()), found[0])
        order = self.serving()
        deployment = next((d for d in order if d.ready()), order[0])
        return deployment, deployment.pick_variant()

    def facts(self) -> dict:
        """The model facts of the first ready instance (name, context length, chat template); with none ready (a
        serverless variant at zero), those last seen, so a request that will start one renders its prompt alike."""
        for v in (v for v in self.variants if not v.shadow):  # a prompt is rendered for the variant that answers
            for i in v.ready_instances():
                self._facts = i.facts
                return i.facts
        return self._facts


class Fleet:
    """Every endpoint this gateway serves, and the instance processes behind them."""

    def __init__(
        self, run_dir: Path | None = None, instance_env: dict[str, str] | None = None, stream_channel: bool = True,
        memory_limit_scale: float = 1.0, health_check: HealthCheck | None = None, model_fetches: int = 2,
    ):
        self.health_check = health_check or HealthCheck()  # when a ready instance is taken out and replaced
        self.run_dir = run_dir or Path(tempfile.mkdtemp(prefix="servelet-"))
        self.snapshots: Snapshots | None = None  # None: every instance starts cold
        self.memory_limit_scale = memory_limit_scale  # of MemorySizeInMB, the memory a serverless instance may use
        self.stream_channel = stream_channel
        # The gateway logs every request itself; instances would log each health poll too. An instance killed by a
        # signal (a native crash) prints where its threads were into the gateway's log (Python's faulthandler).
        self.instance_env = {"SERVELET_ACCESS_LOG": "false", "PYTHONFAULTHANDLER": "1"} | (instance_env or {})
        self.endpoints: dict[str, Endpoint] = {}
        self._serials: dict[str, dict[str, itertools.count]] = {}
        self._tasks: set[asyncio.Task] = set()
        # Remote model files fetched once into memory, by URI: every instance of them inherits the one copy.
        self._models: dict[str, Materialized] = {}
        # One lock per URI: two endpoints of one model fetch it once, and endpoints of other models do not wait.
        self._fetching: dict[str, asyncio.Lock] = {}
        self._deploying: Counter = Counter()  # URIs of deployments fetching their models: in use, not yet in a variant
        # Downloads take threads of their own, `model_fetches` at a time (SERVELET_MODEL_FETCHES): on the event loop's
        # default executor (cores + 4 threads), minutes-long downloads would leave the store's calls waiting for one.
        self._fetches = ThreadPoolExecutor(model_fetches, thread_name_prefix="servelet-model-fetch")
        # Told (endpoint name, why) when an instance is given up after it was ready: creation and updates wait on
        # their instances themselves, an endpoint in service learns it here.
        self.on_instance_given_up: Callable[[str, str], None] | None = None
        # Told (endpoint, variant, start) each time an instance becomes ready: the gateway's metrics.
        self.on_instance_started: Callable[[str, str, StartRecord], None] | None = None

    def use_snapshots(self, snapshots: Snapshots) -> None:
        """Start instances from snapshot templates (see control/snapshots.py) from now on."""
        self.snapshots = snapshots
        snapshots.wanted = self._wanted_templates

    def get(self, name: str) -> Endpoint:
        try:
            return self.endpoints[name]
        except KeyError:
            known = ", ".join(sorted(self.endpoints)) or "none"
            raise EndpointNotFound(f"endpoint {name!r} does not exist (endpoints: {known})") from None

    async def deploy(self, name: str, model_uri: str, instances: int = 1, start_timeout: float = 600.0) -> Endpoint:
        """One variant (`AllTraffic`) of `instances` instances of `model_uri`."""
        return await self.deploy_variants(name, [VariantPlan(DEFAULT_VARIANT, model_uri, instances)], start_timeout)

    async def deploy_variants(
        self, name: str, plans: list["VariantPlan"], start_timeout: float = 600.0, config_name: str | None = None
    ) -> Endpoint:
        """Start every variant's instances; the endpoint serves as soon as one is ready (readiness is awaited in
        the background, and an instance that dies after it was ready is replaced)."""
        self._serials.pop(name, None)
        await self._materialize(plans)
        endpoint = Endpoint(name, self._deployment(name, plans, config_name))
        self.endpoints[name] = endpoint
        await self._prepare_templates(endpoint.blue.every_variant)
        await self._start_all(endpoint, endpoint.blue.instances(), start_timeout)
        return endpoint

    async def deploy_green(
        self, name: str, plans: list["VariantPlan"], start_timeout: float, config_name: str | None = None
    ) -> Deployment:
        """Start an update's new fleet beside the endpoint's current one; it takes no traffic until told."""
        endpoint = self.get(name)
        await self._materialize(plans)
        endpoint.green, endpoint.green_share = self._deployment(name, plans, config_name), 0.0
        await self._prepare_templates(endpoint.green.every_variant)
        await self._start_all(endpoint, endpoint.green.instances(), start_timeout)
        return endpoint.green

    def _deployment(self, name: str, plans: list["VariantPlan"], config_name: str | None) -> Deployment:
        variants = []
        for plan in plans:
            variant = Variant(
                plan.name, plan.model_uri, plan.weight, env=plan.env, serverless=plan.serverless,
                start_timeout=plan.start_timeout, routing=plan.routing, shadow=plan.shadow,
            )
            variant.instances = [self._instance(name, variant) for _ in range(plan.instances)]
            variants.append(variant)
        return Deployment(
            [v for v in variants if not v.shadow], config_name, shadows=[v for v in variants if v.shadow]
        )

    def _instance(self, endpoint: str, variant: Variant) -> Instance:
        # Numbered per endpoint and variant name, so that a green variant named like a blue one gets its own socket.
        n = next(self._serials.setdefault(endpoint, {}).setdefault(variant.name, itertools.count()))
        socket_path = self.run_dir / f"{endpoint}-{variant.name}-{n}.sock"
        if len(bytes(socket_path)) > MAX_SOCKET_PATH_BYTES:  # long names: a short, still unique, file name
            digest = hashlib.sha256(f"{endpoint}/{variant.name}/{n}".encode()).hexdigest()[:16]
            socket_path = self.run_dir / f"{digest}.sock"
        model_file = self._models.get(variant.model_uri)
        memory = variant.serverless.memory_size_in_mb * self.memory_limit_scale if variant.serverless else None
        instance = Instance(
            f"{endpoint}/{variant.name}/{n}", variant.model_uri, socket_path, self.instance_env | variant.env, model_file,
            self.stream_channel, memory, self.snapshots,
        )
        instance.start_timeout = variant.start_timeout
        instance.health = self.health_check
        return instance

    async def _prepare_templates(self, variants: list[Variant], wait: bool = True) -> None:
        """A snapshot template for each variant whose instances start from zero; a serverless variant's first
        instances wait for it (they are forked from it, rather than loading beside it on the same cores)."""
        if self.snapshots is None:
            return
        for variant in variants:
            if variant.wants_template():
                await self.snapshots.prepare(self._template_spec(variant), wait)

    def _template_spec(self, variant: Variant) -> TemplateSpec:
        return TemplateSpec(variant.model_uri, self.instance_env | variant.env, self._models.get(variant.model_uri))

    def _wanted_templates(self) -> dict[str, TemplateSpec]:
        """The templates some variant wants (the others are stopped), by key."""
        specs = [self._template_spec(v) for e in self.endpoints.values() for v in e.variants if v.wants_template()]
        return {spec.key: spec for spec in specs}

    def serverless_templates_held(self) -> list[tuple[str, str, int, float]]:
        """(endpoint, variant, MemorySizeInMB, when its template became ready) of each serverless variant whose
        snapshot template is ready: the cost meter bills their cache and restores (control/usage.HeldTemplate)."""
        if self.snapshots is None:
            return []
        held = []
        for endpoint in self.endpoints.values():
            for variant in (v for v in endpoint.variants if v.serverless is not None):
                template = self.snapshots.templates.get(self._template_spec(variant).key)
                if template is not None and template.ready and template.alive:
                    held.append((endpoint.name, variant.name, variant.serverless.memory_size_in_mb, template.started))
        return held

    async def _materialize(self, plans: list["VariantPlan"]) -> None:
        """Fetch each remote model file into memory once, here, rather than once per instance."""
        uris = [plan.model_uri for plan in plans]
        self._deploying.update(uris)
        try:
            for plan in plans:
                uri, multi_model = plan.model_uri, plan.env.get("SERVELET_MULTI_MODEL", "").lower() in ("true", "1")
                if multi_model or not shared_in_memory(uri):
                    continue  # a multi-model URI is a prefix: its instance fetches each model when asked for it
                async with self._fetching.setdefault(uri, asyncio.Lock()):
                    if uri not in self._models:
                        await self._fetch(uri)
        except asyncio.CancelledError:
            self._deploying.subtract(uris)
            uris = []
            self._release_models()  # what this deployment fetched before it was cancelled
            raise
        finally:
            self._deploying.subtract(uris)

    async def _fetch(self, uri: str) -> None:
        # The download runs in a thread, which a cancelled deployment (its endpoint deleted) cannot stop: the
        # thread finishes, and the model it fetched for nobody is closed.
        fetch = asyncio.get_running_loop().run_in_executor(self._fetches, materialize, uri)
        try:
            self._models[uri] = await asyncio.shield(fetch)
        except asyncio.CancelledError:
            fetch.add_done_callback(_close_unused)
            raise
        except Exception as exc:  # noqa: BLE001 - its instances resolve it themselves, and fail saying why
            log.error("could not fetch %s once for all its instances: %s", uri, exc)

    def _release_models(self) -> None:
        """Close the in-memory models no variant uses any more (running instances keep their inherited copy)."""
        in_use = {v.model_uri for e in self.endpoints.values() for v in e.variants} | set(+self._deploying)
        for uri in set(self._models) - in_use:
            self._models.pop(uri).close()

    async def _start_all(self, endpoint: Endpoint, instances: list[Instance], start_timeout: float) -> None:
        self._share_cores(instances)
        for instance in instances:
            await _not_halfway(instance.start())
            self._spawn(self._keep_running(endpoint, instance, start_timeout))
        self._warn_if_cores_oversubscribed()

    # llama.cpp's threads spin while they wait for each other at every operation: with more threads than cores, a
    # thread spins while its partner is off the CPU, and generation slows many times over (seen in tests: a
    # 64-token answer taking minutes). So instances split the cores, and a fleet that oversubscribes them says so.
    def _running(self) -> list[Instance]:
        return [
            i for e in self.endpoints.values() for v in e.variants for i in v.instances
            if i.process is not None and i.process.returncode is None and not i.stopping
        ]

    def _share_cores(self, new: list[Instance]) -> None:
        """New instances whose model does not set SERVELET_THREADS split the cores the running ones leave."""
        unset = [i for i in new if threads_setting(i) is None]
        if not unset:
            return
        cores = os.cpu_count() or 1
        taken = sum(threads_of(i) for i in self._running() + new if i not in unset)
        share = max(1, (cores - taken) // len(unset))
        for instance in unset:
            instance.env = instance.env | {"SERVELET_THREADS": str(share)}

    def free_cores(self) -> int:
        """Cores the running instances' threads leave (serverless scale-out starts one only where it fits)."""
        return (os.cpu_count() or 1) - sum(threads_of(i) for i in self._running())

    def _warn_if_cores_oversubscribed(self) -> None:
        cores = os.cpu_count() or 1
        running = self._running()
        threads = sum(threads_of(i) for i in running)
        if threads > cores:
            log.warning(
                "%d instances run %d threads on %d cores: their threads will wait on each other; give each instance "
                "fewer threads (SERVELET_THREADS, in the model's Environment) so that their sum is at most %d",
                len(running), threads, cores, cores,
            )

    async def wait_ready(self, name: str, timeout: float) -> str | None:
        """Wait until every instance of the endpoint is ready: None, or why it cannot be."""
        def instances() -> list[Instance] | None:
            endpoint = self.endpoints.get(name)
            return None if endpoint is None else [i for v in endpoint.variants for i in v.instances]

        return await self._wait_instances(instances, timeout, f"the instances of {name!r}")

    async def wait_instances_ready(self, instances: list[Instance], timeout: float) -> str | None:
        return await self._wait_instances(lambda: instances, timeout, "the new instances")

    async def _wait_instances(self, instances, timeout: float, what: str) -> str | None:
        # An instance allowed longer than the caller's wait (its variant's own start timeout) is waited for.
        timeout = max([timeout] + [i.start_timeout for i in instances() or () if i.start_timeout])
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            current = instances()
            if current is None:
                return f"{what} were removed while starting"
            failed = [i.given_up for i in current if i.given_up]
            if failed:
                return failed[0]
            if all(i.ready for i in current):
                return None
            await asyncio.sleep(0.2)
        return f"{what} were not all ready after {timeout:.0f} s"

    async def retire(self, deployment: Deployment, drain_timeout: float) -> None:
        """Stop a deployment that no longer takes traffic, once its in-flight requests are answered."""
        for instance in deployment.instances():
            instance.stopping = True  # no replacement if it exits while draining
        await _until(lambda: deployment.busy() == 0, drain_timeout)
        await asyncio.gather(*(i.stop() for i in deployment.instances()), return_exceptions=True)
        self._release_models()

    async def scale(self, name: str, variant_name: str, count: int, start_timeout: float, drain_timeout: float) -> list[Instance]:
        """Add instances to a blue variant (production or shadow), or remove some (they take no new requests, finish
        theirs, then stop). Returns the instances added."""
        endpoint = self.get(name)
        variant = endpoint.blue.find_any(variant_name)
        if variant is None:
            raise VariantNotFound(f"variant {variant_name!r} is not on endpoint {name!r}")
        if count >= len(variant.instances):
            added = [self._instance(name, variant) for _ in range(count - len(variant.instances))]
            variant.instances.extend(added)
            await self._start_all(endpoint, added, start_timeout)
            return added
        # Keep the ready ones: remove instances still loading first.
        keep = sorted(variant.instances, key=lambda i: not i.ready)[:count]
        removed = [i for i in variant.instances if i not in keep]
        variant.instances = keep
        for instance in removed:
            instance.stopping = True
        if count == 0 and not variant.scaled_to_zero:
            variant.scaled_to_zero = True  # from now on, its starts fork from a template
            await self._prepare_templates([variant], wait=False)
        await _until(lambda: all(variant.in_flight[i.name] == 0 for i in removed), drain_timeout)
        await asyncio.gather(*(i.stop() for i in removed), return_exceptions=True)
        return []

    async def remove(self, name: str) -> None:
        """Stop the endpoint's instances and forget it."""
        endpoint = self.endpoints.pop(name, None)
        if endpoint is None:
            return
        await asyncio.gather(*(i.stop() for v in endpoint.variants for i in v.instances), return_exceptions=True)
        self._release_models()

    async def _keep_running(self, endpoint: Endpoint, instance: Instance, timeout: float) -> None:
        """Bring the instance up and replace it (with backoff) whenever it exits, while the endpoint exists; give up
        on a model that never loads, or that is killed by a signal CRASHES_BEFORE_FAILING times before serving."""
        backoff = RESTART_BACKOFF_SECONDS
        crashes = 0
        while True:
            try:
                await instance.wait_ready(instance.start_timeout or timeout)
            except Exception as exc:
                instance.failure = instance.failure or f"instance {instance.name} failed to start: {exc!r}"
                if instance.exit_signal is None and not instance.ever_ready:
                    log.error("%s", instance.failure)
                    instance.given_up = instance.failure
                    return  # a model that never loads: the endpoint fails rather than retrying forever
            else:
                backoff = RESTART_BACKOFF_SECONDS
                self._started(endpoint, instance)
                await instance.watch()
            if self.endpoints.get(endpoint.name) is not endpoint or instance.stopping:
                return
            if instance.served:
                crashes = 0
            elif instance.exit_signal is not None and not instance.over_memory:  # stopped for its memory: no crash
                crashes += 1
                if crashes >= CRASHES_BEFORE_FAILING:
                    self._give_up(endpoint, instance, crash_reason(instance, crashes))
                    return
            # Killed by a signal: a warning (the endpoint fails loudly if it keeps crashing); any other exit: an error.
            level = logging.WARNING if instance.exit_signal else logging.ERROR
            log.log(level, "%s%s; starting a replacement in %.0f s",
                    instance.failure, _counts(instance, crashes), backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_RESTART_BACKOFF_SECONDS)
            if self.endpoints.get(endpoint.name) is not endpoint or instance.stopping:
                return
            await instance.start()

    def _started(self, endpoint: Endpoint, instance: Instance) -> None:
        variant = next((v for v in endpoint.variants if instance in v.instances), None)
        if variant is None or instance.last_start is None:
            return
        variant.starts.append(instance.last_start)
        if self.on_instance_started is not None:
            self.on_instance_started(endpoint.name, variant.name, instance.last_start)

    def _give_up(self, endpoint: Endpoint, instance: Instance, reason: str) -> None:
        """No more restarts: whoever waits on the instance sees `given_up`; an endpoint in service is told."""
        instance.given_up = reason
        log.warning("instance %s: no more restarts (%s)", instance.name, reason.split(": ", 1)[0])
        if instance.ever_ready and self.on_instance_given_up is not None:
            self.on_instance_given_up(endpoint.name, reason)

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
        if self.snapshots is not None:
            await self.snapshots.close()
        for model in self._models.values():
            model.close()
        self._models.clear()
        self._fetches.shutdown(wait=False, cancel_futures=True)


def _close_unused(fetch: asyncio.Future) -> None:
    if not fetch.cancelled() and fetch.exception() is None:
        fetch.result().close()


async def _not_halfway(coro) -> None:
    """Run `coro` to its end even when cancelled meanwhile, then pass the cancellation on: an instance process
    spawned or forked halfway through a cancelled start would run with nobody to stop it."""
    task = asyncio.ensure_future(coro)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.gather(task, return_exceptions=True)
        raise


async def _until(condition, timeout: float, poll: float = 0.05) -> bool:
    """Poll `condition` until it holds (True) or `timeout` passes (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(poll)
    return True


def crash_reason(instance: Instance, crashes: int) -> str:
    """Why the endpoint fails after its instances crashed, and what to do about it."""
    what = f"{instance.failure}, {crashes} times in a row without serving a request"
    again = "then delete the endpoint and create it again"
    if instance.exit_signal in NATIVE_CRASHES:
        return (
            f"{what}: native code crashed in the model's process. A llama.cpp build that does not fit this CPU does "
            f"this: rebuild it without AMX with `{REBUILD_WITHOUT_AMX}`, {again}. If the model is not a GGUF, its "
            "own code (inference.py or a library it calls) crashed: the traceback it printed into the gateway's log "
            "shows where"
        )
    if instance.exit_signal == "SIGKILL" and not instance.unresponsive:  # the fleet's own SIGKILL says why itself
        return (
            f"{what}: something killed it, most often the kernel's out-of-memory killer (`dmesg` says so): give it "
            f"more memory, run fewer instances or a smaller model, {again}"
        )
    return f"{what}: its output in the gateway log shows why; fix that, {again}"


def _counts(instance: Instance, crashes: int) -> str:
    """For the log: whether the exit counts toward giving up."""
    if instance.exit_signal is None or instance.over_memory:
        return ""
    if instance.served:
        return " after serving requests"
    return f" before serving a request (crash {crashes} of {CRASHES_BEFORE_FAILING} before the endpoint fails)"


def threads_setting(instance: Instance) -> int | None:
    """The instance's SERVELET_THREADS (its environment over the gateway's), or None when unset."""
    setting = (os.environ | instance.env).get("SERVELET_THREADS", "")
    return int(setting) if setting.isdigit() and int(setting) > 0 else None


def threads_of(instance: Instance) -> int:
    """The llama.cpp threads the instance runs: its setting, else one per core (the instance's own default)."""
    return threads_setting(instance) or os.cpu_count() or 1
