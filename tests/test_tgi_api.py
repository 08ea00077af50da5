"""TGI's API on `servelet serve`, through the client TGI users have: `huggingface_hub.InferenceClient`.

The client is pointed at the gateway's URL and posts to `/` (TGI's compat route); `/generate`,
`/generate_stream` and `/info` are checked over httpx for their exact wire shapes.
"""

from __future__ import annotations

import json
import re
import threading
import time

import httpx

import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.errors import ValidationError

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def client(gateway) -> InferenceClient:
    return InferenceClient(model=gateway.base_url, timeout=120)


def sse_events(response) -> list[dict]:
    """The JSON of each `data:` line of a server-sent event stream."""
    return [json.loads(line.removeprefix("data:")) for line in response.iter_lines() if line.startswith("data:")]


# -- generation ---------------------------------------------------------------------------------
def test_streamed_text_equals_the_generated_text(client):
    text = client.text_generation(PROMPT, max_new_tokens=8)
    assert isinstance(text, str) and text.strip()
    streamed = "".join(client.text_generation(PROMPT, max_new_tokens=8, stream=True))
    assert streamed == text


def test_details_carry_each_token_and_why_generation_stopped(client):
    output = client.text_generation(PROMPT, max_new_tokens=6, details=True)
    details = output.details
    assert details.finish_reason in ("length", "eos_token", "stop_sequence")
    assert details.generated_tokens == len(details.tokens)
    if details.finish_reason == "length":
        assert details.generated_tokens == 6
    assert "".join(t.text for t in details.tokens) == output.generated_text
    assert all(t.logprob <= 0 for t in details.tokens)
    assert details.prefill == [] and details.seed is None
    assert not any(t.special for t in details.tokens[:-1])


def test_streamed_details_end_with_the_whole_text(client):
    events = list(client.text_generation(PROMPT, max_new_tokens=6, details=True, stream=True))
    assert [e.index for e in events] == list(range(1, len(events) + 1))
    assert all(e.generated_text is None and e.details is None for e in events[:-1])
    last = events[-1]
    assert last.generated_text == "".join(e.token.text for e in events)
    assert last.generated_text == client.text_generation(PROMPT, max_new_tokens=6)
    assert last.details.generated_tokens == len(events)
    assert last.details.input_length > 0


def test_stop_sequence_ends_the_text_early(client):
    full = client.text_generation(PROMPT, max_new_tokens=12)
    words = full.split()
    assert len(words) >= 3, full
    stop = " " + words[2]
    output = client.text_generation(PROMPT, max_new_tokens=12, stop=[stop], details=True)
    assert output.details.finish_reason == "stop_sequence"
    # As TGI does, the text keeps the stop sequence that ended it (OpenAI's routes leave it out).
    assert output.generated_text == full[: full.index(stop) + len(stop)], (full, output.generated_text)
    events = list(client.text_generation(PROMPT, max_new_tokens=12, stop=[stop], stream=True, details=True))
    assert events[-1].generated_text == output.generated_text
    assert "".join(e.token.text for e in events) == output.generated_text


def test_return_full_text_prepends_the_prompt(client):
    text = client.text_generation(PROMPT, max_new_tokens=4)
    assert client.text_generation(PROMPT, max_new_tokens=4, return_full_text=True) == PROMPT + text
    streamed = list(client.text_generation(PROMPT, max_new_tokens=4, return_full_text=True, stream=True, details=True))
    assert streamed[-1].generated_text == PROMPT + text


def test_seeded_sampling_repeats(client):
    kwargs = dict(max_new_tokens=8, do_sample=True, temperature=1.5, seed=7, details=True)
    first, second = client.text_generation(PROMPT, **kwargs), client.text_generation(PROMPT, **kwargs)
    assert first.generated_text == second.generated_text
    assert first.details.seed == 7


def test_generate_routes_answer_tgi_shapes(gateway):
    with gateway.http(timeout=120) as http:
        body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 4, "details": True}}
        answer = http.post("/generate", json=body)
        assert answer.status_code == 200, answer.text
        generated = answer.json()
        assert set(generated) == {"generated_text", "details"}
        assert set(generated["details"]) >= {"finish_reason", "generated_tokens", "seed", "prefill", "tokens"}
        assert set(generated["details"]["tokens"][0]) == {"id", "text", "logprob", "special"}
        plain = http.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}).json()
        assert set(plain) == {"generated_text"}

        with http.stream("POST", "/generate_stream", json=body) as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            assert stream.headers["x-accel-buffering"] == "no"
            events = sse_events(stream)
    assert all(set(e) >= {"index", "token", "generated_text", "details"} for e in events)
    assert [e["generated_text"] for e in events[:-1]] == [None] * (len(events) - 1)
    assert events[-1]["generated_text"] == generated["generated_text"]
    assert set(events[-1]["details"]) >= {"finish_reason", "generated_tokens", "seed", "input_length"}


