"""With auth on, file:// URIs are confined to SERVELET_FILE_ROOTS: a key that may invoke an endpoint cannot make the
server read its own files as async inputs, or write outputs where the roots do not reach. One gateway (auth on,
one root) with an async endpoint of a handler model, driven by boto3 with SigV4 keys made in the store."""

from __future__ import annotations

import json
import textwrap

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from conftest import create_async_endpoint, start_gateway, stop_process, wait_for
from servelet.control.api_keys import ApiKeys
from servelet.control.secret_box import SecretBox
from servelet.control.store import Store

ECHO = '''
def model_fn(model_dir):
    return None

def transform_fn(model, body, content_type, accept):
    return body, content_type
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("roots")
    allowed, outside = root / "allowed", root / "outside"
    allowed.mkdir()
    outside.mkdir()
    store = Store(Store.default_url(root / "gateway" / "data"))
    try:
        key = ApiKeys(store, SecretBox(root / "gateway" / "data")).create("admin", ["admin"], True).secrets
    finally:
        store.close()
    model = root / "echo"
    (model / "code").mkdir(parents=True)
    (model / "code" / "inference.py").write_text(textwrap.dedent(ECHO))
    gateway = start_gateway(root / "gateway", env={"SERVELET_AUTH": "true", "SERVELET_FILE_ROOTS": str(allowed)},
                            args=["--instances", "0"], ready=None)
    yield {"gateway": gateway, "key": key, "allowed": allowed, "outside": outside, "model": model}
    stop_process(gateway.process)


def client(setup, service: str):
    return boto3.client(service, endpoint_url=setup["gateway"].base_url, region_name="us-east-1",
                        aws_access_key_id=setup["key"]["access_key_id"],
                        aws_secret_access_key=setup["key"]["secret_access_key"],
                        config=Config(retries={"max_attempts": 1}))


def refusal(call) -> str:
    with pytest.raises(ClientError) as raised:
        call()
    return raised.value.response["Error"]["Message"]


def test_inputs_and_outputs_inside_the_roots_work_and_others_are_refused_naming_the_setting(setup):
    allowed, outside = setup["allowed"], setup["outside"]
    create_async_endpoint(client(setup, "sagemaker"), "inside", str(setup["model"]), f"file://{allowed}/out")
    runtime = client(setup, "sagemaker-runtime")
    (allowed / "in.json").write_text('{"x": 1}')
    accepted = runtime.invoke_endpoint_async(EndpointName="inside", InputLocation=f"file://{allowed}/in.json")
    output = allowed / "out" / f"{accepted['InferenceId']}.out"
    assert wait_for(output.exists, 60)
    assert json.loads(output.read_text()) == {"x": 1}

    (outside / "secret.json").write_text('{"secret": true}')
    for sneaky in (f"file://{outside}/secret.json", f"file://{allowed}/../outside/secret.json", "/etc/passwd"):
        message = refusal(lambda: runtime.invoke_endpoint_async(EndpointName="inside", InputLocation=sneaky))
        assert "SERVELET_FILE_ROOTS" in message, message
    (allowed / "link.json").symlink_to(outside / "secret.json")
    message = refusal(lambda: runtime.invoke_endpoint_async(EndpointName="inside", InputLocation=f"file://{allowed}/link.json"))
    assert "SERVELET_FILE_ROOTS" in message


def test_an_output_path_outside_the_roots_is_refused_when_invoked(setup):
    create_async_endpoint(client(setup, "sagemaker"), "outside", str(setup["model"]), f"file://{setup['outside']}/out")
    runtime = client(setup, "sagemaker-runtime")
    message = refusal(lambda: runtime.invoke_endpoint_async(EndpointName="outside", InputLocation=f"file://{setup['allowed']}/in.json"))
    assert "SERVELET_FILE_ROOTS" in message
    assert not (setup["outside"] / "out").exists()


def test_a_transform_job_may_not_read_outside_the_roots(setup):
    sagemaker = client(setup, "sagemaker")
    sagemaker.create_model(ModelName="transformer", PrimaryContainer={"ModelDataUrl": str(setup["model"])})
    message = refusal(lambda: sagemaker.create_transform_job(
        TransformJobName="sneaky", ModelName="transformer",
        TransformInput={"DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": f"file://{setup['outside']}/"}}},
        TransformOutput={"S3OutputPath": f"file://{setup['allowed']}/transformed"},
        TransformResources={"InstanceType": "ml.m5.large", "InstanceCount": 1},
    ))
    assert "SERVELET_FILE_ROOTS" in message


def test_a_data_capture_destination_outside_the_roots_is_refused_naming_the_setting(setup):
    sagemaker = client(setup, "sagemaker")
    sagemaker.create_model(ModelName="captured", PrimaryContainer={"ModelDataUrl": str(setup["model"])})
    variant = [{"VariantName": "AllTraffic", "ModelName": "captured", "InitialInstanceCount": 1}]

    def create(name: str, destination: str):
        capture = {"InitialSamplingPercentage": 100, "DestinationS3Uri": destination, "CaptureOptions": [{"CaptureMode": "Input"}]}
        return sagemaker.create_endpoint_config(EndpointConfigName=name, ProductionVariants=variant, DataCaptureConfig=capture)

    message = refusal(lambda: create("capture-outside", f"file://{setup['outside']}/capture"))
    assert message.startswith("DataCaptureConfig.DestinationS3Uri:") and "SERVELET_FILE_ROOTS" in message, message
    create("capture-inside", f"file://{setup['allowed']}/capture")
