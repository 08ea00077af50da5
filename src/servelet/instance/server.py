"""Run one instance under uvicorn, on host:port or a Unix socket."""

from __future__ import annotations

import logging
import os

import uvicorn
from uvicorn.config import HTTP_PROTOCOLS, LIFESPAN, LOOP_FACTORIES, WS_PROTOCOLS
from uvicorn.importer import import_from_string

from ..redaction import uvicorn_log_config
from ..runtimes import Prepared
from ..settings import InstanceSettings
from .app import create_app
from .channel import MAX_MESSAGE_BYTES

log = logging.getLogger("servelet.instance")


def run_instance(settings: InstanceSettings, prepared: Prepared | None = None) -> int:
    """Serve until stopped; a model that fails to load ends the process with status 1. `prepared`: see create_app."""
    exit_code = 0
    server: uvicorn.Server | None = None

    def on_load_failure(_reason: str) -> None:
        nonlocal exit_code
        exit_code = 1
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_load_failure=on_load_failure, prepared=prepared)
    # The stream channel (channel.py): its messages are tokens, not worth deflating; the peer is the gateway.
    options = dict(
        log_level="info", log_config=uvicorn_log_config(), timeout_graceful_shutdown=5, access_log=settings.access_log,
        ws_max_size=MAX_MESSAGE_BYTES, ws_per_message_deflate=False,
    )
    if settings.socket:
        if settings.socket.exists():
            os.unlink(settings.socket)
        config = uvicorn.Config(app, uds=str(settings.socket), **options)
        where = f"unix:{settings.socket}"
    else:
        config = uvicorn.Config(app, host=settings.host, port=settings.port, **options)
        where = f"http://{settings.host}:{settings.port}"
    server = uvicorn.Server(config)
    log.info("instance for %s listening on %s", settings.model, where)
    server.run()
    return exit_code


def preload_web_stack() -> None:
    """Import what uvicorn imports only when a server starts (its HTTP and WebSocket protocols, lifespan and event
    loop, as `auto` picks them): a snapshot template does it once, not each instance forked from it (30 ms)."""
    for choices in (HTTP_PROTOCOLS, WS_PROTOCOLS, LIFESPAN):
        import_from_string(choices["auto"])
    import_from_string(LOOP_FACTORIES["auto"])()
