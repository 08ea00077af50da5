"""Async inference through boto3's `invoke_endpoint_async`, a real gateway, the real default model, moto's S3 and a
webhook server on 127.0.0.1: answers land at their OutputLocation, failures at their FailureLocation, webhooks are
told, and a gateway killed mid-way loses no accepted job and writes no output twice."""

from __future__ import annotations

import hashlib
import json
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from botocore.exceptions import ClientError
from conftest import boto, free_port, start_gateway, stop_process, wait_for

from servelet.settings import DEFAULT_MODEL_URI

WAIT = {"Delay": 1, "MaxAttempts": 180}
PROMPT = {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 2}}


class Webhook:
    """An HTTP server that keeps every JSON body posted to it, by path."""

    def __init__(self):
        self.received: list[tuple[str, dict]] = []
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                length = int(self.headers.get("content-length", 0))
                received.append((self.path, json.loads(self.rfile.read(length))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *_):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def about(self, inference_id: str) -> list[tuple[str, dict]]:
        return [(path, body) for path, body in self.received if body.get("inferenceId") == inference_id]


@pytest.fixture(scope="module")
def webhook():
    hook = Webhook()
    yield hook
    hook.server.shutdown()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, model_path, s3_server):
    env = s3_server.env | {"SERVELET_INSTANCES": "0", "SERVELET_THREADS": "2", "SERVELET_AUTOSCALE_INTERVAL": "0.5"}
    running = start_gateway(tmp_path_factory.mktemp("async"), env=env, ready=None)
    yield running
    stop_process(running.process)


def create_async_endpoint(gateway, name: str, output: str, failure: str | None = None, webhook: Webhook | None = None,
                          per_instance: int = 4, kms_key_id: str | None = None) -> str:
    sagemaker = boto("sagemaker", gateway.base_url)
    sagemaker.create_model(ModelName=name, PrimaryContainer={"ModelDataUrl": DEFAULT_MODEL_URI})
    output_config = {"S3OutputPath": output} | ({"S3FailurePath": failure} if failure else {})
    output_config |= {"KmsKeyId": kms_key_id} if kms_key_id else {}
    if webhook is not None:
        output_config["NotificationConfig"] = {"SuccessTopic": f"{webhook.url}/success", "ErrorTopic": f"{webhook.url}/error"}
    sagemaker.create_endpoint_config(
        EndpointConfigName=name,
        ProductionVariants=[{"VariantName": "AllTraffic", "ModelName": name, "InitialInstanceCount": 1}],
        AsyncInferenceConfig={"OutputConfig": output_config,
                              "ClientConfig": {"MaxConcurrentInvocationsPerInstance": per_instance}},
    )
    sagemaker.create_endpoint(EndpointName=name, EndpointConfigName=name)
    sagemaker.get_waiter("endpoint_in_service").wait(EndpointName=name, WaiterConfig=WAIT)
    return name


def runtime(gateway):
    return boto("sagemaker-runtime", gateway.base_url, retries={"total_max_attempts": 1})


def s3_text(s3_server, uri: str) -> str | None:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    try:
        return s3_server.client().get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    except ClientError:
        return None


@pytest.fixture(scope="module")
def bucket(s3_server):
    return s3_server.new_bucket()


@pytest.fixture(scope="module")
def answering(gateway, bucket, webhook):
    return create_async_endpoint(gateway, "answering", f"s3://{bucket}/out", f"s3://{bucket}/failed", webhook,
                                 kms_key_id=KMS_KEY)


KMS_KEY = "arn:aws:kms:us-east-1:123456789012:key/servelet-tests"


def encryption(s3_server, uri: str) -> tuple[str | None, str | None]:
    bucket, key = uri.removeprefix("s3://").split("/", 1)
    head = s3_server.client().head_object(Bucket=bucket, Key=key)
    return head.get("ServerSideEncryption"), head.get("SSEKMSKeyId")


