"""The WebSocket route as a client sees it with the `websockets` library: many requests on one connection."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from conftest import wait_for
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect

from servelet import __version__

FRAME_TIMEOUT = 120.0  # two CPU cores are shared by several test runs


def url(gateway) -> str:
    return f"ws://127.0.0.1:{gateway.port}/ws"


async def receive(ws) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), FRAME_TIMEOUT))


async def opened(ws) -> dict:
    """Read the welcome frame every connection starts with."""
    welcome = await receive(ws)
    assert welcome["type"] == "welcome"
    return welcome


async def collect(ws, ids) -> dict:
    """Frames by request id, until each id has its final answer or error frame."""
    frames: dict = {request_id: [] for request_id in ids}
    finished: set = set()
    while finished != set(ids):
        frame = await receive(ws)
        frames[frame["id"]].append(frame)
        if frame["type"] in ("answer", "error"):
            finished.add(frame["id"])
    return frames


async def generate(ws, **request) -> tuple[list[dict], dict]:
    """Send one request and return its token frames and its final frame."""
    await ws.send(json.dumps(request))
    frames = []
    while True:
        frame = await receive(ws)
        if frame["type"] != "token":
            return frames, frame
        frames.append(frame)


def metric(gateway, name: str, **labels) -> float:
    """The sum of a /metrics family's samples on `default` with these labels."""
    body = httpx.get(f"{gateway.base_url}/metrics", timeout=10).text
    wanted = {"endpoint": "default", **labels}
    return sum(
        sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
        if sample.name == name and wanted.items() <= sample.labels.items()
    )


async def eventually_counted(gateway, name: str, **labels) -> float:
    """A request is counted just after its answer frame is sent: poll briefly rather than race it."""
    for _ in range(50):
        if (value := metric(gateway, name, **labels)) >= 1:
            return value
        await asyncio.sleep(0.1)
    return metric(gateway, name, **labels)


def running_sequences(gateway) -> float:
    return metric(gateway, "servelet_running_sequences")



async def test_welcome_names_the_version_endpoints_and_formats(gateway):
    async with connect(url(gateway)) as ws:
        welcome = await opened(ws)
    assert welcome["version"] == __version__
    assert "default" in welcome["endpoints"]
    assert any("question" in f for f in welcome["formats"]) and any("inputs" in f for f in welcome["formats"])
    assert welcome["message"]


async def collect_unnamed(ws) -> list[dict]:
    """Frames of a request sent without an id: the server names one and repeats it in every frame."""
    first = await receive(ws)
    frames = (await collect(ws, [first["id"]]))[first["id"]] if first["type"] == "token" else []
    assert isinstance(first["id"], str) and first["id"]
    return [first, *frames]


async def test_three_questions_on_one_connection_two_at_once(gateway):
    async with connect(url(gateway)) as ws:
        await opened(ws)
        await ws.send(json.dumps({
            "id": "car", "question": "What is the color of my car now?", "context": "My car used to be blue but I painted red",
        }))
        await ws.send(json.dumps({
            "id": 2, "question": "Where do I live?", "context": "My name is Wolfgang and I live in Berlin",
        }))
        frames = await collect(ws, ["car", 2])
        await ws.send(json.dumps({"question": "What is my name?", "context": "My name is Clara and I live in Berkeley."}))
        third = await collect_unnamed(ws)

    car, home = frames["car"][-1], frames[2][-1]
    assert car["type"] == "answer" and car["answer"] == "red", car
    assert "Berlin" in home["answer"], home
    assert third[-1]["answer"] == "Clara", third[-1]
    for answer, context in ((car, "My car used to be blue but I painted red"), (third[-1], "My name is Clara and I live in Berkeley.")):
        assert context[answer["start"]:answer["end"]] == answer["answer"]
        assert 0 < answer["score"] <= 1
    for request_frames in (frames["car"], frames[2], third):
        assert [f["type"] for f in request_frames[:-1]] == ["token"] * (len(request_frames) - 1)
        assert request_frames[:-1], "the answer's tokens stream before the final frame"


async def test_token_frames_concatenate_to_the_generated_text(gateway):
    async with connect(url(gateway)) as ws:
        await opened(ws)
        tokens, answer = await generate(
            ws, id="paris", inputs="The capital of France is", parameters={"max_new_tokens": 8, "temperature": 0}
        )
    assert answer["type"] == "answer" and answer["id"] == "paris"
    assert all(t["id"] == "paris" for t in tokens)
    assert "".join(t["text"] for t in tokens) == answer["generated_text"]
    assert answer["generated_text"].strip()
    assert answer["finish_reason"] in ("length", "eos_token")
    usage = answer["usage"]
    # Tokens that show no text (the end-of-text token) send no frame.
    assert len(tokens) <= usage["completion_tokens"] <= len(tokens) + 1 and usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert await eventually_counted(gateway, "servelet_websocket_requests_total", kind="generate", outcome="ok") >= 1


async def test_chat_messages_answer_the_assistant_turn(gateway):
    async with connect(url(gateway)) as ws:
        await opened(ws)
        tokens, answer = await generate(ws, id="chat", messages=[
            {"role": "system", "content": "You answer in one short sentence."},
            {"role": "user", "content": "What is the capital of France?"},
        ], parameters={"max_new_tokens": 12})
    assert answer["type"] == "answer" and answer["id"] == "chat", answer
    assert "".join(t["text"] for t in tokens) == answer["generated_text"]
    assert "User:" not in answer["generated_text"]
    assert answer["finish_reason"] in ("length", "eos_token", "stop_sequence")


