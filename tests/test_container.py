"""`servelet container` as a user runs it: a real process, the real model, called over HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import time

import httpx
import pytest
from conftest import SERVELET, start_instance, stop_instance

from servelet.instance.client import InstanceClient, JsonLines


def invoke(container, body, **kwargs) -> httpx.Response:
    with container.http(timeout=120) as http:
        return http.post("/invocations", json=body, **kwargs)


def test_ping_answers_once_the_model_is_loaded(container):
    with container.http() as http:
        answer = http.get("/ping")
    assert answer.status_code == 200 and answer.json()["status"] == "healthy"


def test_one_input_answers_generated_text(container):
    answer = invoke(container, {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 16}})
    assert answer.status_code == 200
    assert answer.json().keys() == {"generated_text"} and answer.json()["generated_text"].strip()


def test_a_list_of_inputs_answers_a_list_with_details(container):
    body = {"inputs": ["apple, apple, apple,", "river, river, river,"], "parameters": {"max_new_tokens": 6, "details": True}}
    answers = invoke(container, body).json()
    assert [("apple" in a["generated_text"], "river" in a["generated_text"]) for a in answers] == [(True, False), (False, True)]
    for a in answers:
        assert a["details"]["finish_reason"] == "length" and a["details"]["generated_tokens"] == 6
        assert len(a["details"]["tokens"]) == 6


async def test_sixteen_concurrent_http_requests_all_complete(container):
    words = ["apple", "river", "guitar", "pencil", "tiger", "window", "candle", "rocket"] * 2
    async with httpx.AsyncClient(base_url=container.base_url, timeout=120) as http:
        bodies = [{"inputs": f"{w}, {w}, {w}, {w}, {w},", "parameters": {"max_new_tokens": 8}} for w in words]
        answers = await asyncio.gather(*(http.post("/invocations", json=b) for b in bodies))
    for word, answer in zip(words, answers):
        assert answer.status_code == 200 and word in answer.json()["generated_text"]


def test_streaming_sends_one_json_line_per_token_and_a_final_summary(container):
    body = {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 10}, "stream": True}
    with container.http(timeout=60) as http, http.stream("POST", "/invocations", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/jsonlines")
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert len(lines) == 10 and all(set(line["token"]) == {"id", "text", "log_prob"} for line in lines)
    last = lines[-1]
    assert last["generated_text"] == "".join(line["token"]["text"] for line in lines)
    assert last["details"]["finish_reason"] == "length" and last["details"]["generated_tokens"] == 10
    assert all("generated_text" not in line for line in lines[:-1])


def test_a_stream_split_at_arbitrary_bytes_is_reassembled_by_a_line_iterator(container):
    body = {"inputs": "Le café est très", "parameters": {"max_new_tokens": 24}, "stream": True}
    with container.http(timeout=60) as http:
        raw = http.post("/invocations", json=body).content
    expected = [json.loads(line) for line in raw.splitlines() if line]
    rng = random.Random(1234)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(raw)), k=min(len(raw) - 1, rng.randint(1, 40))))
        chunks = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)])]
        lines = JsonLines()
        got = [obj for chunk in chunks for obj in lines.feed(chunk)] + lines.close()
        assert got == expected


async def test_the_instance_client_streams_from_the_real_server(container):
    client = InstanceClient(container.base_url)
    try:
        lines = [obj async for obj in client.stream({"inputs": "Water boils at", "parameters": {"max_new_tokens": 5}})]
        assert await client.ping()
    finally:
        await client.aclose()
    assert len(lines) == 5 and lines[-1]["generated_text"] == "".join(line["token"]["text"] for line in lines)


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"inputs": "hello", "parameters": {"max_new_tokens": 4096}}, 422, "exceed the context length"),
        ({"inputs": ""}, 422, "inputs must not be empty"),
        ({"inputs": []}, 422, "inputs must not be empty"),
        ({"inputs": "hello", "parameters": {"beam_width": 4}}, 422, "parameters.beam_width: unknown parameter"),
        ({"inputs": "hello", "parameters": {"max_new_tokens": 0}}, 422, "parameters.max_new_tokens"),
        ({"inputs": "hello", "parameters": {"max_new_tokens": -3}}, 422, "parameters.max_new_tokens"),
        ({"inputs": "hello", "parameters": {"temperature": -1}}, 422, "parameters.temperature"),
        ({"inputs": "hello", "parameters": {"stop": [""]}}, 422, "stop sequences must not be empty"),
        ({"inputs": ["a", "b"], "stream": True}, 422, "stream takes a single input"),
        ({"prompt": "hello"}, 422, "prompt: unknown field"),
        ({"parameters": {}}, 422, "inputs: required"),
    ],
)
def test_bad_requests_get_a_4xx_naming_the_problem(container, body, status, message):
    answer = invoke(container, body)
    assert answer.status_code == status
    assert message in answer.json()["error"]


def test_malformed_json_and_foreign_content_types_are_refused(container):
    with container.http() as http:
        broken = http.post("/invocations", content=b'{"inputs": "hel', headers={"Content-Type": "application/json"})
        csv = http.post("/invocations", content=b"a,b\n", headers={"Content-Type": "text/csv"})
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]
    assert csv.status_code == 415 and "text/csv" in csv.json()["error"]


@pytest.fixture(scope="module")
def one_slot_instance(tmp_path_factory):
    """One sequence at a time and no queue, on a Unix socket: the smallest instance that can be overloaded."""
    env = {"SERVELET_MAX_BATCH_SIZE": "1", "SERVELET_MAX_WAITING": "0", "OPTION_MAX_MODEL_LEN": "512"}
    instance = start_instance(tmp_path_factory.mktemp("one-slot"), env=env, unix_socket=True)
    yield instance
    stop_instance(instance)


def test_a_full_queue_answers_overloaded_and_a_client_that_leaves_frees_its_slot(one_slot_instance):
    long_body = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 400, "ignore_eos": True}, "stream": True}
    short_body = {"inputs": "Hello", "parameters": {"max_new_tokens": 2}}
    with one_slot_instance.http(timeout=60) as http:
        with http.stream("POST", "/invocations", json=long_body) as stream:
            lines = stream.iter_lines()
            next(lines), next(lines)  # the slot is taken and tokens are flowing
            refused = http.post("/invocations", json=short_body)
            assert refused.status_code == 429 and "overloaded" in refused.json()["error"]
        # The stream is closed after 2 of 400 tokens: its generation must be cancelled, freeing the slot.
        deadline = time.monotonic() + 10
        while (answer := http.post("/invocations", json=short_body)).status_code == 429 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert answer.status_code == 200, answer.text


def test_settings_the_backend_cannot_honour_are_refused_at_start():
    env = os.environ | {"SERVELET_RUNTIME": "llamacpp", "TENSOR_PARALLEL_DEGREE": "4", "OPTION_DTYPE": "fp16", "SERVELET_PORT": "0"}
    done = subprocess.run([SERVELET, "container"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    for variable in ("TENSOR_PARALLEL_DEGREE", "OPTION_DTYPE"):
        assert variable in done.stderr


def test_a_model_that_cannot_load_ends_the_process(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model")
    env = os.environ | {"HF_MODEL_ID": str(junk), "SERVELET_PORT": "0"}
    done = subprocess.run([SERVELET, "container"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "could not load the model" in done.stderr
