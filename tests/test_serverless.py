"""Serverless endpoints through boto3 and the openai client: scale to zero after the idle timeout and start again on
the next request, a provisioned floor, MaxConcurrency refusals, and a start past its bound."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from botocore.exceptions import ClientError
from conftest import boto, start_gateway, stop_process, wait_for
from websockets.sync.client import connect

from servelet.settings import DEFAULT_MODEL_URI

IDLE_SECONDS = 3
SHORT = json.dumps({"inputs": "The capital of France is", "parameters": {"max_new_tokens": 2}})
LONG = json.dumps({"inputs": "Tell me a long story about a dragon.", "parameters": {"max_new_tokens": 200}})
WAIT = {"Delay": 1, "MaxAttempts": 180}


def serverless_gateway(tmp_path_factory, name: str, **env: str):
    """A gateway with no `default` endpoint (the serverless ones get the cores) and a short idle timeout."""
    return start_gateway(
        tmp_path_factory.mktemp(name),
        env={"SERVELET_INSTANCES": "0", "SERVELET_SERVERLESS_IDLE_SECONDS": str(IDLE_SECONDS)} | env,
        ready=None,
    )


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, model_path):
    running = serverless_gateway(tmp_path_factory, "serverless")
    yield running
    stop_process(running.process)


def create_serverless(gateway, name: str, environment: dict[str, str] | None = None, **serverless) -> str:
    """A serverless endpoint `name` (its model and config of the same name), InService."""
    sagemaker = boto("sagemaker", gateway.base_url)
    container = {"ModelDataUrl": DEFAULT_MODEL_URI, "Environment": environment or {}}
    sagemaker.create_model(ModelName=name, PrimaryContainer=container)
    sagemaker.create_endpoint_config(EndpointConfigName=name, ProductionVariants=[{
        "VariantName": "AllTraffic", "ModelName": name,
        "ServerlessConfig": {"MemorySizeInMB": 2048, "MaxConcurrency": 5} | serverless,
    }])
    sagemaker.create_endpoint(EndpointName=name, EndpointConfigName=name)
    sagemaker.get_waiter("endpoint_in_service").wait(EndpointName=name, WaiterConfig=WAIT)
    return name


def instances(gateway, endpoint: str) -> tuple[int, int]:
    """(instances, ready instances) of the endpoint's variant, as /health shows them."""
    variant = gateway.http(timeout=10).get("/health").json()["endpoints"][endpoint]["variants"]["AllTraffic"]
    return variant["instances"], variant["ready"]


def all_instances(gateway) -> int:
    """Instances of every endpoint on the gateway."""
    endpoints = gateway.http(timeout=10).get("/health").json()["endpoints"].values()
    return sum(v["instances"] for e in endpoints for v in e["variants"].values())


def runtime(gateway):
    # No retries: a refusal must be seen as it is, not retried away.
    return boto("sagemaker-runtime", gateway.base_url, retries={"total_max_attempts": 1}, read_timeout=120)


def invoke(gateway, endpoint: str, body: str = SHORT) -> str:
    answer = runtime(gateway).invoke_endpoint(EndpointName=endpoint, Body=body, ContentType="application/json")
    return json.loads(answer["Body"].read())["generated_text"]


@pytest.fixture(scope="module")
def quiet(gateway):
    """Serverless with no provisioned concurrency."""
    return create_serverless(gateway, "quiet")


@pytest.fixture(scope="module")
def single(gateway):
    """One request at a time, one instance kept warm."""
    return create_serverless(gateway, "single", MaxConcurrency=1, ProvisionedConcurrency=1)


def test_an_idle_variant_scales_to_zero_and_the_next_request_starts_it(gateway, quiet, single):
    assert invoke(gateway, quiet)
    assert wait_for(lambda: instances(gateway, quiet) == (0, 0), 20 * IDLE_SECONDS), instances(gateway, quiet)
    # The same idle timeout passed for `single`: its ProvisionedConcurrency keeps its instance.
    assert instances(gateway, single) == (1, 1)

    assert invoke(gateway, quiet)  # held while an instance starts, then served by it
    assert instances(gateway, quiet) == (1, 1)
    assert "starting one for a request" in gateway.log()


