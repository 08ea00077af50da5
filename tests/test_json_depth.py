"""JSON nested too deep is the client's error: a 400 naming the limit, in each API family's own error shape.

A 200 KB body of 100,000 brackets used to raise RecursionError in the gateway and answer 500.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from conftest import start_gateway, stop_process
from websockets.asyncio.client import connect

from servelet.gateway import client_json
from servelet.gateway.api.sagemaker import ask_to_stream

DEPTH = 8  # the gateway's limit here, so that a body just past it is small
BRACKETS = b"[" * 100_000 + b"]" * 100_000
AMZ_JSON = "application/x-amz-json-1.1"


def nested(levels: int) -> dict:
    """An object with a member `parameters` holding `levels` objects in all (itself included)."""
    value: dict = {}
    for _ in range(levels - 2):
        value = {"a": value}
    return {"inputs": "hi", "parameters": value}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    gateway = start_gateway(
        tmp_path_factory.mktemp("json-depth"), env={"SERVELET_INSTANCES": "0", "SERVELET_MAX_JSON_DEPTH": str(DEPTH)},
        ready=None,
    )
    yield gateway
    stop_process(gateway.process)


def post(gateway, path: str, body: bytes, **headers) -> httpx.Response:
    return httpx.post(
        gateway.base_url + path, content=body, headers={"Content-Type": "application/json", **headers}, timeout=30
    )


def names_the_limit(message: str) -> bool:
    return f"deeper than {DEPTH} levels" in message and "SERVELET_MAX_JSON_DEPTH" in message


@pytest.mark.parametrize("body", [BRACKETS, json.dumps(nested(DEPTH + 1)).encode()], ids=["100k-brackets", "limit+1"])
@pytest.mark.parametrize(
    ("path", "message_of"),
    [
        ("/generate", lambda body: body["error"]),  # TGI
        ("/generate_stream", lambda body: body["error"]),
        ("/", lambda body: body["error"]),  # TGI's compat route
        ("/v1/completions", lambda body: body["error"]["message"]),  # OpenAI
        ("/v1/chat/completions", lambda body: body["error"]["message"]),
        ("/question", lambda body: body["error"]),  # the QA routes
    ],
)
def test_data_plane_routes_answer_400_naming_the_limit(gateway, path, message_of, body):
    answer = post(gateway, path, body)
    assert answer.status_code == 400, answer.text
    assert names_the_limit(message_of(answer.json())), answer.text


def test_a_body_at_the_limit_is_parsed(gateway):
    answer = post(gateway, "/generate", json.dumps(nested(DEPTH)).encode())
    assert "deeper than" not in answer.text  # it goes on to the endpoint, which does not exist here
    assert answer.status_code != 500


@pytest.mark.parametrize("target", ["SageMaker.CreateModel", "AnyScaleFrontendService.RegisterScalableTarget"])
@pytest.mark.parametrize("body", [BRACKETS, json.dumps(nested(DEPTH + 1)).encode()], ids=["100k-brackets", "limit+1"])
def test_control_apis_answer_a_validation_exception(gateway, target, body):
    answer = post(gateway, "/", body, **{"Content-Type": AMZ_JSON, "X-Amz-Target": target})
    assert answer.status_code == 400, answer.text
    error = answer.json()
    assert error["__type"] == "ValidationException"
    assert names_the_limit(error["message"])


def test_a_websocket_message_gets_an_error_frame_and_the_connection_stays(gateway):
    async def talk():
        async with connect(f"ws://127.0.0.1:{gateway.port}/ws", max_size=None) as ws:
            welcome = json.loads(await ws.recv())
            assert welcome["limits"]["max_json_depth"] == DEPTH
            frames = []
            for message in (BRACKETS.decode(), json.dumps(nested(DEPTH + 1))):
                await ws.send(message)
                frames.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
            return frames

    for frame in asyncio.run(talk()):
        assert frame["type"] == "error" and frame["code"] == 400
        assert names_the_limit(frame["message"])


def test_a_streamed_invocation_body_too_deep_is_refused():
    with pytest.raises(client_json.TooDeep):
        ask_to_stream(BRACKETS, "application/json", 64)
    assert ask_to_stream(b'{"inputs": [[1]]}', "application/json", 64) == b'{"inputs": [[1]], "stream": true}'


@pytest.mark.parametrize(
    ("text", "depth"), [("1", 0), ("[]", 1), ('{"a": [1, {"b": 2}]}', 3), ('[[], [[[]]], {}]', 4), ('"[[["', 0)]
)
def test_depth_counts_arrays_and_objects(text, depth):
    assert client_json.depth(json.loads(text)) == depth
    assert client_json.loads(text, max_depth=max(depth, 1)) == json.loads(text)
    if depth > 1:
        with pytest.raises(client_json.TooDeep):
            client_json.loads(text, max_depth=depth - 1)
