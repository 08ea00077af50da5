"""`/metrics` stays bounded whatever endpoint names clients send: a name the gateway does not serve is no new series.

Every value a Prometheus label takes is a series kept until the gateway stops; the QA routes, text generation
and the WebSocket used to label their metrics with the client's endpoint name before anything checked it.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from conftest import start_gateway, stop_process
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect

BOGUS = [f"bogus-{n}" for n in range(50)]
WARM_UP = "warm-up"  # its requests add the series every request of each route adds (route templates, `unknown`)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    gateway = start_gateway(tmp_path_factory.mktemp("metrics-labels"), env={"SERVELET_INSTANCES": "0"}, ready=None)
    yield gateway
    stop_process(gateway.process)


def series(gateway) -> set[tuple]:
    body = httpx.get(f"{gateway.base_url}/metrics", timeout=10).text
    return {
        (sample.name, tuple(sorted(sample.labels.items())))
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def endpoints_named(found: set[tuple]) -> set[str]:
    return {value for _, labels in found for key, value in labels if key == "endpoint"}


async def ask_over_websocket(gateway, names: list[str]) -> None:
    async with connect(f"ws://127.0.0.1:{gateway.port}/ws") as ws:
        await ws.recv()  # the welcome frame
        for number, name in enumerate(names):  # one at a time: more in flight than allowed would be refused
            await ws.send(json.dumps({"id": number, "endpoint": name, "inputs": "hi"}))
            assert json.loads(await asyncio.wait_for(ws.recv(), 30))["type"] == "error"


def ask(gateway, names: list[str]) -> None:
    """Call each route that takes an endpoint name from the client, once per name."""
    with gateway.http(timeout=30) as http:
        for name in names:
            assert http.post("/question", json={"question": "q", "context": "c", "endpoint": name}).status_code >= 400
            assert http.get("/question", params={"question": "q", "context": "c", "endpoint": name}).status_code >= 400
            assert http.post(f"/endpoints/{name}/invocations", json={"inputs": "hi"}).status_code >= 400
            async_call = http.post(f"/endpoints/{name}/async-invocations", headers={"X-Amzn-SageMaker-InputLocation": "s3://b/k"})
            assert async_call.status_code >= 400
            assert http.post("/v1/completions", json={"model": name, "prompt": "hi"}).status_code >= 400
    asyncio.run(ask_over_websocket(gateway, names))


def test_requests_to_50_bogus_endpoints_add_no_series(gateway):
    ask(gateway, [WARM_UP])
    before = series(gateway)
    ask(gateway, BOGUS)
    after = series(gateway)
    assert sorted(after - before) == []
    assert not any(name.startswith(("bogus", WARM_UP)) for name in endpoints_named(after))
