"""The OpenAI API family, called with the official `openai` client against a real `servelet serve`."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from openai import OpenAI

from conftest import wait_for
from servelet.gateway.api.openai import ChatCompletionRequest, CompletionRequest

PROMPT = "The capital of France is"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(gateway) -> OpenAI:
    return OpenAI(base_url=gateway.base_url + "/v1", api_key="x", max_retries=0, timeout=60)


def same_counts(usage, other) -> bool:
    """Token counts alike; the second of two equal prompts may find its prefix cached (prompt_tokens_details)."""
    return (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
        other.prompt_tokens, other.completion_tokens, other.total_tokens)


# -- models ----------------------------------------------------------------------------------------------------
def test_models_are_the_endpoints(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["default"]
    assert models[0].object == "model" and models[0].owned_by == "servelet" and models[0].created > 0
    assert client.models.retrieve("default").id == "default"


def test_an_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as found:
        client.models.retrieve("nope")
    assert found.value.code == "model_not_found"
    for call in (
        lambda: client.completions.create(model="nope", prompt=PROMPT, max_tokens=2),
        lambda: client.chat.completions.create(model="nope", messages=QUESTION, max_tokens=2),
    ):
        with pytest.raises(openai.NotFoundError) as found:
            call()
        assert found.value.code == "model_not_found" and found.value.param == "model"
        assert "nope" in found.value.message and "default" in found.value.message


def test_a_target_model_with_a_line_break_is_refused_and_the_instance_stays_in_service(client, gateway):
    """`model` = ENDPOINT/TARGET becomes a header to the instance: a line break in it must not reach the wire."""
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model="default/x\r\nX-Evil: 1", prompt=PROMPT, max_tokens=2, stream=stream)
        assert "line break" in refused.value.message
    assert client.completions.create(model="default", prompt=PROMPT, max_tokens=2).choices[0].text


# -- completions -----------------------------------------------------------------------------------------------
def test_completion_answers_text_with_usage(client):
    answer = client.completions.create(model="default", prompt=PROMPT, max_tokens=8, temperature=0)
    choice = answer.choices[0]
    assert answer.object == "text_completion" and answer.model == "default"
    assert choice.text.strip() and choice.finish_reason in ("stop", "length")
    usage = answer.usage
    assert usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 8
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_streamed_completion_is_the_greedy_answer_in_pieces(client):
    whole = client.completions.create(model="default", prompt=PROMPT, max_tokens=8, temperature=0)
    chunks = list(
        client.completions.create(
            model="default", prompt=PROMPT, max_tokens=8, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len(texts) > 2 and "".join(texts) == whole.choices[0].text
    finished = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finished == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and same_counts(chunks[-1].usage, whole.usage)
    assert len({c.id for c in chunks}) == 1


def test_stream_is_server_sent_events_ending_with_done(gateway):
    body = {"model": "default", "prompt": PROMPT, "max_tokens": 3, "temperature": 0, "stream": True}
    with gateway.http(timeout=60) as http, http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-accel-buffering"] == "no"
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) >= 3


def test_max_tokens_is_honoured(client):
    answer = client.completions.create(model="default", prompt="Once upon a time", max_tokens=3, temperature=0)
    assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 3


def test_stop_sequences_end_the_text_without_showing_them(client):
    free = client.completions.create(model="default", prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
    word = free.split()[2]  # a word from the middle of the greedy answer
    stopped = client.completions.create(model="default", prompt=PROMPT, max_tokens=8, temperature=0, stop=[word])
    assert stopped.choices[0].text == free[: free.index(word)]
    assert stopped.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(client):
    def sample():
        return client.completions.create(
            model="default", prompt="Once upon a time", max_tokens=8, temperature=0.8, seed=7
        ).choices[0].text

    assert sample() == sample()


def test_penalties_stop_a_greedy_loop(client):
    """A prompt the model would repeat greedily: frequency and presence penalties push it to other tokens."""
    prompt = "red red red red red red red red"

    def words(**penalties) -> list[str]:
        answer = client.completions.create(model="default", prompt=prompt, max_tokens=8, temperature=0, **penalties)
        return answer.choices[0].text.split()

    assert words().count("red") >= 6
    assert words(frequency_penalty=2.0, presence_penalty=2.0).count("red") <= 2


# -- chat completions ------------------------------------------------------------------------------------------
def test_chat_answers_the_question(client):
    answer = client.chat.completions.create(model="default", messages=QUESTION, max_tokens=16, temperature=0)
    message = answer.choices[0].message
    assert answer.object == "chat.completion" and message.role == "assistant"
    assert "Paris" in message.content and message.content == message.content.strip()
    assert "User:" not in message.content  # the plain template's turn marker stops the base model
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens > 0


def test_a_conversation_reuses_its_earlier_turns_from_the_prefix_cache(client, gateway):
    """Each turn resends the history: the engine finds it cached, and `usage` and the metrics say so."""
    system = {"role": "system", "content": "You answer about the solar system. " + "The Sun is a star. " * 40}
    messages = [system, {"role": "user", "content": "Name the largest planet."}]
    first = client.chat.completions.create(model="default", messages=messages, max_tokens=8, temperature=0)
    messages += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And the smallest?"},
    ]
    second = client.chat.completions.create(model="default", messages=messages, max_tokens=8, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens - 16 <= cached < second.usage.prompt_tokens  # whole 16-token blocks
    assert wait_for(lambda: prefix_cache_hits(gateway) >= 1, 15)  # the gateway reads it from the instance's /ping


def prefix_cache_hits(gateway) -> float:
    metrics = httpx.get(gateway.base_url + "/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("servelet_prefix_cache_hits_total{"))


def test_streamed_chat_is_the_same_answer_in_pieces(client):
    whole = client.chat.completions.create(model="default", messages=QUESTION, max_tokens=16, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="default", messages=QUESTION, max_tokens=16, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert same_counts(chunks[-1].usage, whole.usage)


def test_chat_takes_system_prompts_text_parts_and_max_completion_tokens(client):
    messages = [
        {"role": "developer", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "text", "text": "Say something about Paris."}]},
    ]
    answer = client.chat.completions.create(model="default", messages=messages, max_completion_tokens=2, temperature=0)
    assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 2


def test_a_client_that_leaves_a_stream_cancels_its_generation(gateway, client):
    """The stream is closed after its first chunk of 200 greedy tokens (which this prompt does use up)."""
    socket = gateway.log_path.parent / "default-AllTraffic-0.sock"  # the instance behind the endpoint
    body = {"model": "default", "prompt": "Once upon a time", "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(socket)), base_url="http://instance") as instance:
        before = instance.get("/ping").json()["tokens_generated"]
        with gateway.http(timeout=60) as http, http.stream("POST", "/v1/completions", json=body) as response:
            next(response.iter_lines())
        deadline = time.monotonic() + 15  # generous: the test machine's CPUs are shared
        while (ping := instance.get("/ping").json())["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
    assert ping["running"] == 0
    assert ping["tokens_generated"] - before < 100


# -- bad input -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("call", "param", "says"),
    [
        (lambda c: c.completions.create(model="default", prompt=PROMPT, max_tokens=-1), "max_tokens", "greater than"),
        (lambda c: c.chat.completions.create(model="default", messages=[]), "messages", "at least one message"),
        (lambda c: c.completions.create(model="default", prompt=PROMPT, n=2), "n", "only n=1"),
        (lambda c: c.chat.completions.create(model="default", messages=QUESTION, n=3), "n", "only n=1"),
        (lambda c: c.completions.create(model="default", prompt=PROMPT, temperature=3), "temperature", "less than"),
        (lambda c: c.completions.create(model="default", prompt=""), "prompt", "empty"),
        (lambda c: c.completions.create(model="default", prompt=["a", "b"]), "prompt", "one text prompt"),
        (
            lambda c: c.completions.create(model="default", prompt=PROMPT, frequency_penalty=2.5),
            "frequency_penalty", "less than or equal to 2",
        ),
        (
            lambda c: c.chat.completions.create(model="default", messages=[{"role": "tool", "content": "x"}]),
            "messages[0].role", "'user'",
        ),
        (
            lambda c: c.chat.completions.create(
                model="default", messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
            ),
            "messages[0].content", "'image_url'",
        ),
        (
            lambda c: c.chat.completions.create(model="default", messages=QUESTION, tools=[{"type": "function", "function": {"name": "f"}}]),
            "tools", "not supported",
        ),
        (lambda c: c.completions.create(model="default", prompt=PROMPT, stop=["a"] * 5), "stop", "at most 4"),
    ],
)
def test_bad_input_is_refused_naming_the_field(client, call, param, says):
    with pytest.raises(openai.BadRequestError) as refused:
        call(client)
    error = refused.value
    assert error.param == param and error.type == "invalid_request_error"
    assert param in error.message and says in error.message


def test_a_body_that_is_not_json_gets_an_openai_error(gateway):
    with gateway.http(timeout=10) as http:
        answer = http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert answer.status_code == 400
    assert "not valid JSON" in answer.json()["error"]["message"]


def test_an_oversized_body_is_refused(gateway):
    with gateway.http(timeout=30) as http:
        answer = http.post("/v1/completions", json={"model": "default", "prompt": "x" * (7 * 1024 * 1024)})
    assert answer.status_code == 413 and "limit" in answer.json()["error"]["message"]


def test_the_request_and_response_bodies_are_in_the_openapi_spec(gateway):
    with gateway.http(timeout=10) as http:
        spec = http.get("/openapi.json").json()
    chat = spec["paths"]["/v1/chat/completions"]["post"]
    request = chat["requestBody"]["content"]["application/json"]["schema"]
    assert {"model", "messages", "max_tokens", "temperature", "stream"} <= set(request["properties"])
    assert {"CompletionResponse", "ChatCompletionResponse", "ModelList"} <= set(spec["components"]["schemas"])


# -- how OpenAI's sampling maps onto the engine's parameters (no server needed) -------------------------------
def test_openai_defaults_sample_at_temperature_one():
    params = CompletionRequest(model="m", prompt="p").parameters(16, stop=[])
    assert params == {"stop": [], "max_new_tokens": 16, "do_sample": True, "temperature": 1.0}


def test_temperature_zero_is_greedy_and_seeds_fold_into_32_bits():
    assert CompletionRequest(model="m", prompt="p", temperature=0, seed=1).parameters(None, [])["do_sample"] is False
    sampled = ChatCompletionRequest(model="m", messages=QUESTION, temperature=0.5, top_p=0.9, seed=-1, stop="x")
    assert sampled.parameters(4, stop=["\nUser:"]) == {
        "stop": ["x", "\nUser:"], "max_new_tokens": 4, "do_sample": True, "temperature": 0.5, "top_p": 0.9,
        "seed": 2**32 - 1,
    }
