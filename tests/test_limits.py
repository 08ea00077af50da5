"""Each limit, met as a client meets it: the refusal's status, and a message naming the limit and its setting.
Backpressure: a burst of ten times an endpoint's capacity is refused with 429 and Retry-After, never queued without
end, and every admitted request completes."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from conftest import start_gateway, stop_process, wait_for
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

PROMPT = "Once upon a time"
SHORT = {"inputs": PROMPT, "parameters": {"max_new_tokens": 4}}
CAPACITY = 2
LIMITS = {
    "SERVELET_MAX_IN_FLIGHT_PER_ENDPOINT": str(CAPACITY),
    "SERVELET_MAX_TOKENS_PER_REQUEST": "64",
    "SERVELET_MAX_MODEL_LEN": "256",
    "SERVELET_MAX_HEADER_BYTES": "4096",
    "SERVELET_MAX_PAYLOAD_BYTES": "65536",
    "SERVELET_WEBSOCKET_CONNECTIONS_PER_CLIENT": "2",
    "SERVELET_WEBSOCKET_MAX_IN_FLIGHT": "1",
}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, model_path):
    running = start_gateway(tmp_path_factory.mktemp("limits"), env=LIMITS)
    yield running
    stop_process(running.process)


async def burst(base_url: str, path: str, body: dict, count: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as http:
        return await asyncio.gather(*(http.post(path, json=body) for _ in range(count)))


def in_flight(gateway) -> float:
    body = httpx.get(f"{gateway.base_url}/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
        if sample.name == "servelet_gateway_in_flight" and sample.labels == {"endpoint": "default"}
    )


# -- backpressure ------------------------------------------------------------------------------------------------
def test_a_burst_of_ten_times_the_endpoint_capacity_is_throttled_and_every_admitted_request_completes(gateway):
    answers = asyncio.run(burst(gateway.base_url, "/endpoints/default/invocations", SHORT, 10 * CAPACITY))
    statuses = [a.status_code for a in answers]
    assert set(statuses) <= {200, 429}, statuses
    admitted = [a for a in answers if a.status_code == 200]
    throttled = [a for a in answers if a.status_code == 429]
    assert len(admitted) >= CAPACITY and throttled, statuses
    assert all(a.json()["generated_text"] for a in admitted)
    for answer in throttled:  # SageMaker's shape: boto3 raises ThrottlingException and backs off
        assert answer.headers["retry-after"] == "1"
        assert answer.headers["x-amzn-errortype"] == "ThrottlingException"
        assert f"SERVELET_MAX_IN_FLIGHT_PER_ENDPOINT={CAPACITY}" in answer.json()["Message"]
    assert wait_for(lambda: in_flight(gateway) == 0, 5)


def test_other_families_are_throttled_in_their_own_shape(gateway):
    answers = asyncio.run(burst(gateway.base_url, "/generate", SHORT, 10 * CAPACITY))
    throttled = [a for a in answers if a.status_code == 429]
    assert throttled and all(a.status_code == 200 for a in answers if a not in throttled)
    assert throttled[0].headers["retry-after"] == "1"
    assert "SERVELET_MAX_IN_FLIGHT_PER_ENDPOINT" in throttled[0].json()["error"]


def test_requests_in_flight_are_a_metric(gateway):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 64, "ignore_eos": True}}
    with gateway.http(timeout=60) as http, http.stream("POST", "/generate_stream", json=body) as response:
        lines = response.iter_lines()  # kept: a dropped iterator closes the response
        next(lines)
        assert in_flight(gateway) == 1
    assert wait_for(lambda: in_flight(gateway) == 0, 5)


def test_a_full_engine_queue_answers_429_with_retry_after(tmp_path):
    """The gateway admits more than the instance holds (a batch of 1, a queue of 1): the engine refuses the rest."""
    engine_bound = start_gateway(tmp_path, env={"SERVELET_MAX_BATCH_SIZE": "1", "SERVELET_MAX_WAITING": "1"})
    try:
        answers = asyncio.run(burst(engine_bound.base_url, "/generate", SHORT, 20))
    finally:
        stop_process(engine_bound.process)
    throttled = [a for a in answers if a.status_code == 429]
    assert throttled and all(a.status_code == 200 for a in answers if a not in throttled)
    assert throttled[0].headers["retry-after"] == "1"
    assert "queue 1" in throttled[0].json()["error"]


# -- limits ------------------------------------------------------------------------------------------------------
def test_max_new_tokens_over_the_limit_is_refused_naming_it(gateway):
    with gateway.http(timeout=60) as http:
        answer = http.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 65}})
    assert answer.status_code == 422
    assert "limit of 64 tokens per request (SERVELET_MAX_TOKENS_PER_REQUEST)" in answer.json()["error"]


def test_a_prompt_and_new_tokens_over_the_context_are_refused_naming_both(gateway):
    long_prompt = "one two three four five six seven eight nine ten " * 24  # over 200 tokens
    with gateway.http(timeout=60) as http:
        answer = http.post("/generate", json={"inputs": long_prompt, "parameters": {"max_new_tokens": 64}})
    assert answer.status_code == 422
    error = answer.json()["error"]
    assert "max_new_tokens is 64" in error and "context length of 256 tokens (SERVELET_MAX_MODEL_LEN)" in error


def test_a_body_over_the_payload_limit_is_413(gateway):
    with gateway.http(timeout=60) as http:
        answer = http.post("/generate", json={"inputs": "x" * 65536})
    assert answer.status_code == 413
    assert "SERVELET_MAX_PAYLOAD_BYTES" in answer.json()["error"]


def test_headers_over_the_limit_are_431(gateway):
    with gateway.http(timeout=60) as http:
        answer = http.post("/generate", json=SHORT, headers={"x-padding": "p" * 5000})
        fine = http.get("/health", headers={"x-padding": "p" * 1000})
    assert answer.status_code == 431
    assert "limit is 4096 (SERVELET_MAX_HEADER_BYTES)" in answer.json()["error"]
    assert fine.status_code == 200


def ws_url(gateway) -> str:
    return f"ws://127.0.0.1:{gateway.port}/ws"


async def frame(ws) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), 60))


async def test_a_websocket_upgrade_with_headers_over_the_limit_is_431(gateway):
    with pytest.raises(InvalidStatus) as refused:
        async with connect(ws_url(gateway), additional_headers={"x-padding": "p" * 5000}):
            pass
    assert refused.value.response.status_code == 431
    assert b"SERVELET_MAX_HEADER_BYTES" in refused.value.response.body


async def test_websocket_messages_over_the_payload_limit_get_an_error_frame(gateway):
    async with connect(ws_url(gateway)) as ws:
        welcome = await frame(ws)
        await ws.send(json.dumps({"inputs": "x" * 65536}))
        error = await frame(ws)
    assert welcome["limits"]["max_message_bytes"] == 65536
    assert error["type"] == "error" and error["code"] == 413 and "SERVELET_MAX_PAYLOAD_BYTES" in error["message"]


async def test_websocket_requests_in_flight_per_connection_are_bounded(gateway):
    long = {"inputs": PROMPT, "parameters": {"max_new_tokens": 64, "ignore_eos": True}}
    async with connect(ws_url(gateway)) as ws:
        assert (await frame(ws))["limits"]["max_requests_in_flight"] == 1
        await ws.send(json.dumps({"id": "first", **long}))
        await ws.send(json.dumps({"id": "second", **SHORT}))
        while (refused := await frame(ws))["type"] == "token":
            pass
    assert refused["type"] == "error" and refused["id"] == "second" and refused["code"] == 429
    assert "SERVELET_WEBSOCKET_MAX_IN_FLIGHT" in refused["message"]


async def test_websocket_connections_per_client_are_bounded(gateway):
    async with connect(ws_url(gateway)) as first, connect(ws_url(gateway)) as second:
        await frame(first), await frame(second)
        with pytest.raises(InvalidStatus) as refused:
            async with connect(ws_url(gateway)):
                pass
        response = refused.value.response
        assert response.status_code == 429 and response.headers["Retry-After"] == "1"
        assert b"SERVELET_WEBSOCKET_CONNECTIONS_PER_CLIENT=2" in response.body
    # Closed connections no longer count.
    for _ in range(2):
        async with connect(ws_url(gateway)) as again:
            assert (await frame(again))["type"] == "welcome"
