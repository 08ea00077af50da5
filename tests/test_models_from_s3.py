"""Models that live in S3 (moto's server on 127.0.0.1), deployed through the control plane as SageMaker users do:
a `model.tar.gz` with `code/inference.py`, and a multi-model endpoint over a prefix of archives."""

from __future__ import annotations

import io
import json
import tarfile
import textwrap

import pytest
from botocore.exceptions import ClientError
from conftest import boto, start_gateway, stop_process, wait_for
from prometheus_client.parser import text_string_to_metric_families
from test_handler_runtime import SCALER, SCALING, deploy, wait_in_service
from test_multi_model import SCRIPT as NAMED_MODEL

BUDGET = 50_000
PADDING = 20_000  # two models fit in the budget, three do not


def archive(members: dict[str, bytes]) -> bytes:
    """A model.tar.gz in SageMaker's layout, in memory."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as packed:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            packed.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def bucket(s3_server):
    name = s3_server.new_bucket()
    s3 = s3_server.client()
    scaler = archive({
        "model.json": json.dumps({"factor": 2.0}).encode(),
        "code/inference.py": textwrap.dedent(SCALER).encode(),
        "code/scaling.py": SCALING.encode(),
    })
    s3.put_object(Bucket=name, Key="scaler/model.tar.gz", Body=scaler)
    for model in ("alpha", "beta", "gamma"):
        named = archive({
            "model.json": json.dumps({"name": model, "load_seconds": 0}).encode(),
            "weights.bin": bytes(PADDING),
            "code/inference.py": textwrap.dedent(NAMED_MODEL).encode(),
        })
        s3.put_object(Bucket=name, Key=f"many/{model}.tar.gz", Body=named)
    return name


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, s3_server, bucket):
    root = tmp_path_factory.mktemp("from-s3")
    env = s3_server.env | {"SERVELET_CACHE_DIR": str(root / "cache")}
    running = start_gateway(root, env=env, args=["--instances", "0"], ready=None)
    sagemaker = boto("sagemaker", running.base_url)
    deploy(sagemaker, "scaler", f"s3://{bucket}/scaler/model.tar.gz")
    container = {"ModelDataUrl": f"s3://{bucket}/many/", "Mode": "MultiModel",
                 "Environment": {"SERVELET_MODEL_CACHE_BYTES": str(BUDGET)}}
    sagemaker.create_model(ModelName="many", PrimaryContainer=container, ExecutionRoleArn="arn:aws:iam::1:role/x")
    variant = {"VariantName": "AllTraffic", "ModelName": "many", "InitialInstanceCount": 1}
    sagemaker.create_endpoint_config(EndpointConfigName="many", ProductionVariants=[variant])
    sagemaker.create_endpoint(EndpointName="many", EndpointConfigName="many")
    wait_in_service(sagemaker, "scaler", "many")
    yield running
    stop_process(running.process)


@pytest.fixture(scope="module")
def runtime(gateway):
    return boto("sagemaker-runtime", gateway.base_url, retries={"max_attempts": 1})


def test_a_model_tar_gz_from_s3_runs_its_inference_py(runtime):
    answer = runtime.invoke_endpoint(EndpointName="scaler", Body=json.dumps([1, 2.5]), ContentType="application/json")
    assert json.loads(answer["Body"].read()) == [2.0, 5.0]


def test_a_multi_model_endpoint_over_an_s3_prefix_loads_evicts_and_answers_right(gateway, runtime):
    for round_ in range(2):
        for model in ("alpha", "beta", "gamma"):
            answer = runtime.invoke_endpoint(
                EndpointName="many", TargetModel=f"{model}.tar.gz", Body=json.dumps(round_), ContentType="application/json"
            )
            assert json.loads(answer["Body"].read()) == {"model": model, "input": round_}
    # Three models cycled through a budget of two: every request misses, so six loads and four evictions.
    # The gateway reads the counters from the instance's health poll, so they arrive within a poll or two.
    assert wait_for(lambda: cache_counts(gateway) == {"loads": 6, "evictions": 4, "misses": 6}, 10), cache_counts(gateway)


def cache_counts(gateway) -> dict[str, float]:
    """The endpoint's model-cache counters from the gateway's /metrics."""
    families = text_string_to_metric_families(gateway.http().get("/metrics").text)
    counts = {}
    for family in families:
        for sample in family.samples:
            if sample.labels.get("endpoint") == "many" and sample.name in (
                "servelet_model_loads_total", "servelet_model_evictions_total", "servelet_model_misses_total"
            ):
                counts[sample.name.removeprefix("servelet_model_").removesuffix("_total")] = sample.value
    return counts

def test_a_target_that_is_not_in_the_bucket_is_named_in_the_error(runtime):
    with pytest.raises(ClientError) as refused:
        runtime.invoke_endpoint(EndpointName="many", TargetModel="delta.tar.gz", Body="1", ContentType="application/json")
    assert refused.value.response["Error"]["Code"] == "ValidationError"
    assert "target model 'delta.tar.gz' not found" in refused.value.response["Error"]["Message"]
