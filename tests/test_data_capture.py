"""Data capture (an endpoint config's DataCaptureConfig), set up with boto3 as SageMaker Model Monitor users do: each
sampled invocation is a JSON line under DESTINATION/ENDPOINT/VARIANT/yyyy/mm/dd/hh/, in SageMaker's shape.

One gateway for the module, serving a handler model that answers at once (it echoes JSON, upper-cases CSV and
reverses anything else); capture is written every half second, into a 64 KiB buffer so that one large invocation
shows the bound. The last test starts a gateway of its own to see what is buffered written at its stop.
"""

from __future__ import annotations

import base64
import json
import re
import textwrap
import uuid
from pathlib import Path

import botocore.exceptions
import pytest
from conftest import boto, start_gateway, stop_process, wait_for
from prometheus_client.parser import text_string_to_metric_families

ECHO = """
import json

def model_fn(model_dir):
    return None

def transform_fn(model, body, content_type, accept):
    if content_type.startswith("application/json"):
        return json.dumps({"echo": json.loads(body)}), "application/json"
    if content_type.startswith("text/csv"):
        return body.decode().upper(), "text/csv"
    return body[::-1], "application/octet-stream"
"""
BUFFER_BYTES = 64 * 1024
CAPTURE_FILE = re.compile(r"^\d{2}-\d{2}-\d{3}-[0-9a-f-]{36}\.jsonl$")
WAIT = {"Delay": 1, "MaxAttempts": 120}


def echo_model(folder: Path) -> str:
    (folder / "code").mkdir(parents=True)
    (folder / "code" / "inference.py").write_text(textwrap.dedent(ECHO))
    return str(folder)


def capture(destination: str, percentage: int = 100, *modes: str, **members) -> dict:
    return {"InitialSamplingPercentage": percentage, "DestinationS3Uri": destination,
            "CaptureOptions": [{"CaptureMode": mode} for mode in modes or ("Input", "Output")]} | members


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("captured")


@pytest.fixture(scope="module")
def bucket(s3_server) -> str:
    return s3_server.new_bucket()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, s3_server):
    env = s3_server.env | {
        "SERVELET_INSTANCES": "0", "SERVELET_DATA_CAPTURE_FLUSH_SECONDS": "0.5",
        "SERVELET_DATA_CAPTURE_BUFFER_BYTES": str(BUFFER_BYTES),
    }
    running = start_gateway(tmp_path_factory.mktemp("data-capture"), env=env, ready=None)
    yield running
    stop_process(running.process)


@pytest.fixture(scope="module")
def sagemaker(gateway):
    return boto("sagemaker", gateway.base_url, retries={"max_attempts": 1})


@pytest.fixture(scope="module")
def runtime(gateway):
    return boto("sagemaker-runtime", gateway.base_url, retries={"max_attempts": 1})


KMS_KEY = "arn:aws:kms:us-east-1:123456789012:key/capture"
EVERYTHING = {
    "EnableCapture": True,
    "CaptureContentTypeHeader": {"CsvContentTypes": ["text/csv"], "JsonContentTypes": ["application/json"]},
}


@pytest.fixture(scope="module")
def endpoints(sagemaker, root, bucket, tmp_path_factory):
    """`full` captures everything to a folder, `quiet` 0 % of its input, `to-s3` its output (base64) to S3,
    `unwritable` into a path no folder can be made at; the config `plain` captures nothing. Started together."""
    sagemaker.create_model(ModelName="echo", PrimaryContainer={"ModelDataUrl": echo_model(tmp_path_factory.mktemp("echo"))})
    variant = [{"VariantName": "AllTraffic", "ModelName": "echo", "InitialInstanceCount": 1}]
    configs = {
        "full": capture(f"file://{root}", 100, "Input", "Output", **EVERYTHING),
        "quiet": capture(f"file://{root}", 0, "Input"),
        "to-s3": capture(f"s3://{bucket}/capture/", 100, "Output", KmsKeyId=KMS_KEY),
        "unwritable": capture("file:///dev/null/capture"),
    }
    for name, data_capture in configs.items():
        sagemaker.create_endpoint_config(EndpointConfigName=name, ProductionVariants=variant, DataCaptureConfig=data_capture)
        sagemaker.create_endpoint(EndpointName=name, EndpointConfigName=name)
    sagemaker.create_endpoint_config(EndpointConfigName="plain", ProductionVariants=variant)
    for name in configs:
        sagemaker.get_waiter("endpoint_in_service").wait(EndpointName=name, WaiterConfig=WAIT)
    return configs


