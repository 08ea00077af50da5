"""A client that leaves stops its generation, on every route family: the instance's slot is free again within about
a second (read from the instance's own /ping), and the cancellation is counted. The same holds on the other runtimes
where the work can stop: a transformers generation stops at its next token, and a handler (inference.py) request
whose client leaves while it waits for the worker never runs; each is counted where it stops, in its instance."""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor

import botocore.exceptions
import httpx
import pytest
from conftest import boto, wait_for
from prometheus_client.parser import text_string_to_metric_families
from test_handler_runtime import SLOW, deploy, handler_folder, wait_in_service
from test_transformers_runtime import byte_level_tokenizer
from websockets.asyncio.client import connect

PROMPT = "Once upon a time"
LONG = {"max_new_tokens": 2000, "ignore_eos": True}  # minutes of work if nothing stops it
# Measured: 25-150 ms for streams, ~0.5 s for whole answers (two 0.25 s disconnect polls: the gateway's, the
# instance's); up to ~3 s when the 2 shared cores run other tests and benchmarks beside this one.
FREED_WITHIN_S = 4.0


# The tiny model below makes 4,000 tokens in about 14 s on a 2-core machine: still generating when the client leaves.
WRITER_LONG = {"max_new_tokens": 4000, "ignore_eos": True}


def instance_of(gateway, endpoint: str) -> httpx.Client:
    """The instance behind `endpoint`, on its own socket: its /ping shows running sequences without the gateway's
    one-second health poll in between."""
    socket = gateway.log_path.parent / f"{endpoint}-AllTraffic-0.sock"
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(socket)), base_url="http://instance", timeout=10)


@pytest.fixture(scope="module")
def instance(gateway):
    with instance_of(gateway, "default") as client:
        yield client


def tiny_gpt2(folder):
    """A GPT-2 with random weights and a long enough context, built here (no hub download)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    tokenizer = byte_level_tokenizer()
    eos = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=2, n_positions=4200, bos_token_id=eos, eos_token_id=eos
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def other_runtimes(gateway, tmp_path_factory) -> dict[str, httpx.Client]:
    """Beside `default`: `writer` (the tiny GPT-2 on the transformers runtime) and `slow` (an inference.py that sleeps
    as long as asked, one request at a time), deployed through boto3; each endpoint's instance."""
    root = tmp_path_factory.mktemp("models")
    sagemaker = boto("sagemaker", gateway.base_url)
    deploy(sagemaker, "writer", str(tiny_gpt2(root / "writer")))
    deploy(sagemaker, "slow", str(handler_folder(root, "slow", SLOW)))
    wait_in_service(sagemaker, "writer", "slow")
    clients = {name: instance_of(gateway, name) for name in ("writer", "slow")}
    yield clients
    for client in clients.values():
        client.close()


def ping(instance) -> dict:
    return instance.get("/ping").json()


def freed_after_leaving(instance, leave) -> tuple[float, dict]:
    """Run `leave` (which starts a long generation and disconnects); the seconds from its return until the
    instance runs nothing, and the instance's /ping then."""
    assert wait_for(lambda: ping(instance)["running"] == 0, 30), "a previous generation is still running"
    leave()
    left = time.monotonic()
    assert wait_for(lambda: ping(instance)["running"] == 0, 30, poll=0.02), "the generation went on after the client left"
    return time.monotonic() - left, ping(instance)


def sagemaker_stream(gateway, instance, endpoint="default", parameters=LONG):
    client = boto("sagemaker-runtime", gateway.base_url)
    body = json.dumps({"inputs": PROMPT, "parameters": parameters})
    events = client.invoke_endpoint_with_response_stream(EndpointName=endpoint, Body=body)["Body"]
    next(iter(events))
    events.close()


def sagemaker_invoke(gateway, instance, endpoint="default", parameters=LONG):
    """boto3 gives up reading after its read timeout, as a user's client would."""
    client = boto("sagemaker-runtime", gateway.base_url, read_timeout=2, retries={"total_max_attempts": 1})
    with pytest.raises(botocore.exceptions.ReadTimeoutError):
        client.invoke_endpoint(EndpointName=endpoint, Body=json.dumps({"inputs": PROMPT, "parameters": parameters}))


def tgi_stream(gateway, instance):
    with gateway.http(timeout=60) as http, http.stream("POST", "/generate_stream", json={"inputs": PROMPT, "parameters": LONG}) as response:
        next(line for line in response.iter_lines() if line.startswith("data:"))  # dropping the lines closes it


