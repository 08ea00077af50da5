"""What a client sends as a secret never reaches the gateway's or an instance's log: uvicorn's own access and error
logs pass the same redaction as servelet's (a presigned query in a request line, a `user:token@` URL in a query, an
`Authorization` or `x-api-key` value), and the lines are still written, masked."""

from __future__ import annotations

import asyncio
import json
import logging

import httpx
import pytest
from conftest import start_gateway, stop_process, wait_for
from websockets.asyncio.client import connect

from servelet.redaction import RedactSecrets, redact

SECRET = "s3cr3t-5e1f0a"
MASKED = '"GET /ping?X-Amz-Credential=***&X-Amz-Signature=*** HTTP/1.1"'


def send_secrets(http: httpx.Client) -> None:
    """Requests a careless client or a presigned link would make, each carrying SECRET."""
    http.get(f"/ping?X-Amz-Credential=AKIA%2F{SECRET}&X-Amz-Signature={SECRET}")
    http.get("/ping", params={"model": f"https://user:{SECRET}@models.example.com/m.gguf"})
    http.get(f"/no-such-route?api_key={SECRET}")
    http.get("/ping", headers={"Authorization": f"Bearer {SECRET}", "x-api-key": SECRET})


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    """A gateway with no endpoint: uvicorn logs the same whatever runs behind it."""
    running = start_gateway(tmp_path_factory.mktemp("gateway"), args=["--instances", "0"], ready=None)
    yield running
    stop_process(running.process)


def test_the_gateways_access_and_error_logs_mask_secrets(gateway):
    with gateway.http(timeout=10) as http:
        send_secrets(http)

    async def websocket():  # uvicorn logs a WebSocket's target, query included, in its error log
        async with connect(f"ws://127.0.0.1:{gateway.port}/ws?token={SECRET}") as ws:
            json.loads(await ws.recv())

    asyncio.run(websocket())
    assert wait_for(lambda: "WebSocket /ws?token=***" in gateway.log(), 10), gateway.log()
    assert MASKED in gateway.log() and '"GET /no-such-route?api_key=*** HTTP/1.1" 404' in gateway.log()
    assert SECRET not in gateway.log()


def test_an_instances_access_log_masks_secrets(container):
    with container.http(timeout=10) as http:
        send_secrets(http)
    assert wait_for(lambda: MASKED in container.log(), 10), container.log()
    assert "GET /ping?model=*** HTTP/1.1" in container.log()
    assert SECRET not in container.log()


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("Authorization: Bearer sk-1 2", "Authorization: ***"),
        ("{'authorization': 'Bearer sk-1', 'accept': '*/*'}", "{'authorization': '***', 'accept': '*/*'}"),
        ("[(b'x-api-key', b'k-1'), (b'host', b'h')]", "[(b'x-api-key', b'***'), (b'host', b'h')]"),
        ('{"X-Amz-Security-Token": "tok"}', '{"X-Amz-Security-Token": "***"}'),
        ("the authorization header is missing", "the authorization header is missing"),
    ],
)
def test_redact_masks_authentication_header_values(text, shown):
    assert redact(text) == shown


def test_any_record_with_a_key_in_its_arguments_or_traceback_is_masked():
    """What an exception or a debug line could carry: the headers of the request that raised."""
    try:
        raise ValueError(f"bad signature in {{'authorization': 'AWS4-HMAC-SHA256 Signature={SECRET}'}}")
    except ValueError:
        record = logging.LogRecord("servelet.gateway", logging.ERROR, __file__, 1, "request headers %r", (
            {"x-api-key": SECRET},), exc_info=True)
        record.exc_info = __import__("sys").exc_info()
    assert RedactSecrets().filter(record)
    shown = logging.Formatter().format(record)
    assert "request headers {'x-api-key': '***'}" in shown and SECRET not in shown, shown