def test_requests_over_max_concurrency_are_refused_while_the_first_completes(gateway, single):
    client = runtime(gateway)
    first = client.invoke_endpoint_with_response_stream(EndpointName=single, Body=LONG, ContentType="application/json")
    events = iter(first["Body"])
    assert "PayloadPart" in next(events)  # the first request is in flight now

    with pytest.raises(ClientError) as refused:
        client.invoke_endpoint(EndpointName=single, Body=SHORT, ContentType="application/json")
    assert refused.value.response["Error"]["Code"] == "ThrottlingException"
    assert "MaxConcurrency of 1" in refused.value.response["Error"]["Message"]

    openai_client = openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.RateLimitError) as limited:
        openai_client.completions.create(model=single, prompt="Hello", max_tokens=2)
    assert limited.value.status_code == 429

    raw = gateway.http(timeout=30).post(f"/endpoints/{single}/invocations", content=SHORT,
                                        headers={"content-type": "application/json"})
    assert raw.status_code == 429 and raw.headers["retry-after"] == "1"

    with connect(f"ws://127.0.0.1:{gateway.port}/ws") as ws:
        assert json.loads(ws.recv(timeout=30))["type"] == "welcome"
        ws.send(json.dumps({"id": "second", "endpoint": single, "inputs": "Hello", "parameters": {"max_new_tokens": 2}}))
        frame = json.loads(ws.recv(timeout=30))
    assert (frame["type"], frame["id"], frame["code"]) == ("error", "second", 429), frame

    rest = b"".join(event["PayloadPart"]["Bytes"] for event in events if "PayloadPart" in event)
    assert rest  # the first request was answered in full
    assert invoke(gateway, single)  # and the slot is free again


@pytest.fixture(scope="module")
def impatient(tmp_path_factory, model_path):
    """A gateway whose requests wait for no start at all (a second gateway: the bound is the gateway's setting);
    its serverless variants with ProvisionedConcurrency never make a request wait for a start. Its starts are cold:
    a snapshot start would be over before the test's second request could see it going on."""
    running = serverless_gateway(
        tmp_path_factory, "impatient", SERVELET_SERVERLESS_START_TIMEOUT="0.001", SERVELET_SNAPSHOTS="false"
    )
    yield running
    stop_process(running.process)


def test_a_start_past_its_bound_answers_model_not_ready(impatient):
    endpoint = create_serverless(impatient, "sleepy")
    assert wait_for(lambda: instances(impatient, endpoint) == (0, 0), 20 * IDLE_SECONDS)

    client = runtime(impatient)
    with pytest.raises(client.exceptions.ModelNotReadyException) as not_ready:
        client.invoke_endpoint(EndpointName=endpoint, Body=SHORT, ContentType="application/json")
    assert "SERVELET_SERVERLESS_START_TIMEOUT" in str(not_ready.value)
    # While that start goes on, the OpenAI API says so too, with a 429.
    answer = httpx.post(f"{impatient.base_url}/v1/completions", json={"model": endpoint, "prompt": "Hi", "max_tokens": 2},
                        timeout=30)
    assert answer.status_code == 429 and "is starting an instance" in answer.json()["error"]["message"]
    assert answer.headers["retry-after"] == "5"

    # The instance the first request started goes on starting, and serves the requests after it.
    assert wait_for(lambda: instances(impatient, endpoint)[1] == 1, 120)
    assert invoke(impatient, endpoint)


def test_a_variant_scales_out_when_its_instances_have_full_batches_and_back_in_when_idle(impatient):
    """With batches of one request, a second request in flight needs a second instance."""
    endpoint = create_serverless(impatient, "busy", {"SERVELET_MAX_BATCH_SIZE": "1"}, MaxConcurrency=2,
                                 ProvisionedConcurrency=1)
    assert wait_for(lambda: all_instances(impatient) == 1, 20 * IDLE_SECONDS)  # the cores are free for one more

    client = runtime(impatient)
    long = json.dumps({"inputs": "Tell me a long story about a dragon.", "parameters": {"max_new_tokens": 400}})
    first = client.invoke_endpoint_with_response_stream(EndpointName=endpoint, Body=long, ContentType="application/json")
    events = iter(first["Body"])
    assert "PayloadPart" in next(events)
    assert wait_for(lambda: instances(impatient, endpoint)[0] == 2, 30), instances(impatient, endpoint)
    assert b"".join(event["PayloadPart"]["Bytes"] for event in events if "PayloadPart" in event)
    assert "full batch in flight" in impatient.log()

    assert wait_for(lambda: instances(impatient, endpoint) == (1, 1), 20 * IDLE_SECONDS), instances(impatient, endpoint)