def tgi_generate(gateway, instance):
    with gateway.http(timeout=2) as http, pytest.raises(httpx.ReadTimeout):
        http.post("/generate", json={"inputs": PROMPT, "parameters": LONG})


def openai_chat_stream(gateway, instance):
    body = {"model": "default", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 2000, "stream": True}
    with gateway.http(timeout=60) as http, http.stream("POST", "/v1/chat/completions", json=body) as response:
        next(line for line in response.iter_lines() if line.startswith("data:"))  # dropping the lines closes it


def websocket(gateway, instance):
    async def leave():
        async with connect(f"ws://127.0.0.1:{gateway.port}/ws") as ws:
            await ws.recv()  # welcome
            await ws.send(json.dumps({"id": "long", "inputs": PROMPT, "parameters": LONG}))
            while json.loads(await ws.recv())["type"] != "token":
                pass

    asyncio.run(leave())


@pytest.mark.parametrize(
    "leave", [sagemaker_stream, sagemaker_invoke, tgi_stream, tgi_generate, openai_chat_stream, websocket],
)
def test_a_client_that_leaves_frees_its_slot_within_a_second_or_so(gateway, instance, leave):
    before = ping(instance)
    seconds, after = freed_after_leaving(instance, lambda: leave(gateway, instance))
    assert seconds < FREED_WITHIN_S, f"the slot was freed {seconds:.2f} s after the client left"
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["tokens_generated"] - before["tokens_generated"] < 500


@pytest.mark.parametrize("leave", [sagemaker_stream, sagemaker_invoke])
def test_a_transformers_generation_stops_when_its_client_leaves_and_is_counted(gateway, other_runtimes, leave):
    writer = other_runtimes["writer"]
    before = ping(writer)
    seconds, after = freed_after_leaving(writer, lambda: leave(gateway, writer, "writer", WRITER_LONG))
    assert seconds < FREED_WITHIN_S, f"the generation stopped {seconds:.2f} s after the client left"
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["tokens_generated"] - before["tokens_generated"] < 3000


def test_a_handler_request_whose_client_leaves_while_it_waits_never_runs_and_is_counted(gateway, other_runtimes):
    """The handler runs one request at a time (SERVELET_HANDLER_WORKERS=1): the second waits, and its client leaves."""
    slow = other_runtimes["slow"]
    before = ping(slow)
    patient = boto("sagemaker-runtime", gateway.base_url, retries={"total_max_attempts": 1})
    leaving = boto("sagemaker-runtime", gateway.base_url, read_timeout=1, retries={"total_max_attempts": 1})
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(patient.invoke_endpoint, EndpointName="slow", Body=json.dumps({"sleep": 5}))
        assert wait_for(lambda: ping(slow)["running"] == 1, 10)
        with pytest.raises(botocore.exceptions.ReadTimeoutError):
            leaving.invoke_endpoint(EndpointName="slow", Body=json.dumps({"sleep": 5}))
        assert wait_for(lambda: ping(slow)["waiting"] == 0, FREED_WITHIN_S, poll=0.02), ping(slow)
        now = ping(slow)
        assert now["running"] == 1 and now["cancelled"] == before["cancelled"] + 1, now  # dropped while the first runs
        assert json.loads(first.result()["Body"].read()) == {"slept": 5}
    # A request already running when its client leaves is not stopped (a thread cannot be), nor counted.
    assert wait_for(lambda: ping(slow)["running"] == 0, 10)
    assert ping(slow)["cancelled"] == before["cancelled"] + 1


def test_cancellations_are_a_metric(gateway, instance, other_runtimes):
    instances = {"default": instance} | other_runtimes
    cancelled = {name: ping(client)["cancelled"] for name, client in instances.items()}

    def counted() -> dict[str, float]:
        body = httpx.get(f"{gateway.base_url}/metrics", timeout=10).text
        samples = [
            sample
            for family in text_string_to_metric_families(body)
            for sample in family.samples
            if sample.name == "servelet_cancelled_requests_total"
        ]
        return {name: sum(s.value for s in samples if s.labels.get("endpoint") == name) for name in cancelled}

    assert wait_for(lambda: counted() == cancelled, 5), f"{counted()} counted, the instances say {cancelled}"
