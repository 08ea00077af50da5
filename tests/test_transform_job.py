"""Batch transform jobs through boto3's `create_transform_job`, a real gateway, moto's S3 and real models: outputs
match direct invocations record by record, and a job killed mid-way resumes without repeating or dropping a record,
and a stopped one stops keeping what it wrote."""

from __future__ import annotations

import gzip
import json
import textwrap

import pytest
from conftest import boto, start_gateway, stop_process, wait_for

from servelet.settings import DEFAULT_MODEL_URI

WAIT = {"Delay": 1, "MaxAttempts": 300}
PROMPTS = ["The capital of France is", "Water boils at", "The largest planet is", "Paris is in", "One plus one is",
           "The sky is", "Cats are"]


def record(number: int) -> dict:
    return {"id": number, "request": {"inputs": PROMPTS[number % len(PROMPTS)],
                                       "parameters": {"max_new_tokens": 4, "do_sample": False}}}


def jsonl(numbers) -> bytes:
    return b"".join(json.dumps(record(n)).encode() + b"\n" for n in numbers)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, model_path, s3_server):
    env = s3_server.env | {"SERVELET_INSTANCES": "0", "SERVELET_THREADS": "2"}
    running = start_gateway(tmp_path_factory.mktemp("transform"), env=env, ready=None)
    yield running
    stop_process(running.process)


@pytest.fixture(scope="module")
def sagemaker(gateway):
    client = boto("sagemaker", gateway.base_url)
    client.create_model(ModelName="gemma", PrimaryContainer={"ModelDataUrl": DEFAULT_MODEL_URI})
    return client


def transform(sagemaker, name: str, source: str, output: str, **settings) -> dict:
    sagemaker.create_transform_job(
        TransformJobName=name, ModelName=settings.pop("model", "gemma"),
        TransformInput={"DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": source}},
                        "ContentType": settings.pop("content_type", "application/jsonlines"),
                        "SplitType": "Line", "CompressionType": settings.pop("compression", "None")},
        TransformOutput={"S3OutputPath": output, "AssembleWith": "Line"},
        TransformResources={"InstanceType": "ml.m5.large", "InstanceCount": 1},
        **settings,
    )
    sagemaker.get_waiter("transform_job_completed_or_stopped").wait(TransformJobName=name, WaiterConfig=WAIT)
    return sagemaker.describe_transform_job(TransformJobName=name)


def test_a_transform_job_matches_direct_invocations_record_by_record(gateway, sagemaker, s3_server):
    s3 = s3_server.client()
    bucket = s3_server.new_bucket()
    s3.put_object(Bucket=bucket, Key="in/plain/a.jsonl", Body=jsonl(range(0, 3)))
    s3.put_object(Bucket=bucket, Key="in/plain/more/b.jsonl", Body=jsonl(range(3, 5)))
    s3.put_object(Bucket=bucket, Key="in/gz/c.jsonl.gz", Body=gzip.compress(jsonl(range(5, 7))))
    filters = {"InputFilter": "$.request", "JoinSource": "Input", "OutputFilter": "$['id','SageMakerOutput']"}
    plain = transform(sagemaker, "plain", f"s3://{bucket}/in/plain/", f"s3://{bucket}/out", BatchStrategy="MultiRecord",
                      MaxPayloadInMB=1, DataProcessing=filters)
    zipped = transform(sagemaker, "zipped", f"s3://{bucket}/in/gz/", f"s3://{bucket}/out-gz", BatchStrategy="MultiRecord",
                       MaxPayloadInMB=1, DataProcessing=filters, compression="Gzip")
    assert plain["TransformJobStatus"] == zipped["TransformJobStatus"] == "Completed", (plain, zipped)

    def lines(key: str) -> list[dict]:
        return [json.loads(line) for line in s3.get_object(Bucket=bucket, Key=key)["Body"].read().splitlines()]

    written = lines("out/a.jsonl.out") + lines("out/more/b.jsonl.out") + lines("out-gz/c.jsonl.gz.out")
    assert [line["id"] for line in written] == list(range(7))  # every record, once, in input order

    sagemaker.create_endpoint_config(EndpointConfigName="direct", ProductionVariants=[
        {"VariantName": "AllTraffic", "ModelName": "gemma", "InitialInstanceCount": 1}])
    sagemaker.create_endpoint(EndpointName="direct", EndpointConfigName="direct")
    sagemaker.get_waiter("endpoint_in_service").wait(EndpointName="direct", WaiterConfig=WAIT)
    runtime = boto("sagemaker-runtime", gateway.base_url)
    for line in written:
        direct = runtime.invoke_endpoint(EndpointName="direct", Body=json.dumps(record(line["id"])["request"]),
                                         ContentType="application/json")
        assert line["SageMakerOutput"] == json.loads(direct["Body"].read()), line


