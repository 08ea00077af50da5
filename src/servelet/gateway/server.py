"""Run the gateway under uvicorn."""

from __future__ import annotations

import logging

import uvicorn

from ..redaction import uvicorn_log_config
from ..settings import GatewaySettings
from .app import create_gateway
from .limits import connections_per_client_protocol

log = logging.getLogger("servelet.gateway")


def run_gateway(settings: GatewaySettings) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per forwarded request and health poll
    app = create_gateway(settings)
    log.info("gateway on http://%s:%d (docs at /docs)", settings.host, settings.port)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        log_config=uvicorn_log_config(),
        timeout_graceful_shutdown=5,
        ws_ping_interval=20,
        # Above our own limit, so an oversized WebSocket message gets our error frame rather than a closed socket.
        ws_max_size=settings.max_payload_bytes + 64 * 1024,
        http=connections_per_client_protocol(settings.http_connections_per_client),
        h11_max_incomplete_event_size=settings.max_header_bytes,  # the h11 parser's bound; HeaderLimit checks any parser
    )
    return 0
