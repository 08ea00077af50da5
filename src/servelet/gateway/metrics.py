"""Prometheus metrics (`GET /metrics`): requests, latency, tokens, and the engine's running / waiting counts.

Later capabilities (autoscaling, alarms, the cost meter) read their figures from here.
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..runtimes.base import GENERATED_RATE_HEADER, PROMPT_RATE_HEADER

REGISTRY = CollectorRegistry()

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)
RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)

REQUESTS = Counter(
    "servelet_requests", "Requests answered", ["endpoint", "variant", "route", "status"], registry=REGISTRY
)
REQUEST_LATENCY = Histogram(
    "servelet_request_duration_seconds", "Time from request to the end of the answer (streams included)",
    ["endpoint", "route"], buckets=LATENCY_BUCKETS, registry=REGISTRY,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "servelet_time_to_first_token_seconds", "Time from forwarding a generation to its first token",
    ["endpoint"], buckets=TOKEN_BUCKETS, registry=REGISTRY,
)
INTER_TOKEN_LATENCY = Histogram(
    "servelet_inter_token_latency_seconds", "Time between consecutive tokens of a stream",
    ["endpoint"], buckets=TOKEN_BUCKETS, registry=REGISTRY,
)
PROMPT_TOKENS = Counter("servelet_prompt_tokens", "Prompt tokens evaluated", ["endpoint"], registry=REGISTRY)
GENERATED_TOKENS = Counter("servelet_generated_tokens", "Tokens generated", ["endpoint"], registry=REGISTRY)
# The two rates users compare between machines and memory sizes, one observation per answer.
PROMPT_TOKEN_RATE, GENERATED_TOKEN_RATE = (
    Histogram(f"servelet_{kind}_tokens_per_second", f"{what} per second, per answer", ["endpoint"],
              buckets=RATE_BUCKETS, registry=REGISTRY)
    for kind, what in (("prompt", "Prompt tokens evaluated"), ("generated", "Tokens generated"))
)
WEBSOCKET_REQUESTS = Counter(
    "servelet_websocket_requests", "WebSocket requests by kind (question, generate, chat, invalid) and outcome",
    ["endpoint", "kind", "outcome"], registry=REGISTRY,
)
SCALING_EVENTS = Counter(
    "servelet_scaling_events", "Instance count changes made by autoscaling (direction: out or in)",
    ["endpoint", "variant", "direction"], registry=REGISTRY,
)
DESIRED_INSTANCES = Gauge(
    "servelet_autoscaling_desired_instances", "Instances the variant's scaling policy asks for at its last check",
    ["endpoint", "variant"], registry=REGISTRY,
)
INSTANCE_STARTS = Counter(
    "servelet_instance_starts", "Instances started, by kind: snapshot (forked from a template) or cold",
    ["endpoint", "variant", "kind"], registry=REGISTRY,
)
INIT_BUCKETS = (0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1, 1.5, 2, 3, 5, 10, 30, 60, 120)
INSTANCE_INIT_SECONDS = Histogram(
    "servelet_instance_init_seconds", "Time from an instance's start to its readiness, by start kind",
    ["endpoint", "variant", "kind"], buckets=INIT_BUCKETS, registry=REGISTRY,
)
ENQUEUE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
ASYNC_ENQUEUE_SECONDS = Histogram(
    "servelet_async_enqueue_seconds", "Time to store an accepted async invocation in the queue (its 202 waits for it)",
    ["endpoint"], buckets=ENQUEUE_BUCKETS, registry=REGISTRY,
)
VARIANT_LATENCY = Histogram(
    "servelet_variant_latency_seconds",
    "Time from forwarding a request to a variant's answer (a stream: to its start), for both variants of a shadow test",
    ["endpoint", "variant"], buckets=LATENCY_BUCKETS, registry=REGISTRY,
)
SHADOW_COPIES_DROPPED = Counter(
    "servelet_shadow_copies_dropped", "Copies of requests not sent to a shadow variant (reason: not_ready, or "
    "in_flight_bound: SERVELET_SHADOW_MAX_IN_FLIGHT copies already in flight)", ["endpoint", "variant", "reason"],
    registry=REGISTRY,
)
AUTOSCALING_METRIC = Gauge(
    "servelet_autoscaling_metric", "The scaling policy's metric at its last check (per instance)",
    ["endpoint", "variant"], registry=REGISTRY,
)


class AutoscalingMetrics:
    """The autoscaler's ScalingReport (control/autoscaler.py): the gateway gives it when it builds the control plane,
    so the dependency points from the gateway to the control plane only."""

    def checked(self, endpoint: str, variant: str, metric: float | None, desired: int) -> None:
        if metric is not None:
            AUTOSCALING_METRIC.labels(endpoint, variant).set(metric)
        DESIRED_INSTANCES.labels(endpoint, variant).set(desired)

    def scaled(self, endpoint: str, variant: str, direction: str) -> None:
        SCALING_EVENTS.labels(endpoint, variant, direction).inc()


SHADOW_ROUTE = "shadow"  # the route label of shadow copies in servelet_requests, beside the client routes


class VariantMetrics:
    """The router's VariantReport (control/shadows.py): each variant's latency, and what its shadow copies became,
    counted in `servelet_requests` under the route `shadow` beside the client routes of the production variant."""

    def answered(self, endpoint: str, variant: str, seconds: float) -> None:
        VARIANT_LATENCY.labels(endpoint, variant).observe(seconds)

    def copied(self, endpoint: str, variant: str, status: str) -> None:
        REQUESTS.labels(endpoint, variant, SHADOW_ROUTE, status).inc()

    def dropped(self, endpoint: str, variant: str, reason: str) -> None:
        SHADOW_COPIES_DROPPED.labels(endpoint, variant, reason).inc()


# A multi-model instance's cache figures in its /ping (runtimes/multimodel.py), exposed as counters per instance.
MODEL_CACHE_COUNTERS = {
    "model_loads": "Target models a multi-model instance loaded",
    "model_evictions": "Target models evicted (least recently used) to stay within the model cache",
    "model_hits": "Multi-model requests whose target model was loaded already",
    "model_misses": "Multi-model requests that waited for their target model to load",
    "model_load_seconds": "Seconds spent loading target models",
}

# A llama.cpp instance's prefix cache (engine/prefix_cache.py) and prompt lookup in its /ping: counters, then
# gauges, per instance.
PREFIX_CACHE_COUNTERS = {
    "prefix_cache_lookups": "Prompts of at least one block looked up in the prefix cache (hit rate: hits / lookups)",
    "prefix_cache_hits": "Prompts that reused KV cells of an earlier or running sequence",
    "prefix_cache_cached_tokens": "Prompt tokens reused from the prefix cache instead of prefilled",
    "prefix_cache_evictions": "Prefix cache entries dropped, least recently used first, to keep newer ones",
    "draft_tokens": "Tokens prompt lookup proposed (speculative decoding; acceptance rate: accepted / proposed)",
    "accepted_draft_tokens": "Proposed tokens the model's own choice confirmed",
}
PREFIX_CACHE_GAUGES = {
    "prefix_cache_held_tokens": "Tokens whose KV cells the prefix cache holds now",
    "prefix_cache_capacity_tokens": "Tokens the prefix cache can hold (SERVELET_PREFIX_CACHE, in whole sequences)",
}


class FleetCollector:
    """Running and waiting sequences per instance, from each instance's last health poll."""

    def __init__(self) -> None:
        self.fleet = None
        self.admission = None  # the router's per-endpoint bound (control/admission.py)

    def collect(self):
        running = GaugeMetricFamily("servelet_running_sequences", "Sequences decoding now", labels=["endpoint", "variant", "instance"])
        waiting = GaugeMetricFamily("servelet_waiting_sequences", "Sequences queued for a slot", labels=["endpoint", "variant", "instance"])
        ready = GaugeMetricFamily("servelet_instances_ready", "Instances answering /ping", labels=["endpoint", "variant"])
        instance_labels = ["endpoint", "variant", "instance"]
        loaded = GaugeMetricFamily("servelet_models_loaded", "Target models a multi-model instance holds", labels=instance_labels)
        cache = {key: CounterMetricFamily(f"servelet_{key}", text, labels=instance_labels) for key, text in MODEL_CACHE_COUNTERS.items()}
        prefix = {key: CounterMetricFamily(f"servelet_{key}", text, labels=instance_labels) for key, text in PREFIX_CACHE_COUNTERS.items()}
        prefix |= {key: GaugeMetricFamily(f"servelet_{key}", text, labels=instance_labels) for key, text in PREFIX_CACHE_GAUGES.items()}
        cancelled = CounterMetricFamily(
            "servelet_cancelled_requests", "Generations stopped because their client left or cancelled", labels=instance_labels
        )
        in_flight = GaugeMetricFamily(
            "servelet_gateway_in_flight", "Real-time requests in flight in the gateway (bounded per endpoint)", labels=["endpoint"]
        )
        copies = GaugeMetricFamily(
            "servelet_shadow_copies_in_flight", "Copies of requests a shadow variant is answering (bounded by "
            "SERVELET_SHADOW_MAX_IN_FLIGHT)", labels=["endpoint", "variant"],
        )
        endpoints = self.fleet.endpoints.values() if self.fleet is not None else ()
        for endpoint in endpoints:
            if self.admission is not None:
                in_flight.add_metric([endpoint.name], self.admission.in_flight.get(endpoint.name, 0))
            for variant in endpoint.variants:
                ready.add_metric([endpoint.name, variant.name], len(variant.ready_instances()))
                if variant.shadow:
                    copies.add_metric([endpoint.name, variant.name], variant.busy())
                for instance in variant.instances:
                    labels = [endpoint.name, variant.name, instance.name]
                    running.add_metric(labels, instance.occupancy.get("running", 0))
                    waiting.add_metric(labels, instance.occupancy.get("waiting", 0))
                    cancelled.add_metric(labels, instance.occupancy.get("cancelled", 0))
                    if "models_loaded" in instance.occupancy:
                        loaded.add_metric(labels, instance.occupancy["models_loaded"])
                        for key, family in cache.items():
                            family.add_metric(labels, instance.occupancy.get(key, 0))
                    if "prefix_cache_lookups" in instance.occupancy:
                        for key, family in prefix.items():
                            family.add_metric(labels, instance.occupancy.get(key, 0))
        snapshots = self.fleet.snapshots if self.fleet is not None else None
        templates = GaugeMetricFamily("servelet_snapshot_templates", "Snapshot templates ready to fork instances")
        template_memory = GaugeMetricFamily(
            "servelet_snapshot_template_memory_bytes", "Resident memory of the snapshot templates (mostly shared with "
            "the instances forked from them)",
        )
        templates.add_metric([], len(snapshots.ready_keys()) if snapshots is not None else 0)
        template_memory.add_metric([], snapshots.memory_mb() * 1024**2 if snapshots is not None else 0)
        yield from (running, waiting, ready, loaded, *cache.values(), *prefix.values(), cancelled, in_flight, copies,
                    templates, template_memory)