SLOW = """
import json, os, time

def model_fn(model_dir):
    return model_dir

def transform_fn(model, body, content_type, accept):
    record = json.loads(body)
    with open(os.path.join(model, "runs.log"), "a") as runs:
        runs.write(f"{record['id']}\\n")
    time.sleep(0.2)
    return json.dumps({"id": record["id"], "double": record["id"] * 2}), "application/json"
"""


def slow_model(folder) -> str:
    (folder / "code").mkdir(parents=True)
    (folder / "code" / "inference.py").write_text(textwrap.dedent(SLOW))
    return str(folder)


def test_a_job_killed_mid_way_resumes_without_repeating_or_dropping_a_record(tmp_path_factory, model_path):
    folder = tmp_path_factory.mktemp("transform-crash")
    model, inputs, outputs = slow_model(folder / "slow"), folder / "in", folder / "out"
    inputs.mkdir()
    (inputs / "numbers.jsonl").write_text("".join(json.dumps({"id": n}) + "\n" for n in range(60)))
    env = {"SERVELET_INSTANCES": "0", "SERVELET_DATA_DIR": str(folder / "data")}
    first = start_gateway(folder / "first", env=env, ready=None)
    try:
        sagemaker = boto("sagemaker", first.base_url)
        sagemaker.create_model(ModelName="slow", PrimaryContainer={"ModelDataUrl": model})
        sagemaker.create_transform_job(
            TransformJobName="numbers", ModelName="slow", BatchStrategy="SingleRecord", MaxConcurrentTransforms=2,
            TransformInput={"DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": f"file://{inputs}/"}},
                            "ContentType": "application/json", "SplitType": "Line"},
            TransformOutput={"S3OutputPath": f"file://{outputs}", "AssembleWith": "Line"},
            TransformResources={"InstanceType": "ml.m5.large", "InstanceCount": 1},
        )
        assert wait_for(lambda: _records_done(first, "numbers") >= 15, 120)
    finally:
        first.process.kill()
        first.process.wait()
    assert not (outputs / "numbers.jsonl.out").exists()

    second = start_gateway(folder / "second", env=env, ready=None)
    try:
        sagemaker = boto("sagemaker", second.base_url)
        sagemaker.get_waiter("transform_job_completed_or_stopped").wait(TransformJobName="numbers", WaiterConfig=WAIT)
        described = sagemaker.describe_transform_job(TransformJobName="numbers")
        assert described["TransformJobStatus"] == "Completed", described
        written = [json.loads(line) for line in (outputs / "numbers.jsonl.out").read_text().splitlines()]
        assert written == [{"id": n, "double": 2 * n} for n in range(60)]
        runs = (folder / "slow" / "runs.log").read_text().split()
        assert len(runs) <= 60 + 2, "only the records in flight at the kill may run twice"
        assert not list(outputs.glob(".servelet-parts/numbers/*/*"))  # the parts went once assembled
    finally:
        stop_process(second.process)


def test_a_stopped_job_stops_within_seconds_keeping_what_it_wrote(gateway, sagemaker, tmp_path):
    model, inputs = slow_model(tmp_path / "slow"), tmp_path / "in"
    inputs.mkdir()
    (inputs / "numbers.jsonl").write_text("".join(json.dumps({"id": n}) + "\n" for n in range(500)))
    sagemaker.create_model(ModelName="slow-stop", PrimaryContainer={"ModelDataUrl": model})
    sagemaker.create_transform_job(
        TransformJobName="stopping", ModelName="slow-stop", BatchStrategy="SingleRecord",
        TransformInput={"DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": f"file://{inputs}/"}},
                        "ContentType": "application/json", "SplitType": "Line"},
        TransformOutput={"S3OutputPath": f"file://{tmp_path}/out"},
        TransformResources={"InstanceType": "ml.m5.large", "InstanceCount": 1},
    )
    assert wait_for(lambda: _records_done(gateway, "stopping") >= 3, 120)
    sagemaker.stop_transform_job(TransformJobName="stopping")
    assert wait_for(
        lambda: sagemaker.describe_transform_job(TransformJobName="stopping")["TransformJobStatus"] == "Stopped", 15
    )
    done = _records_done(gateway, "stopping")
    assert 3 <= done < 500
    assert len(list((tmp_path / "out").glob(".servelet-parts/stopping/*/*"))) == done  # what was written stays


def _records_done(gateway, name: str) -> int:
    """From servelet's Progress extension of DescribeTransformJob (botocore drops it: read the raw answer)."""
    described = gateway.http(timeout=10).post(
        "/", headers={"X-Amz-Target": "SageMaker.DescribeTransformJob", "Content-Type": "application/x-amz-json-1.1"},
        content=json.dumps({"TransformJobName": name}),
    ).json()
    return described.get("Progress", {}).get("RecordsDone", 0)
