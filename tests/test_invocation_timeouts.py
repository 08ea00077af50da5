"""An async job's InvocationTimeoutSeconds and a transform job's InvocationsTimeoutInSeconds (up to an hour, as in
SageMaker) hold over the gateway's real-time SERVELET_INVOCATION_TIMEOUT: a batch that takes longer than a real-time
call may still complete. One gateway whose real-time limit is 2 s, a handler model that takes 4 s."""

from __future__ import annotations

import json
import textwrap

import pytest
from conftest import boto, create_async_endpoint, start_gateway, stop_process, wait_for

SLOW_ECHO = '''
import time

def model_fn(model_dir):
    return None

def transform_fn(model, body, content_type, accept):
    time.sleep(4)
    return body, content_type
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("timeouts")
    model = root / "slow"
    (model / "code").mkdir(parents=True)
    (model / "code" / "inference.py").write_text(textwrap.dedent(SLOW_ECHO))
    gateway = start_gateway(root / "gateway", env={"SERVELET_INVOCATION_TIMEOUT": "2", "SERVELET_INSTANCES": "0"},
                            ready=None)
    yield {"gateway": gateway, "root": root, "model": model}
    stop_process(gateway.process)


def test_an_async_job_has_its_own_invocation_timeout(setup):
    gateway, root = setup["gateway"], setup["root"]
    create_async_endpoint(boto("sagemaker", gateway.base_url), "slow", str(setup["model"]), f"file://{root}/out")
    runtime = boto("sagemaker-runtime", gateway.base_url)
    with pytest.raises(runtime.exceptions.ClientError):  # the real-time call, for contrast: 2 s
        runtime.invoke_endpoint(EndpointName="slow", Body=b'{"x": 1}', ContentType="application/json")
    accepted = runtime.invoke_endpoint_async(EndpointName="slow", Body=b'{"x": 1}', ContentType="application/json",
                                             InvocationTimeoutSeconds=60)
    output = root / "out" / f"{accepted['InferenceId']}.out"
    assert wait_for(output.exists, 60), (root / "gateway" / "gateway.log").read_text()[-3000:]
    assert json.loads(output.read_text()) == {"x": 1}


def test_a_transform_job_has_its_own_invocation_timeout(setup):
    root = setup["root"]
    (root / "in").mkdir()
    (root / "in" / "records.jsonl").write_text('{"n": 1}\n{"n": 2}\n')
    sagemaker = boto("sagemaker", setup["gateway"].base_url)
    sagemaker.create_model(ModelName="slow-batch", PrimaryContainer={"ModelDataUrl": str(setup["model"])})
    sagemaker.create_transform_job(
        TransformJobName="slow-batch", ModelName="slow-batch", BatchStrategy="SingleRecord",
        ModelClientConfig={"InvocationsTimeoutInSeconds": 60, "InvocationsMaxRetries": 0},
        TransformInput={"DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": f"file://{root}/in/"}},
                        "ContentType": "application/json", "SplitType": "Line"},
        TransformOutput={"S3OutputPath": f"file://{root}/transformed", "AssembleWith": "Line"},
        TransformResources={"InstanceType": "ml.m5.large", "InstanceCount": 1},
    )
    sagemaker.get_waiter("transform_job_completed_or_stopped").wait(
        TransformJobName="slow-batch", WaiterConfig={"Delay": 1, "MaxAttempts": 120})
    described = sagemaker.describe_transform_job(TransformJobName="slow-batch")
    assert described["TransformJobStatus"] == "Completed", described.get("FailureReason")
    lines = (root / "transformed" / "records.jsonl.out").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"n": 1}, {"n": 2}]
