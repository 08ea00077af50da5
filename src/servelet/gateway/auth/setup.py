"""Putting the gate on the app: browser checks always, keys and confined file:// URIs when auth is on, CORS only
where configured."""

from __future__ import annotations

import logging

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from ... import objects
from ...control.api_keys import ApiKeys
from ...control.async_queue import JobQueue
from ...control.secret_box import SecretBox
from ...control.store import Store
from ...settings import GatewaySettings
from .credentials import Authenticator
from .middleware import Gate

log = logging.getLogger("servelet.gateway")


def guard(app: FastAPI, settings: GatewaySettings, store: Store, jobs: JobQueue) -> None:
    authenticator = Authenticator(ApiKeys(store, SecretBox(settings.data_dir))) if settings.auth else None
    log.info("auth %s", "on: every route but /ping and /health needs a key" if settings.auth else "off")
    app.state.authenticator = authenticator  # the WebSocket route authenticates a first message with it
    objects.confine_files(settings.file_roots if settings.auth else None)
    app.add_middleware(Gate, settings=settings, authenticator=authenticator, jobs=jobs)
    if settings.cors_origins:  # outermost: a preflight carries no credentials
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
            allow_headers=["authorization", "x-api-key", "content-type"],
        )