def records(root: Path, endpoint: str) -> list[tuple[Path, dict]]:
    """Every record under the endpoint's folder, with the file that holds it (relative to the folder)."""
    folder = root / endpoint
    return [(path.relative_to(folder), json.loads(line)) for path in sorted(folder.glob("*/*/*/*/*/*.jsonl"))
            for line in path.read_text().splitlines() if line]


def record_of(root: Path, endpoint: str, inference_id: str) -> tuple[Path, dict] | None:
    found = [(path, r) for path, r in records(root, endpoint) if r["eventMetadata"].get("inferenceId") == inference_id]
    assert len(found) <= 1, found
    return found[0] if found else None


def captured(root: Path, endpoint: str, inference_id: str) -> tuple[Path, dict]:
    assert wait_for(lambda: record_of(root, endpoint, inference_id) is not None, 30), f"no record of {inference_id}"
    return record_of(root, endpoint, inference_id)


def invoke(runtime, endpoint: str, body: bytes, content_type: str) -> tuple[str, bytes]:
    inference_id = f"test-{uuid.uuid4()}"
    answer = runtime.invoke_endpoint(EndpointName=endpoint, Body=body, ContentType=content_type, InferenceId=inference_id)
    return inference_id, answer["Body"].read()


def test_describe_shows_the_config_as_sent_and_the_endpoints_summary(sagemaker, endpoints, root):
    described = sagemaker.describe_endpoint_config(EndpointConfigName="full")["DataCaptureConfig"]
    assert described == endpoints["full"] | {"DestinationS3Uri": f"file://{root}"}
    assert sagemaker.describe_endpoint(EndpointName="full")["DataCaptureConfig"] == {
        "EnableCapture": True, "CaptureStatus": "Started", "CurrentSamplingPercentage": 100,
        "DestinationS3Uri": f"file://{root}",
    }


def test_a_json_invocation_is_captured_whole_as_json_text(runtime, endpoints, root):
    body = json.dumps({"inputs": "The capital of France is", "n": [1, 2]}).encode()
    inference_id, answer = invoke(runtime, "full", body, "application/json")
    assert json.loads(answer) == {"echo": json.loads(body)}
    path, record = captured(root, "full", inference_id)
    assert record["captureData"] == {
        "endpointInput": {"observedContentType": "application/json", "mode": "INPUT", "data": body.decode(), "encoding": "JSON"},
        "endpointOutput": {"observedContentType": "application/json", "mode": "OUTPUT", "data": answer.decode(), "encoding": "JSON"},
    }
    metadata = record["eventMetadata"]
    assert uuid.UUID(metadata["eventId"]) and record["eventVersion"] == "0"
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z", metadata["inferenceTime"]), metadata
    variant, *hour, name = path.parts  # AllTraffic/yyyy/mm/dd/hh/mm-ss-SSS-uuid.jsonl, by the record's time
    assert variant == "AllTraffic" and "/".join(hour) == re.sub(r"[-T]", "/", metadata["inferenceTime"][:13])
    assert CAPTURE_FILE.match(name), name


def test_csv_is_captured_as_csv_and_other_types_as_base64(runtime, endpoints, root):
    csv_id, csv_answer = invoke(runtime, "full", b"a,b,c\n1,2,3", "text/csv")
    binary = bytes(range(256))
    binary_id, binary_answer = invoke(runtime, "full", binary, "application/octet-stream")
    assert csv_answer == b"A,B,C\n1,2,3" and binary_answer == binary[::-1]
    csv = captured(root, "full", csv_id)[1]["captureData"]
    assert (csv["endpointInput"]["data"], csv["endpointInput"]["encoding"]) == ("a,b,c\n1,2,3", "CSV")
    assert (csv["endpointOutput"]["data"], csv["endpointOutput"]["encoding"]) == ("A,B,C\n1,2,3", "CSV")
    other = captured(root, "full", binary_id)[1]["captureData"]
    assert other["endpointInput"]["encoding"] == other["endpointOutput"]["encoding"] == "BASE64"
    assert base64.b64decode(other["endpointInput"]["data"]) == binary
    assert base64.b64decode(other["endpointOutput"]["data"]) == binary[::-1]
    assert other["endpointInput"]["observedContentType"] == "application/octet-stream"