_fleet_collector = FleetCollector()
REGISTRY.register(_fleet_collector)


def observe_start(endpoint: str, variant: str, start) -> None:
    """One instance became ready (a StartRecord: its kind and init duration)."""
    INSTANCE_STARTS.labels(endpoint, variant, start.kind).inc()
    INSTANCE_INIT_SECONDS.labels(endpoint, variant, start.kind).observe(start.seconds)


def watch_fleet(fleet) -> None:
    _fleet_collector.fleet = fleet


def watch_admission(admission) -> None:
    _fleet_collector.admission = admission


UNKNOWN_ENDPOINT = "unknown"


def endpoint_label(name: str) -> str:
    """The endpoint as a label value. Clients name endpoints before anything checks them, and every value a label
    takes is a series kept until the gateway stops: names the fleet does not hold share one label."""
    fleet = _fleet_collector.fleet
    if not name or fleet is None or name in fleet.endpoints:
        return name
    return UNKNOWN_ENDPOINT


def observe_rates(endpoint: str, prompt_per_second: float, generated_per_second: float) -> None:
    """One answer's two token rates (an answer with no generated token has no rate to count)."""
    endpoint = endpoint_label(endpoint)
    if prompt_per_second > 0:
        PROMPT_TOKEN_RATE.labels(endpoint).observe(prompt_per_second)
    if generated_per_second > 0:
        GENERATED_TOKEN_RATE.labels(endpoint).observe(generated_per_second)


