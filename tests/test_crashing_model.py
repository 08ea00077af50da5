"""A model that crashes fails its endpoint loudly, saying why, while the other endpoints keep serving; one that
crashes after it served is replaced and keeps its endpoint in service."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from botocore.exceptions import ClientError
from conftest import Load, boto, start_gateway, stop_process, wait_for
from test_handler_runtime import deploy, handler_folder, wait_in_service

from servelet.control.endpoints import CRASHES_BEFORE_FAILING
from servelet.engine.errors import REBUILD_WITHOUT_AMX

STEADY = '''
import json

def model_fn(model_dir):
    return None

def transform_fn(model, body, content_type, accept):
    return json.dumps({"echo": json.loads(body)}), "application/json"
'''

# What a llama.cpp build made for another CPU does at its first decode, here at load.
SEGFAULTS_AT_LOAD = '''
import os, signal

def model_fn(model_dir):
    os.kill(os.getpid(), signal.SIGSEGV)
'''

# Answers once, then dies by a signal on its second request: a crash after serving, which is no broken build.
SEGFAULTS_ON_SECOND_REQUEST = '''
import json, os, signal

answered = 0

def model_fn(model_dir):
    return None

def transform_fn(model, body, content_type, accept):
    global answered
    if answered:
        os.kill(os.getpid(), signal.SIGSEGV)
    answered += 1
    return json.dumps({"answered": answered}), "application/json"
'''

# Loads, then dies on every request: ready, but it never serves (a llama.cpp build crashing at its first decode).
SEGFAULTS_ON_EVERY_REQUEST = '''
import os, signal

def model_fn(model_dir):
    return None

def transform_fn(model, body, content_type, accept):
    os.kill(os.getpid(), signal.SIGSEGV)
'''

EXITS_AT_LOAD = '''
def model_fn(model_dir):
    raise RuntimeError("no weights in this folder")
'''

# Loads once the test creates the file RELEASE names (bounded): an instance that is not ready for as long as the test
# needs, as one that loads a large model or replaces one that died.
LOADS_WHEN_RELEASED = '''
import json, os, time

RELEASE = RELEASE_PATH

def model_fn(model_dir):
    deadline = time.monotonic() + 120
    while not os.path.exists(RELEASE) and time.monotonic() < deadline:
        time.sleep(0.1)
    return None

def transform_fn(model, body, content_type, accept):
    return json.dumps({"loaded": True}), "application/json"
'''

FAIL_WITHIN_S = 120  # three crashes with their restart backoffs (1 s, then 2 s) take some 15 s here


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("handlers")
    release = repr(str(root / "released"))
    for name, script in (("steady", STEADY), ("segfaults", SEGFAULTS_AT_LOAD),
                         ("segfaults-later", SEGFAULTS_ON_SECOND_REQUEST),
                         ("segfaults-always", SEGFAULTS_ON_EVERY_REQUEST), ("exits", EXITS_AT_LOAD),
                         ("loads-when-released", LOADS_WHEN_RELEASED.replace("RELEASE_PATH", release))):
        handler_folder(root, name, script)
    return root


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, models):
    running = start_gateway(tmp_path_factory.mktemp("gateway"), args=["--instances", "0"], ready=None)
    sagemaker = boto("sagemaker", running.base_url)
    deploy(sagemaker, "steady", str(models / "steady"))
    wait_in_service(sagemaker, "steady")
    yield running
    stop_process(running.process)


@pytest.fixture(scope="module")
def sagemaker(gateway):
    return boto("sagemaker", gateway.base_url)


def runtime(gateway):
    return boto("sagemaker-runtime", gateway.base_url, retries={"max_attempts": 1})


def echo(client, endpoint: str = "steady", body=None) -> dict:
    answer = client.invoke_endpoint(EndpointName=endpoint, Body=json.dumps(body or [1]), ContentType="application/json")
    return json.loads(answer["Body"].read())


def settled(sagemaker, name: str) -> dict:
    """DescribeEndpoint once the endpoint is no longer Creating (bounded)."""
    described = {}

    def done() -> bool:
        described.update(sagemaker.describe_endpoint(EndpointName=name))
        return described["EndpointStatus"] != "Creating"

    assert wait_for(done, FAIL_WITHIN_S, poll=0.5), f"{name} still Creating after {FAIL_WITHIN_S} s"
    return described


def test_a_model_that_segfaults_before_serving_fails_its_endpoint_saying_why(gateway, sagemaker, models):
    client = runtime(gateway)
    with Load(lambda: echo(client), threads=1, seconds=FAIL_WITHIN_S) as load:
        deploy(sagemaker, "segfaults", str(models / "segfaults"))
        described = settled(sagemaker, "segfaults")
    assert described["EndpointStatus"] == "Failed"
    reason = described["FailureReason"]
    assert "SIGSEGV" in reason and f"{CRASHES_BEFORE_FAILING} times in a row" in reason, reason
    assert REBUILD_WITHOUT_AMX in reason
    # The other endpoint answered all along, and still does.
    assert load.served and not load.failures, load.failures[:3]
    assert echo(client, body=[2]) == {"echo": [2]}
    with gateway.http(timeout=10) as http:
        health = http.get("/health").json()
    assert health["endpoints"]["segfaults"] == {
        "ready": False, "variants": {}, "status": "Failed", "failure_reason": reason,
    }
    assert health["endpoints"]["steady"]["ready"] and health["endpoints"]["steady"]["status"] == "InService"
    errors = [line for line in gateway.log().splitlines() if " ERROR " in line]
    assert len([line for line in errors if "segfaults/AllTraffic" in line]) == 1, errors  # the endpoint's failure
    crashes = [line for line in gateway.log().splitlines() if " WARNING " in line and "killed by SIGSEGV" in line]
    assert len(crashes) >= CRASHES_BEFORE_FAILING - 1, crashes


def test_a_model_that_segfaults_after_serving_is_replaced_and_stays_in_service(gateway, sagemaker, models):
    deploy(sagemaker, "segfaults-later", str(models / "segfaults-later"))
    wait_in_service(sagemaker, "segfaults-later")
    client = runtime(gateway)
    assert echo(client, "segfaults-later") == {"answered": 1}
    with pytest.raises(ClientError) as crashed:  # its process dies while answering
        echo(client, "segfaults-later")
    assert crashed.value.response["Error"]["Code"] == "ModelError"

    def answers_again() -> bool:
        try:
            return echo(client, "segfaults-later") == {"answered": 1}  # a new process
        except ClientError:
            return False

    assert wait_for(answers_again, 60, poll=0.5), gateway.log()[-3000:]
    described = sagemaker.describe_endpoint(EndpointName="segfaults-later")
    assert described["EndpointStatus"] == "InService" and "FailureReason" not in described
    replaced = [line for line in gateway.log().splitlines()
                if " WARNING " in line and "killed by SIGSEGV" in line and "after serving requests" in line]
    assert len(replaced) == 1, replaced


def test_a_model_that_is_ready_but_segfaults_on_every_request_fails_its_endpoint(gateway, sagemaker, models):
    deploy(sagemaker, "segfaults-always", str(models / "segfaults-always"))
    wait_in_service(sagemaker, "segfaults-always")
    client = runtime(gateway)

    def failed() -> bool:
        try:
            echo(client, "segfaults-always")  # kills it; while its replacement starts: 503
        except ClientError:
            pass
        return sagemaker.describe_endpoint(EndpointName="segfaults-always")["EndpointStatus"] == "Failed"

    assert wait_for(failed, FAIL_WITHIN_S, poll=0.5), gateway.log()[-3000:]
    reason = sagemaker.describe_endpoint(EndpointName="segfaults-always")["FailureReason"]
    assert reason.startswith("instance segfaults-always/AllTraffic/0 was killed by SIGSEGV (Segmentation fault), ")
    assert f"{CRASHES_BEFORE_FAILING} times in a row without serving a request" in reason
    assert REBUILD_WITHOUT_AMX in reason
    with pytest.raises(ClientError) as gone:  # a failed endpoint runs nothing
        echo(client, "segfaults-always")
    assert "segfaults-always" in gone.value.response["Error"]["Message"], gone.value.response


def test_a_model_that_exits_while_loading_fails_at_once_with_its_exit_status(gateway, sagemaker, models):
    started = time.monotonic()
    deploy(sagemaker, "exits", str(models / "exits"))
    described = settled(sagemaker, "exits")
    assert described["EndpointStatus"] == "Failed"
    reason = described["FailureReason"]
    assert "exited with exit status 1 while loading its model" in reason, reason
    assert "no weights in this folder" in reason  # the model's own error, from the instance's log
    assert time.monotonic() - started < 30  # no restarts: an error the model reports is no crash to retry


def test_an_endpoint_whose_instance_is_not_ready_yet_answers_503_with_retry_after(gateway, sagemaker, models):
    deploy(sagemaker, "loads-when-released", str(models / "loads-when-released"))
    with gateway.http(timeout=30) as http:
        for path, body in (("/endpoints/loads-when-released/invocations", [1]),
                           ("/v1/completions", {"model": "loads-when-released", "prompt": "Hello"})):
            answer = http.post(path, json=body)
            assert answer.status_code == 503, answer.text
            assert answer.headers["Retry-After"] == "1"  # backpressure to wait out, as the client retries
            assert "has no ready instance yet" in answer.text
    (models / "released").touch()
    wait_in_service(sagemaker, "loads-when-released")
    assert echo(runtime(gateway), "loads-when-released") == {"loaded": True}