def test_a_streamed_invocation_is_captured_with_its_assembled_answer(runtime, endpoints, root):
    inference_id = f"stream-{uuid.uuid4()}"
    body = json.dumps({"inputs": "Once upon a time"}).encode()
    stream = runtime.invoke_endpoint_with_response_stream(
        EndpointName="full", Body=body, ContentType="application/json", InferenceId=inference_id
    )
    answer = b"".join(event["PayloadPart"]["Bytes"] for event in stream["Body"] if "PayloadPart" in event)
    data = captured(root, "full", inference_id)[1]["captureData"]
    assert data["endpointInput"]["data"] == body.decode()  # as the client sent it
    assert data["endpointOutput"]["data"].encode() == answer and json.loads(answer)["echo"]["inputs"] == "Once upon a time"


def test_capture_to_s3_holds_only_the_output_base64_without_a_content_type_header(runtime, endpoints, s3_server, bucket):
    inference_id, answer = invoke(runtime, "to-s3", b'{"x": 1}', "application/json")
    client = s3_server.client()

    def found() -> list[tuple[str, dict]]:
        listed = client.list_objects_v2(Bucket=bucket, Prefix="capture/to-s3/AllTraffic/").get("Contents", [])
        lines = [(o["Key"], json.loads(line)) for o in listed
                 for line in client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read().splitlines()]
        return [(key, r) for key, r in lines if r["eventMetadata"].get("inferenceId") == inference_id]

    assert wait_for(lambda: found(), 30)
    key, record = found()[0]
    assert CAPTURE_FILE.match(key.rsplit("/", 1)[1]), key
    assert list(record["captureData"]) == ["endpointOutput"]
    head = client.head_object(Bucket=bucket, Key=key)  # the config's KmsKeyId: S3 encrypts the file with it
    assert (head["ServerSideEncryption"], head["SSEKMSKeyId"]) == ("aws:kms", KMS_KEY)
    assert record["captureData"]["endpointOutput"]["encoding"] == "BASE64"
    assert base64.b64decode(record["captureData"]["endpointOutput"]["data"]) == answer


def test_zero_percent_captures_nothing_and_updates_retain_the_capture_unless_excluded(sagemaker, runtime, endpoints, root):
    for _ in range(5):
        invoke(runtime, "quiet", b'{"x": 1}', "application/json")
    later, _ = invoke(runtime, "full", b'{"after": "quiet"}', "application/json")
    captured(root, "full", later)  # written after the quiet ones would have been
    assert records(root, "quiet") == []
    summary = sagemaker.describe_endpoint(EndpointName="quiet")["DataCaptureConfig"]
    assert summary == {"EnableCapture": True, "CaptureStatus": "Started", "CurrentSamplingPercentage": 0,
                       "DestinationS3Uri": f"file://{root}"}
    # RetainAllVariantProperties keeps the capture that runs; ExcludeRetainedVariantProperties takes the config's.
    sagemaker.update_endpoint(EndpointName="quiet", EndpointConfigName="plain", RetainAllVariantProperties=True)
    sagemaker.get_waiter("endpoint_in_service").wait(EndpointName="quiet", WaiterConfig=WAIT)
    described = sagemaker.describe_endpoint(EndpointName="quiet")
    assert described["EndpointConfigName"] == "plain" and described["DataCaptureConfig"] == summary
    sagemaker.update_endpoint(EndpointName="quiet", EndpointConfigName="plain", RetainAllVariantProperties=True,
                              ExcludeRetainedVariantProperties=[{"VariantPropertyType": "DataCaptureConfig"}])
    sagemaker.get_waiter("endpoint_in_service").wait(EndpointName="quiet", WaiterConfig=WAIT)
    assert "DataCaptureConfig" not in sagemaker.describe_endpoint(EndpointName="quiet")


def test_a_capture_that_cannot_be_written_is_logged_and_counted_and_the_request_still_answers(gateway, runtime, endpoints):
    _, answer = invoke(runtime, "unwritable", b'{"x": 1}', "application/json")
    assert json.loads(answer) == {"echo": {"x": 1}}
    assert wait_for(lambda: metric(gateway, "servelet_data_capture_write_errors_total", endpoint="unwritable") >= 1, 30)
    assert metric(gateway, "servelet_data_capture_dropped_total", endpoint="unwritable", reason="write_error") >= 1
    assert "data capture: endpoint unwritable: 1 record(s) not written" in gateway.log()