def test_an_async_invocation_lands_at_its_output_location_and_tells_the_webhook(gateway, s3_server, bucket, webhook, answering):
    s3_server.client().put_object(Bucket=bucket, Key="in/one.json", Body=json.dumps(PROMPT).encode())
    accepted = runtime(gateway).invoke_endpoint_async(
        EndpointName=answering, InputLocation=f"s3://{bucket}/in/one.json", ContentType="application/json",
    )
    inference_id, output = accepted["InferenceId"], accepted["OutputLocation"]
    assert output == f"s3://{bucket}/out/{inference_id}.out"
    assert accepted["FailureLocation"] == f"s3://{bucket}/failed/{inference_id}-error.out"
    assert wait_for(lambda: s3_text(s3_server, output) is not None, 120)
    assert json.loads(s3_text(s3_server, output))["generated_text"]

    assert wait_for(lambda: webhook.about(inference_id), 30)
    path, told = webhook.about(inference_id)[0]
    assert path == "/success" and told["invocationStatus"] == "Completed"
    assert told["responseParameters"]["outputLocation"] == output
    status = gateway.http(timeout=10).get(f"/async-invocations/{inference_id}").json()
    assert status["Status"] == "Completed" and status["OutputLocation"] == output


def test_a_body_sent_with_the_request_is_the_input(gateway, s3_server, answering):
    accepted = runtime(gateway).invoke_endpoint_async(
        EndpointName=answering, Body=json.dumps(PROMPT).encode(), ContentType="application/json", InferenceId="inline-1",
    )
    assert accepted["InferenceId"] == "inline-1"
    assert wait_for(lambda: s3_text(s3_server, accepted["OutputLocation"]) is not None, 120)
    # The endpoint's KmsKeyId: S3 encrypts the output with it (SSE-KMS), as SageMaker asks S3 to.
    assert encryption(s3_server, accepted["OutputLocation"]) == ("aws:kms", KMS_KEY)
    # The same InferenceId again is the same job, not a second one.
    again = runtime(gateway).invoke_endpoint_async(
        EndpointName=answering, Body=json.dumps(PROMPT).encode(), ContentType="application/json", InferenceId="inline-1",
    )
    assert again["OutputLocation"] == accepted["OutputLocation"]


def test_a_failing_input_lands_at_its_failure_location_and_tells_the_error_webhook(gateway, s3_server, bucket, webhook, answering):
    s3_server.client().put_object(Bucket=bucket, Key="in/empty.json", Body=b'{"inputs": ""}')
    accepted = runtime(gateway).invoke_endpoint_async(EndpointName=answering, InputLocation=f"s3://{bucket}/in/empty.json")
    failure = accepted["FailureLocation"]
    assert wait_for(lambda: s3_text(s3_server, failure) is not None, 120)
    assert "empty" in json.loads(s3_text(s3_server, failure))["ErrorMessage"]
    assert encryption(s3_server, failure) == ("aws:kms", KMS_KEY)
    assert s3_text(s3_server, accepted["OutputLocation"]) is None

    assert wait_for(lambda: webhook.about(accepted["InferenceId"]), 30)
    path, told = webhook.about(accepted["InferenceId"])[0]
    assert path == "/error" and told["invocationStatus"] == "Failed" and "empty" in told["failureReason"]

    # An input that is not there is refused at once, rather than accepted to fail.
    with pytest.raises(ClientError) as missing:
        runtime(gateway).invoke_endpoint_async(EndpointName=answering, InputLocation=f"s3://{bucket}/in/nothing.json")
    assert "no object there" in missing.value.response["Error"]["Message"]


def test_bad_requests_are_refused_naming_what_is_wrong(gateway, answering):
    client = runtime(gateway)
    with pytest.raises(ClientError) as no_input:
        client.invoke_endpoint_async(EndpointName=answering)
    assert "no input" in no_input.value.response["Error"]["Message"]
    # botocore checks the TTL's range itself; a client that does not is told by the gateway.
    ttl = gateway.http(timeout=10).post(f"/endpoints/{answering}/async-invocations", content=b"{}",
                                         headers={"X-Amzn-SageMaker-RequestTTLSeconds": "5"})
    assert ttl.status_code == 400 and "60 to 21600" in ttl.json()["Message"]
    with pytest.raises(ClientError) as where:
        client.invoke_endpoint_async(EndpointName=answering, InputLocation="ftp://somewhere/x")
    assert "InputLocation" in where.value.response["Error"]["Message"]
    with pytest.raises(ClientError) as too_big:
        client.invoke_endpoint_async(EndpointName=answering, Body=b"x" * 128_001)
    assert "128000" in too_big.value.response["Error"]["Message"]
    with pytest.raises(ClientError) as unknown:
        client.invoke_endpoint_async(EndpointName="nowhere", Body=b"{}")
    assert "not found" in unknown.value.response["Error"]["Message"]