def observe_rate_headers(endpoint: str, headers: dict[str, str]) -> None:
    """The rates a whole text-generation answer carries in its headers (other answers carry none)."""
    prompt, generated = headers.get(PROMPT_RATE_HEADER.lower()), headers.get(GENERATED_RATE_HEADER.lower())
    if prompt is not None and generated is not None:
        observe_rates(endpoint, float(prompt), float(generated))


# The cost meter's units (its Billed fields), each a counter per endpoint and variant.
BILLED = {
    "gb_seconds": "GB-seconds billed to serverless variants",
    "requests": "Requests billed to serverless variants",
    "cache_gb_seconds": "GB-seconds billed to serverless variants for holding their snapshot template (cached)",
    "restored_gb": "GB billed to serverless variants for instances forked from their snapshot template (restored)",
}


class MeterCollector:
    """The cost meter's totals since the gateway started, per endpoint and variant (read at scrape time)."""

    def __init__(self) -> None:
        self.meter = None

    def collect(self):
        families = {
            figure: CounterMetricFamily(f"servelet_billed_{figure}", text, labels=["endpoint", "variant"])
            for figure, text in BILLED.items()
        }
        totals = dict(self.meter.totals) if self.meter is not None else {}
        for (endpoint, variant), billed in totals.items():
            for figure, family in families.items():
                family.add_metric([endpoint, variant], getattr(billed, figure))
        yield from families.values()


