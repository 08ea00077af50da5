"""A handler model runs as many requests at once as it has workers (one by default, as the SageMaker toolkit's
worker), queues a bounded number more, and refuses the rest with 429 and Retry-After; boto3 sees ThrottlingException.

predict_fn used to run on a thread pool with no bound: every request at once.
"""

from __future__ import annotations

import json
import textwrap
from concurrent.futures import ThreadPoolExecutor

import botocore.exceptions
import pytest
from conftest import boto, start_gateway, stop_process, wait_for

# predict_fn holds each request until the test opens its endpoint's gate (a file), then answers the most requests it
# ever saw running at once: the requests admitted stay in the model, however slowly the burst's arrive.
BUSY = '''
import os, threading, time

lock = threading.Lock()
running = peak = 0

def model_fn(model_dir):
    return None

def predict_fn(data, model):
    global running, peak
    with lock:
        running += 1
        peak = max(peak, running)
    deadline = time.monotonic() + 60
    while not os.path.exists(os.environ["BUSY_GATE"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    with lock:
        running -= 1
        return {"peak": peak}
'''
ENDPOINTS = {
    "one-worker": {"SERVELET_MAX_WAITING": "2"},  # 1 running + 2 waiting of 6 sent
    "two-workers": {"SERVELET_HANDLER_WORKERS": "2", "SERVELET_MAX_WAITING": "0"},  # 2 running of 4 sent
}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    root = tmp_path_factory.mktemp("workers")
    (root / "busy" / "code").mkdir(parents=True)
    (root / "busy" / "code" / "inference.py").write_text(textwrap.dedent(BUSY))
    running = start_gateway(root / "gateway", env={"SERVELET_INSTANCES": "0"}, ready=None)
    sagemaker = boto("sagemaker", running.base_url)
    for name, environment in ENDPOINTS.items():
        environment = environment | {"BUSY_GATE": str(root / f"gate-{name}")}
        sagemaker.create_model(ModelName=name, PrimaryContainer={"ModelDataUrl": str(root / "busy"), "Environment": environment})
        sagemaker.create_endpoint_config(
            EndpointConfigName=name, ProductionVariants=[{"VariantName": "AllTraffic", "ModelName": name}]
        )
        sagemaker.create_endpoint(EndpointName=name, EndpointConfigName=name)
    for name in ENDPOINTS:
        sagemaker.get_waiter("endpoint_in_service").wait(EndpointName=name, WaiterConfig={"Delay": 1, "MaxAttempts": 120})
    running.root = root
    yield running
    stop_process(running.process)


def burst(gateway, endpoint: str, requests: int, admitted: int) -> list:
    """`requests` invocations at once: each one's answer, or its ClientError. The model holds the admitted ones
    until all the others have been answered, then the endpoint's gate opens."""
    runtime = boto("sagemaker-runtime", gateway.base_url, retries={"max_attempts": 1}, max_pool_connections=requests)

    def invoke(_):
        try:
            answer = runtime.invoke_endpoint(EndpointName=endpoint, Body=b"[1]", ContentType="application/json")
            return json.loads(answer["Body"].read())
        except botocore.exceptions.ClientError as error:
            return error

    with ThreadPoolExecutor(requests) as pool:
        calls = [pool.submit(invoke, n) for n in range(requests)]
        wait_for(lambda: sum(call.done() for call in calls) >= requests - admitted, 60)
        (gateway.root / f"gate-{endpoint}").touch()
        return [call.result() for call in calls]


@pytest.mark.parametrize(("endpoint", "sent", "admitted", "workers"), [("one-worker", 6, 3, 1), ("two-workers", 4, 2, 2)])
def test_requests_past_the_workers_and_queue_get_429_with_retry_after(gateway, endpoint, sent, admitted, workers):
    outcomes = burst(gateway, endpoint, sent, admitted)
    answers = [o for o in outcomes if isinstance(o, dict)]
    refused = [o for o in outcomes if isinstance(o, botocore.exceptions.ClientError)]
    assert len(answers) == admitted and len(refused) == sent - admitted, outcomes
    assert max(a["peak"] for a in answers) == workers  # never more at once than the workers
    for error in refused:
        assert error.response["Error"]["Code"] == "ThrottlingException"
        assert error.response["ResponseMetadata"]["HTTPStatusCode"] == 429
        assert error.response["ResponseMetadata"]["HTTPHeaders"]["retry-after"] == "1"
        assert "SERVELET_HANDLER_WORKERS" in error.response["Error"]["Message"]