@pytest.mark.parametrize(
    "message, says",
    [
        ("this is not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        (json.dumps({"id": "x", "prompt": "hi"}), "exactly one of"),
        (json.dumps({"id": "x", "question": "Who?"}), "context: required"),
        (json.dumps({"id": "x", "inputs": "hi", "parameters": "fast"}), "parameters"),
        (json.dumps({"id": "x", "inputs": "hi", "paramters": {}}), "paramters: unknown field"),
        (json.dumps({"id": 1.5, "inputs": "hi"}), "id"),
        (json.dumps({"id": "x", "messages": []}), "messages"),
        (json.dumps({"id": "x", "messages": [{"role": "robot", "content": "hi"}]}), "messages.0.role"),
        (json.dumps({"type": "shout", "inputs": "hi"}), "unknown message type"),
        (json.dumps({"type": "cancel", "id": "nothing-running"}), "no request with id"),
    ],
)
async def test_a_malformed_message_gets_an_error_frame_and_the_connection_stays_open(gateway, message, says):
    async with connect(url(gateway)) as ws:
        await opened(ws)
        await ws.send(message)
        error = await receive(ws)
        assert error["type"] == "error" and says in error["message"], error
        _, answer = await generate(ws, id="after", inputs="The capital of France is", parameters={"max_new_tokens": 2})
    assert answer["type"] == "answer" and answer["id"] == "after"


async def test_errors_of_a_request_carry_its_id(gateway):
    async with connect(url(gateway)) as ws:
        await opened(ws)
        _, unknown = await generate(ws, id="u", endpoint="nowhere", inputs="hi", parameters={"max_new_tokens": 2})
        _, bad = await generate(ws, id="b", inputs="hi", parameters={"max_new_tokens": 2, "temperature": -1})
        _, empty = await generate(ws, id="q", question=" ", context="My car is red.")
        await ws.send(b'{"inputs": "binary"}')
        binary = await receive(ws)
    assert unknown["type"] == "error" and unknown["id"] == "u" and "nowhere" in unknown["message"], unknown
    assert unknown["code"] == 404
    assert bad["type"] == "error" and bad["id"] == "b" and "temperature" in bad["message"], bad
    assert empty["type"] == "error" and empty["id"] == "q" and "question" in empty["message"], empty
    assert binary["type"] == "error" and "text message" in binary["message"], binary


async def test_a_message_over_the_size_limit_is_refused(gateway):
    async with connect(url(gateway), max_size=None) as ws:
        limit = (await opened(ws))["limits"]["max_message_bytes"]
        await ws.send(json.dumps({"id": "big", "inputs": "x" * (limit + 1)}))
        error = await receive(ws)
        assert error["type"] == "error" and "limit" in error["message"], error
        _, answer = await generate(ws, inputs="Hello", parameters={"max_new_tokens": 1})
    assert answer["type"] == "answer"


async def test_a_duplicate_id_in_flight_and_too_many_requests_are_refused(gateway):
    async with connect(url(gateway)) as ws:
        welcome = await opened(ws)
        most = welcome["limits"]["max_requests_in_flight"]
        long = {"parameters": {"max_new_tokens": 64, "ignore_eos": True}, "inputs": "Once upon a time"}
        await ws.send(json.dumps({"id": "dup", **long}))
        await ws.send(json.dumps({"id": "dup", **long}))
        for n in range(most - 1):
            await ws.send(json.dumps({"id": n, **long}))
        await ws.send(json.dumps({"id": "one-too-many", **long}))
        errors = []
        while len(errors) < 2:
            frame = await receive(ws)
            if frame["type"] == "error":
                errors.append(frame)
    duplicate, overload = errors
    assert "already in flight" in duplicate["message"] and "id" not in duplicate, duplicate
    assert overload["id"] == "one-too-many" and f"{most} requests in flight" in overload["message"], overload


async def test_cancel_stops_one_request(gateway):
    async with connect(url(gateway)) as ws:
        await opened(ws)
        await ws.send(json.dumps({"id": "long", "inputs": "Once upon a time", "parameters": {"max_new_tokens": 500, "ignore_eos": True}}))
        assert (await receive(ws))["type"] == "token"
        await ws.send(json.dumps({"type": "cancel", "id": "long"}))
        while (frame := await receive(ws))["type"] == "token":
            pass
        assert frame == {"type": "cancelled", "id": "long"}
        _, answer = await generate(ws, id="long", inputs="Hello", parameters={"max_new_tokens": 1})
    assert answer["type"] == "answer" and answer["id"] == "long"


async def test_a_disconnect_mid_generation_frees_the_engine_slot(gateway):
    assert wait_for(lambda: running_sequences(gateway) == 0, 30)
    cancelled = metric(gateway, "servelet_websocket_requests_total", kind="generate", outcome="cancelled")
    async with connect(url(gateway)) as ws:
        await opened(ws)
        await ws.send(json.dumps({"id": "long", "inputs": "Once upon a time", "parameters": {"max_new_tokens": 1500, "ignore_eos": True}}))
        assert (await receive(ws))["type"] == "token"
        assert await asyncio.to_thread(wait_for, lambda: running_sequences(gateway) > 0, 10)
    assert await asyncio.to_thread(wait_for, lambda: running_sequences(gateway) == 0, 10), "the generation still runs"
    assert metric(gateway, "servelet_websocket_requests_total", kind="generate", outcome="cancelled") == cancelled + 1