def test_info_describes_the_model(gateway):
    with gateway.http() as http:
        info = http.get("/info").json()
    assert info["model_id"]
    assert info["router"] == "servelet" and info["version"]
    assert 0 < info["max_input_tokens"] < info["max_total_tokens"]
    assert info["max_concurrent_requests"] >= 1
    client = InferenceClient(model=gateway.base_url, provider="hf-inference")
    assert client.get_endpoint_info()["max_total_tokens"] == info["max_total_tokens"]


# -- errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, named",
    [
        ({"temperature": -1.0}, "temperature"),
        ({"truncate": 10}, "truncate"),
        ({"watermark": True}, "watermark"),
        ({"best_of": 2, "do_sample": True}, "best_of"),
        ({"top_n_tokens": 3}, "top_n_tokens"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_bad_parameter_is_named_in_the_clients_error(client, kwargs, named, stream):
    with pytest.raises(ValidationError, match=named):
        result = client.text_generation(PROMPT, max_new_tokens=2, stream=stream, **kwargs)
        list(result) if stream else result


@pytest.mark.parametrize(
    "route, body, named",
    [
        ("/generate", {"inputs": PROMPT, "parameters": {"truncate": 8}}, "parameters.truncate"),
        ("/generate", {"inputs": PROMPT, "parameters": {"beam_width": 2}}, "parameters.beam_width"),
        ("/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": "many"}}, "parameters.max_new_tokens"),
        ("/generate", {"inputs": ""}, "inputs"),
        ("/generate_stream", {"inputs": PROMPT, "parameters": {"top_p": 2.0}}, "top_p"),
        ("/generate_stream", {"parameters": {"max_new_tokens": 2}}, "inputs"),
    ],
)
def test_refused_requests_answer_tgi_errors(gateway, route, body, named):
    with gateway.http(timeout=60) as http:
        answer = http.post(route, json=body)
    assert answer.status_code == 422, answer.text
    error = answer.json()
    assert error["error_type"] == "validation"
    assert named in error["error"]


def test_body_that_is_not_json_is_refused(gateway):
    with gateway.http() as http:
        answer = http.post("/generate", content=b"inputs=hello", headers={"content-type": "application/json"})
    assert answer.status_code == 400
    assert "not valid JSON" in answer.json()["error"]


# -- a client that leaves -----------------------------------------------------------------------
def running_sequences(http) -> float:
    metrics = http.get("/metrics").text
    found = re.findall(r'^servelet_running_sequences\{endpoint="default"[^}]*\} (\S+)$', metrics, re.M)
    return sum(float(v) for v in found)


LONG = {"inputs": "1, 2, 3, 4, 5, 6,", "parameters": {"max_new_tokens": 1500}}  # minutes of work on a CPU


def wait_until_idle(http, seconds: float = 8) -> None:
    deadline = time.monotonic() + seconds
    while running_sequences(http) > 0 and time.monotonic() < deadline:
        time.sleep(0.25)
    assert running_sequences(http) == 0


def test_leaving_a_stream_cancels_its_generation(gateway):
    body = LONG
    with gateway.http(timeout=60) as http:
        with http.stream("POST", "/generate_stream", json=body) as stream:
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            deadline = time.monotonic() + 10
            while running_sequences(http) < 1 and time.monotonic() < deadline:
                next(line for line in lines if line.startswith("data:"))  # keep reading: the stream goes on
            assert running_sequences(http) >= 1
        # The client closed the connection long before 1500 tokens: the engine stops generating.
        wait_until_idle(http)


def test_leaving_a_generate_cancels_it(gateway):
    outcome = []

    def impatient_client():
        with gateway.http(timeout=4) as http:
            try:
                http.post("/generate", json=LONG)
            except httpx.ReadTimeout:
                outcome.append("left after 4 s")

    leaving = threading.Thread(target=impatient_client)
    leaving.start()
    with gateway.http(timeout=10) as http:
        deadline = time.monotonic() + 4
        while running_sequences(http) < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert running_sequences(http) >= 1
        leaving.join()
        assert outcome == ["left after 4 s"]
        wait_until_idle(http)