_meter_collector = MeterCollector()
REGISTRY.register(_meter_collector)


def watch_meter(meter) -> None:
    _meter_collector.meter = meter


class CaptureCollector:
    """Data capture's counts since the gateway started (capture/writer.py), read at scrape time. Its endpoint labels
    are endpoints with a DataCaptureConfig, never a name a client made up."""

    def __init__(self) -> None:
        self.writer = None

    def collect(self):
        written = CounterMetricFamily(
            "servelet_data_capture_records", "Captured invocations written to their destination", labels=["endpoint"]
        )
        dropped = CounterMetricFamily(
            "servelet_data_capture_dropped", "Captured invocations dropped (reason: buffer_full, too_large, "
            "write_error); their requests were answered all the same", labels=["endpoint", "reason"],
        )
        errors = CounterMetricFamily(
            "servelet_data_capture_write_errors", "Capture files that could not be written (each logged)", labels=["endpoint"]
        )
        buffered = GaugeMetricFamily(
            "servelet_data_capture_buffered_bytes", "Captured invocations in memory until written "
            "(bounded by SERVELET_DATA_CAPTURE_BUFFER_BYTES)",
        )
        writer = self.writer
        if writer is not None:
            for endpoint, count in list(writer.written.items()):
                written.add_metric([endpoint], count)
            for (endpoint, reason), count in list(writer.dropped.items()):
                dropped.add_metric([endpoint, reason], count)
            for endpoint, count in list(writer.write_errors.items()):
                errors.add_metric([endpoint], count)
        buffered.add_metric([], writer.held_bytes if writer is not None else 0)
        yield from (written, dropped, errors, buffered)


_capture_collector = CaptureCollector()
REGISTRY.register(_capture_collector)


def watch_capture(writer) -> None:
    _capture_collector.writer = writer


def exposition() -> tuple[bytes, str]:
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


class RequestMetrics:
    """ASGI middleware: counts every HTTP request by endpoint, variant, route template and status, and times it.

    Route handlers name the endpoint and variant in `request.state` (`endpoint`, `variant`) once they know them.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None)
            if template and template != "/metrics":
                state = scope.get("state", {})
                endpoint = endpoint_label(state.get("endpoint", ""))
                REQUESTS.labels(endpoint, state.get("variant", ""), template, str(status)).inc()
                REQUEST_LATENCY.labels(endpoint, template).observe(time.perf_counter() - started)