def test_the_endpoint_keeps_its_async_config_when_its_endpoint_config_is_deleted(gateway, s3_server, answering):
    sagemaker = boto("sagemaker", gateway.base_url)
    described = sagemaker.describe_endpoint(EndpointName=answering)
    assert described["AsyncInferenceConfig"]["OutputConfig"]["S3OutputPath"].endswith("/out")
    sagemaker.delete_endpoint_config(EndpointConfigName=answering)  # SageMaker allows it while the endpoint runs

    accepted = runtime(gateway).invoke_endpoint_async(EndpointName=answering, Body=json.dumps(PROMPT).encode(),
                                                      ContentType="application/json")
    assert wait_for(lambda: s3_text(s3_server, accepted["OutputLocation"]) is not None, 120)


def test_an_async_endpoint_scales_to_zero_on_an_empty_queue_and_starts_when_work_arrives(gateway, tmp_path):
    name = create_async_endpoint(gateway, "elastic", f"file://{tmp_path}/out")
    scaling = boto("application-autoscaling", gateway.base_url)
    resource = f"endpoint/{name}/variant/AllTraffic"
    scaling.register_scalable_target(ServiceNamespace="sagemaker", ResourceId=resource, MinCapacity=0, MaxCapacity=2,
                                     ScalableDimension="sagemaker:variant:DesiredInstanceCount")
    scaling.put_scaling_policy(
        PolicyName="backlog", ServiceNamespace="sagemaker", ResourceId=resource, PolicyType="TargetTrackingScaling",
        ScalableDimension="sagemaker:variant:DesiredInstanceCount",
        TargetTrackingScalingPolicyConfiguration={
            "TargetValue": 5.0, "ScaleInCooldown": 1, "ScaleOutCooldown": 1,
            "CustomizedMetricSpecification": {
                "MetricName": "ApproximateBacklogSizePerInstance", "Namespace": "AWS/SageMaker", "Statistic": "Average",
                "Dimensions": [{"Name": "EndpointName", "Value": name}],
            },
        },
    )
    policy = scaling.describe_scaling_policies(ServiceNamespace="sagemaker", ResourceId=resource)["ScalingPolicies"][0]
    metric = policy["TargetTrackingScalingPolicyConfiguration"]["CustomizedMetricSpecification"]
    assert metric["MetricName"] == "ApproximateBacklogSizePerInstance"

    def instances() -> int:
        return gateway.http(timeout=10).get("/health").json()["endpoints"][name]["variants"]["AllTraffic"]["instances"]

    assert wait_for(lambda: instances() == 0, 60)  # nothing queued: down to MinCapacity 0
    accepted = runtime(gateway).invoke_endpoint_async(EndpointName=name, Body=json.dumps(PROMPT).encode(),
                                                      ContentType="application/json")
    assert wait_for(lambda: (tmp_path / "out" / f"{accepted['InferenceId']}.out").exists(), 120)

    with pytest.raises(ClientError) as unknown_metric:
        scaling.put_scaling_policy(
            PolicyName="other", ServiceNamespace="sagemaker", ResourceId=resource, PolicyType="TargetTrackingScaling",
            ScalableDimension="sagemaker:variant:DesiredInstanceCount",
            TargetTrackingScalingPolicyConfiguration={"TargetValue": 1.0, "CustomizedMetricSpecification": {
                "MetricName": "CPUUtilization", "Namespace": "AWS/SageMaker", "Statistic": "Average"}},
        )
    assert "ApproximateBacklogSizePerInstance" in unknown_metric.value.response["Error"]["Message"]