VARIANT = [{"VariantName": "AllTraffic", "ModelName": "echo", "InitialInstanceCount": 1}]
BAD = {
    "a percentage over 100": (capture("s3://b/c", 101), "DataCaptureConfig.InitialSamplingPercentage"),
    "an https destination": (capture("https://b.s3.amazonaws.com/c"), "DataCaptureConfig.DestinationS3Uri"),
    "a relative destination": (capture("captured/here"), "DataCaptureConfig.DestinationS3Uri"),
    "an unknown mode": (capture("s3://b/c", 100, "Both"), "DataCaptureConfig.CaptureOptions.0.CaptureMode"),
    "a mode twice": (capture("s3://b/c", 100, "Input", "Input"), "DataCaptureConfig.CaptureOptions"),
    "three options": (capture("s3://b/c", 100, "Input", "Output", "InputAndOutput"), "DataCaptureConfig.CaptureOptions"),
    "a content type that is none": (
        capture("s3://b/c", CaptureContentTypeHeader={"CsvContentTypes": ["csv please"]}),
        "DataCaptureConfig.CaptureContentTypeHeader.CsvContentTypes",
    ),
    "a type both CSV and JSON": (
        capture("s3://b/c", CaptureContentTypeHeader={"CsvContentTypes": ["text/plain"], "JsonContentTypes": ["text/plain"]}),
        "DataCaptureConfig.CaptureContentTypeHeader",
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_data_capture_config_is_refused_naming_the_member(sagemaker, case):
    data_capture, member = BAD[case]
    with pytest.raises(botocore.exceptions.ClientError) as refused:
        sagemaker.create_endpoint_config(EndpointConfigName="bad", ProductionVariants=VARIANT, DataCaptureConfig=data_capture)
    error = refused.value.response["Error"]
    assert error["Code"] == "ValidationException" and error["Message"].startswith(f"{member}:"), error["Message"]


def test_a_member_capture_does_not_read_is_refused_by_name(gateway):
    """botocore sends only the members its model knows; a raw request shows that others are not dropped."""
    request = {"EndpointConfigName": "bad", "ProductionVariants": VARIANT,
               "DataCaptureConfig": capture("s3://b/c") | {"Compress": True}}
    with gateway.http() as http:
        answer = http.post("/", json=request, headers={"X-Amz-Target": "SageMaker.CreateEndpointConfig",
                                                        "Content-Type": "application/x-amz-json-1.1"})
    assert answer.status_code == 400
    assert "DataCaptureConfig.Compress: servelet does not support this member" in answer.json()["message"], answer.text


def metric(gateway, name: str, **labels) -> float:
    with gateway.http() as http:
        text = http.get("/metrics").text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))


def test_past_the_buffer_bound_a_record_is_dropped_and_counted_and_the_request_still_answers(gateway, runtime, endpoints):
    dropped = "servelet_data_capture_dropped_total"
    before = metric(gateway, dropped, endpoint="full", reason="buffer_full")
    large = b"x" * (BUFFER_BYTES // 2) + b"y" * (BUFFER_BYTES // 2)  # with its answer, twice the buffer
    _, answer = invoke(runtime, "full", large, "application/octet-stream")
    assert answer == large[::-1]
    assert metric(gateway, dropped, endpoint="full", reason="buffer_full") == before + 1


def test_what_is_buffered_is_written_when_the_gateway_stops(tmp_path):
    """Written every hour here: only the stop writes it."""
    env = {"SERVELET_INSTANCES": "0", "SERVELET_DATA_CAPTURE_FLUSH_SECONDS": "3600"}
    gateway = start_gateway(tmp_path / "gateway", env=env, ready=None)
    try:
        sagemaker, runtime = (boto(s, gateway.base_url, retries={"max_attempts": 1}) for s in ("sagemaker", "sagemaker-runtime"))
        sagemaker.create_model(ModelName="echo", PrimaryContainer={"ModelDataUrl": echo_model(tmp_path / "echo")})
        sagemaker.create_endpoint_config(EndpointConfigName="kept", ProductionVariants=VARIANT,
                                         DataCaptureConfig=capture(f"file://{tmp_path / 'captured'}"))
        sagemaker.create_endpoint(EndpointName="kept", EndpointConfigName="kept")
        sagemaker.get_waiter("endpoint_in_service").wait(EndpointName="kept", WaiterConfig=WAIT)
        inference_id, _ = invoke(runtime, "kept", b'{"last": true}', "application/json")
        assert records(tmp_path / "captured", "kept") == []
    finally:
        stop_process(gateway.process)
    assert record_of(tmp_path / "captured", "kept", inference_id) is not None
