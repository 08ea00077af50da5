"""The gateway app: API families as routers over one fleet of instances; it never loads a model itself."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from .. import __version__, heap, objects
from ..capture.data_capture import DataCapture
from ..capture.writer import CaptureWriter
from ..config import apply_config, load_config
from ..control.async_queue import JobQueue
from ..control.async_worker import AsyncWorker, async_endpoints
from ..control.catalog import Catalog
from ..control.endpoints import DEFAULT_ENDPOINT, Fleet
from ..control.health import HealthCheck
from ..control.instances import StartRecord
from ..control.plane import ControlPlane
from ..control.router import Router
from ..control.snapshots import Snapshots
from ..control.store import Store
from ..control.transform_runner import TransformRunner
from ..control.usage import CostMeter
from ..errors import GatewayError, MethodNotAllowed, NotFound, Unprocessable, UpgradeRequired
from ..settings import GatewaySettings, database_url
from . import metrics
from .api import autoscaling
from .api import sagemaker_transform  # noqa: F401 - registers the batch transform operations
from .api import sagemaker_tags  # noqa: F401 - registers AddTags, ListTags, DeleteTags and Tags on the Create operations
from .api import openai, qa, sagemaker, sagemaker_async, sagemaker_control, tgi, websocket
from .auth.errors import render_refusal
from .auth.rules import need_for
from .auth.setup import guard
from .disconnect import ClientGone
from .errors import describe_validation, render
from .limits import ConnectionsPerClient, HeaderLimit
from .services import Services
from .textgen import TextGenerator

log = logging.getLogger("servelet.gateway")

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left; nobody reads it

DESCRIPTION = """
servelet serves models behind the wire formats clients already speak. Every family below forwards to the
same instances: the SageMaker runtime API (`boto3`), the container contract, TGI, OpenAI, the QA routes and
a WebSocket. `model` / `EndpointName` name an endpoint; `default` is the one `servelet serve` deploys.
"""


def _instance_started(meter: CostMeter) -> Callable[[str, str, StartRecord], None]:
    """The fleet's one start hook, for its two listeners: the metrics count each start, the meter bills restores."""

    def started(endpoint: str, variant: str, start: StartRecord) -> None:
        metrics.observe_start(endpoint, variant, start)
        meter.instance_started(endpoint, variant, start)

    return started


def is_websocket_route(app: FastAPI, path: str) -> bool:
    scope = {"type": "websocket", "path": path, "root_path": "", "headers": [], "query_string": b""}
    return any(route.matches(scope)[0] == Match.FULL for route in app.routes)