COUNTER = """
import hashlib, json

def model_fn(model_dir):
    return None

def transform_fn(model, body, content_type, accept):
    return json.dumps({"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}), "application/json"
"""
ONE_GB = 10**9


def test_a_1_gb_input_streams_through_the_gateway(gateway, tmp_path):
    """The input goes from its file to the instance, and the answer to its output, a chunk at a time: the
    gateway's peak resident memory stays far below the input's size."""
    model = tmp_path / "counter"
    (model / "code").mkdir(parents=True)
    (model / "code" / "inference.py").write_text(textwrap.dedent(COUNTER))
    sagemaker = boto("sagemaker", gateway.base_url)
    sagemaker.create_model(ModelName="counter", PrimaryContainer={"ModelDataUrl": str(model)})
    sagemaker.create_endpoint_config(
        EndpointConfigName="counter", ProductionVariants=[{"VariantName": "AllTraffic", "ModelName": "counter",
                                                            "InitialInstanceCount": 1}],
        AsyncInferenceConfig={"OutputConfig": {"S3OutputPath": f"file://{tmp_path}/out"}},
    )
    sagemaker.create_endpoint(EndpointName="counter", EndpointConfigName="counter")
    sagemaker.get_waiter("endpoint_in_service").wait(EndpointName="counter", WaiterConfig=WAIT)

    big, digest = tmp_path / "big.bin", hashlib.sha256()
    with open(big, "wb") as out:
        block = bytes(range(256)) * 4096  # 1 MiB
        for start in range(0, ONE_GB, len(block)):
            piece = block[: min(len(block), ONE_GB - start)]
            digest.update(piece)
            out.write(piece)
    accepted = runtime(gateway).invoke_endpoint_async(
        EndpointName="counter", InputLocation=f"file://{big}", ContentType="application/octet-stream",
    )
    output = tmp_path / "out" / f"{accepted['InferenceId']}.out"
    assert wait_for(output.exists, 600), gateway.http(timeout=10).get(f"/async-invocations/{accepted['InferenceId']}").json()
    assert json.loads(output.read_text()) == {"bytes": ONE_GB, "sha256": digest.hexdigest()}
    peak_mb = _peak_resident_mb(gateway.process.pid)
    assert peak_mb < 600, f"the gateway's resident memory peaked at {peak_mb:.0f} MB"


def _peak_resident_mb(pid: int) -> float:
    """VmHWM: the most resident memory the process ever had."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc")


def test_no_accepted_job_is_lost_and_none_is_written_twice_when_the_gateway_is_killed(tmp_path_factory, model_path):
    """200 jobs; the gateway is killed (SIGKILL) while it works through them, and started again on the same store."""
    folder = tmp_path_factory.mktemp("async-crash")
    outputs = folder / "outputs"
    env = {"SERVELET_INSTANCES": "0", "SERVELET_ASYNC_LEASE_SECONDS": "3", "SERVELET_DATA_DIR": str(folder / "data")}
    first = start_gateway(folder / "first", env=env, ready=None)
    try:
        create_async_endpoint(first, "crashy", f"file://{outputs}", per_instance=8)
        client = runtime(first)
        ids = [
            client.invoke_endpoint_async(EndpointName="crashy", Body=json.dumps(PROMPT).encode(),
                                         ContentType="application/json")["InferenceId"]
            for _ in range(200)
        ]
        assert wait_for(lambda: 5 <= _written(outputs), 120)
    finally:
        first.process.kill()
        first.process.wait()
    done_before = _written(outputs)
    assert done_before < 200, "the gateway finished before it was killed: nothing was tested"

    second = start_gateway(folder / "second", env=env, ready=None)
    try:
        assert wait_for(lambda: _written(outputs) == 200, 600), _written(outputs)
        names = sorted(p.name for p in outputs.iterdir())
        assert names == sorted(f"{i}.out" for i in ids)  # every job, once; no partial file left
        statuses = {second.http(timeout=10).get(f"/async-invocations/{i}").json()["Status"] for i in ids}
        assert statuses == {"Completed"}
    finally:
        stop_process(second.process)


def _written(folder: Path) -> int:
    return len(list(folder.glob("*.out"))) if folder.exists() else 0