def create_gateway(settings: GatewaySettings, fleet: Fleet | None = None) -> FastAPI:
    fleet = fleet or Fleet(
        settings.run_dir, stream_channel=settings.stream_channel, memory_limit_scale=settings.serverless_memory_limit_scale,
        health_check=HealthCheck(settings.health_check_timeout, settings.health_check_failures),
        model_fetches=settings.model_fetches,
    )
    if settings.snapshots and fleet.snapshots is None:
        fleet.use_snapshots(Snapshots(
            fleet.run_dir, settings.snapshot_memory_mb, settings.snapshot_min_available_mb, settings.instance_start_timeout
        ))
    store = Store(database_url(settings), settings.sqlite_synchronous)
    objects.flush_files(not store.commits_wait_for_no_disk)  # outputs are as durable as the job records saying so
    plane = ControlPlane(
        store, fleet, settings.instance_start_timeout, settings.autoscale_interval,
        settings.serverless_idle_seconds, settings.serverless_start_timeout, metrics.AutoscalingMetrics(),
        allow_loader_environment=settings.allow_loader_environment,
    )
    meter = CostMeter(store, fleet.serverless_templates_held)
    router = Router(fleet, settings.invocation_timeout, plane.serverless, meter, settings.max_in_flight_per_endpoint,
                    settings.shadow_max_in_flight)
    router.shadows.report = metrics.VariantMetrics()
    router.catalog = Catalog(plane)
    jobs = JobQueue(store)
    plane.transforms = TransformRunner(store, fleet, router, settings.instance_start_timeout)
    plane.autoscaler.backlog = jobs.backlog
    async_worker = AsyncWorker(
        jobs, router, lambda: async_endpoints(store), settings.async_max_input_bytes, settings.async_lease_seconds
    )
    capture = DataCapture(
        CaptureWriter(settings.data_capture_buffer_bytes, settings.data_capture_file_bytes,
                      settings.data_capture_flush_seconds),
        settings.data_capture_max_output_bytes,
    )
    plane.records.on_change = capture.endpoint_changed
    services = Services(
        settings=settings, fleet=fleet, router=router, textgen=TextGenerator(router), plane=plane, jobs=jobs,
        async_worker=async_worker, capture=capture,
    )
    metrics.watch_fleet(fleet)
    metrics.watch_admission(router.admission)
    fleet.on_instance_started = _instance_started(meter)
    metrics.watch_meter(meter)
    metrics.watch_capture(capture.writer)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        config = load_config(settings.config) if settings.config else None
        # A file that declares `default` itself takes it over from --model/--instances.
        if settings.instances and not (config and config.declares(DEFAULT_ENDPOINT)):
            await plane.declare(DEFAULT_ENDPOINT, settings.model, settings.instances)
        if config:
            await apply_config(plane, config)
        capture.follow(await asyncio.to_thread(store.list_endpoints))
        capture.writer.start()
        await plane.restore()
        await plane.transforms.resume()
        plane.autoscaler.start()
        plane.serverless.start()
        if fleet.snapshots is not None:
            fleet.snapshots.start()
        meter.start()
        async_worker.start()
        heap.settle()
        yield
        await async_worker.close()  # first: its jobs in progress go back to the queue for the next start
        await plane.transforms.close()  # its jobs stay InProgress: the next start resumes them
        await plane.close()
        await fleet.close()
        await capture.writer.close()  # after the last answers: what they captured is written
        await meter.close()  # last: requests cut short by the close are billed too
        jobs.close()
        store.close()

    app = FastAPI(title="servelet", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.services = services
    app.add_middleware(metrics.RequestMetrics)
    guard(app, settings, store, jobs)  # outside the metrics: a refused request costs nothing past the gate
    app.add_middleware(HeaderLimit, limit=settings.max_header_bytes)  # outermost: before anything reads a header
    app.state.websocket_clients = ConnectionsPerClient(settings.websocket_connections_per_client)

    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError):
        return render(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError):
        return render(request, Unprocessable(describe_validation(exc)))

    @app.exception_handler(StarletteHTTPException)
    async def _no_route(request: Request, exc: StarletteHTTPException):
        # Routing's own 404 and 405 come before any router names its family: the path names it, as for auth.
        family = need_for(request.method, request.url.path, request.headers, request.query_params).family
        if exc.status_code == 405:
            error = MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}: it takes "
                                     f"{(exc.headers or {}).get('Allow', 'other methods')}")
        elif exc.status_code == 404 and is_websocket_route(app, request.url.path):
            error = UpgradeRequired(f"{request.url.path} is a WebSocket: connect with a WebSocket client (ws://)")
            exc.headers = {"Upgrade": "websocket"}  # what 426 must name
        elif exc.status_code == 404:
            error = NotFound(f"no route {request.method} {request.url.path}; the routes are listed at /docs")
        else:
            error = GatewayError(str(exc.detail))
            error.status = exc.status_code
        response = render_refusal(request, family, error)
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(ClientGone)
    async def _client_gone(_request: Request, _exc: ClientGone):
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.get("/", tags=["servelet"], summary="Hello, with the version and the endpoints served")
    async def hello():
        return {
            "message": "hello world",
            "service": "servelet",
            "version": __version__,
            "endpoints": sorted(fleet.endpoints),
            "docs": "/docs",
        }

    @app.get("/health", tags=["servelet"], summary="Gateway liveness and each endpoint's readiness and status")
    async def health():
        endpoints = {
            name: {
                "ready": endpoint.ready,
                "variants": {
                    v.name: {"instances": len(v.instances), "ready": len(v.ready_instances())} for v in endpoint.variants
                },
            }
            for name, endpoint in fleet.endpoints.items()
        }
        # The store knows the endpoints the fleet no longer runs (Failed), and why each failed.
        for record in await asyncio.to_thread(store.list_endpoints):  # off the loop: load balancers poll this
            shown = endpoints.setdefault(record.endpoint_name, {"ready": False, "variants": {}})
            shown["status"] = record.endpoint_status.value
            if record.failure_reason:
                shown["failure_reason"] = record.failure_reason
        return {"status": "ok", "endpoints": endpoints}

    @app.get("/metrics", tags=["servelet"], summary="Prometheus metrics", response_class=Response)
    async def prometheus_metrics():
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    # Application Auto Scaling shares the control route: AWS JSON 1.1 on `POST /`, its own X-Amz-Target prefix.
    sagemaker_control.add_service(autoscaling.TARGET_PREFIX, autoscaling.OPERATIONS)
    for family in (sagemaker, sagemaker_async, sagemaker_control, tgi, qa, openai, websocket):
        app.include_router(family.router)
    return app
