"""What an endpoint keeps of its serverless config, and ordinary variants that target tracking takes to zero.

A serverless variant is described from the endpoint itself (its config may be deleted while it runs) and refuses an
instance count; a variant with MinCapacity 0 loses its last instance after ScaleInCooldown without load, and the
next request starts one; an instance over its MemorySizeInMB is stopped and its request told why. Through boto3 and
the real default model."""

from __future__ import annotations

import json

import pytest
from botocore.exceptions import ClientError
from conftest import boto, start_gateway, stop_process, wait_for

from servelet.settings import DEFAULT_MODEL_URI

SHORT = json.dumps({"inputs": "The capital of France is", "parameters": {"max_new_tokens": 2}})
LONG = json.dumps({"inputs": "Tell me a long story about a dragon.", "parameters": {"max_new_tokens": 400}})
WAIT = {"Delay": 1, "MaxAttempts": 180}
SERVERLESS = {"MemorySizeInMB": 2048, "MaxConcurrency": 3}
DIMENSION = "sagemaker:variant:DesiredInstanceCount"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, model_path):
    env = {"SERVELET_INSTANCES": "0", "SERVELET_AUTOSCALE_INTERVAL": "0.5", "SERVELET_THREADS": "1"}
    running = start_gateway(tmp_path_factory.mktemp("scale-to-zero"), env=env, ready=None)
    yield running
    stop_process(running.process)


@pytest.fixture(scope="module")
def sagemaker(gateway):
    return boto("sagemaker", gateway.base_url)


def create(sagemaker, name: str, variant: dict) -> str:
    """Endpoint `name` of one variant `AllTraffic` (model and config named alike), InService."""
    sagemaker.create_model(ModelName=name, PrimaryContainer={"ModelDataUrl": DEFAULT_MODEL_URI})
    sagemaker.create_endpoint_config(
        EndpointConfigName=name, ProductionVariants=[{"VariantName": "AllTraffic", "ModelName": name} | variant]
    )
    sagemaker.create_endpoint(EndpointName=name, EndpointConfigName=name)
    sagemaker.get_waiter("endpoint_in_service").wait(EndpointName=name, WaiterConfig=WAIT)
    return name


def runtime(gateway):
    return boto("sagemaker-runtime", gateway.base_url, retries={"total_max_attempts": 1}, read_timeout=120)


def invoke(gateway, endpoint: str) -> str:
    answer = runtime(gateway).invoke_endpoint(EndpointName=endpoint, Body=SHORT, ContentType="application/json")
    return json.loads(answer["Body"].read())["generated_text"]


def current_instances(sagemaker, endpoint: str) -> int:
    return sagemaker.describe_endpoint(EndpointName=endpoint)["ProductionVariants"][0]["CurrentInstanceCount"]


def error_of(call, **kwargs) -> dict:
    with pytest.raises(ClientError) as raised:
        call(**kwargs)
    return raised.value.response["Error"]


def test_a_serverless_endpoint_keeps_its_config_after_the_config_is_deleted(gateway, sagemaker):
    name = create(sagemaker, "kept", {"ServerlessConfig": SERVERLESS})
    [stored] = sagemaker.describe_endpoint_config(EndpointConfigName=name)["ProductionVariants"]
    assert "InitialInstanceCount" not in stored

    sagemaker.delete_endpoint_config(EndpointConfigName=name)
    [variant] = sagemaker.describe_endpoint(EndpointName=name)["ProductionVariants"]
    assert variant["CurrentServerlessConfig"] == SERVERLESS and variant["DesiredServerlessConfig"] == SERVERLESS
    assert "CurrentInstanceCount" not in variant

    scaling = boto("application-autoscaling", gateway.base_url)
    error = error_of(scaling.register_scalable_target, ServiceNamespace="sagemaker", ScalableDimension=DIMENSION,
                     ResourceId=f"endpoint/{name}/variant/AllTraffic", MinCapacity=1, MaxCapacity=2)
    assert error["Code"] == "ValidationException" and "scales by itself" in error["Message"]
    assert invoke(gateway, name)
    sagemaker.delete_endpoint(EndpointName=name)


def test_a_serverless_variant_refuses_an_instance_count(gateway, sagemaker):
    name = create(sagemaker, "counted", {"ServerlessConfig": SERVERLESS})
    error = error_of(sagemaker.update_endpoint_weights_and_capacities, EndpointName=name,
                     DesiredWeightsAndCapacities=[{"VariantName": "AllTraffic", "DesiredInstanceCount": 2}])
    assert error["Code"] == "ValidationException"
    assert "is serverless: it scales by itself" in error["Message"] and "DesiredWeight alone" in error["Message"]
    assert sagemaker.describe_endpoint(EndpointName=name)["EndpointStatus"] == "InService"
    sagemaker.delete_endpoint(EndpointName=name)


def test_target_tracking_with_min_capacity_0_scales_to_zero_and_back(gateway, sagemaker):
    name = create(sagemaker, "to-zero", {"InitialInstanceCount": 1})
    scaling = boto("application-autoscaling", gateway.base_url)
    target = {"ServiceNamespace": "sagemaker", "ResourceId": f"endpoint/{name}/variant/AllTraffic",
              "ScalableDimension": DIMENSION}
    scaling.register_scalable_target(**target, MinCapacity=0, MaxCapacity=1)
    scaling.put_scaling_policy(**target, PolicyName="to-zero", PolicyType="TargetTrackingScaling",
                               TargetTrackingScalingPolicyConfiguration={
                                   "TargetValue": 4.0, "ScaleInCooldown": 1, "ScaleOutCooldown": 1,
                                   "PredefinedMetricSpecification": {
                                       "PredefinedMetricType": "SageMakerVariantConcurrentRequestsPerModelHighResolution"},
                               })
    assert wait_for(lambda: current_instances(sagemaker, name) == 0, 60), sagemaker.describe_endpoint(EndpointName=name)
    assert wait_for(lambda: gateway.http(timeout=10).get("/health").json()["endpoints"][name]["variants"]
                    ["AllTraffic"]["instances"] == 0, 60)

    assert invoke(gateway, name)  # held while an instance starts, then served by it
    assert current_instances(sagemaker, name) == 1
    assert "starting one for a request" in gateway.log()
    # No load again: back to zero, and the scaling events say so.
    assert wait_for(lambda: current_instances(sagemaker, name) == 0, 60)
    sagemaker.delete_endpoint(EndpointName=name)


def test_min_capacity_below_0_is_refused_saying_why(gateway, sagemaker):
    scaling = boto("application-autoscaling", gateway.base_url)
    error = error_of(scaling.register_scalable_target, ServiceNamespace="sagemaker", ScalableDimension=DIMENSION,
                     ResourceId="endpoint/nowhere/variant/AllTraffic", MinCapacity=0, MaxCapacity=0)
    assert error["Code"] == "ValidationException" and "MaxCapacity (0) must be at least 1" in error["Message"]


# -- MemorySizeInMB held on each instance ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cramped(tmp_path_factory, model_path):
    """Instances may use a fifth of MemorySizeInMB (a test-only setting): about 205 MB of 1024, which the default
    model (some 300 MB resident) goes over as soon as it has loaded."""
    env = {"SERVELET_INSTANCES": "0", "SERVELET_SERVERLESS_MEMORY_LIMIT_SCALE": "0.2"}
    running = start_gateway(tmp_path_factory.mktemp("cramped"), env=env, ready=None)
    yield running
    stop_process(running.process)


def test_an_instance_over_its_memory_size_is_stopped_and_its_request_told_why(cramped):
    sagemaker = boto("sagemaker", cramped.base_url)
    sagemaker.create_model(ModelName="cramped", PrimaryContainer={
        "ModelDataUrl": DEFAULT_MODEL_URI, "Environment": {"SERVELET_MAX_BATCH_SIZE": "4"}})  # fits 1024 MB on paper
    sagemaker.create_endpoint_config(EndpointConfigName="cramped", ProductionVariants=[{
        "VariantName": "AllTraffic", "ModelName": "cramped",
        "ServerlessConfig": {"MemorySizeInMB": 1024, "MaxConcurrency": 2}}])
    sagemaker.create_endpoint(EndpointName="cramped", EndpointConfigName="cramped")
    sagemaker.get_waiter("endpoint_in_service").wait(EndpointName="cramped", WaiterConfig=WAIT)

    client = runtime(cramped)
    with pytest.raises(client.exceptions.ModelError) as stopped:
        client.invoke_endpoint(EndpointName="cramped", Body=LONG, ContentType="application/json")
    message = stopped.value.response["Error"]["Message"]
    assert "went over its MemorySizeInMB: it used" in message and "MB of 205 MB" in message, message
    assert "went over its MemorySizeInMB" in cramped.log()
    # The endpoint stays up: the fleet starts a new instance rather than failing it.
    assert sagemaker.describe_endpoint(EndpointName="cramped")["EndpointStatus"] == "InService"
    assert wait_for(lambda: "starting a replacement" in cramped.log(), 30)


def test_a_serverless_endpoint_comes_back_from_a_restart_with_its_config(tmp_path, model_path):
    env = {"SERVELET_INSTANCES": "0"}
    first = start_gateway(tmp_path, env=env, ready=None)
    try:
        create(boto("sagemaker", first.base_url), "restarted", {"ServerlessConfig": SERVERLESS})
    finally:
        stop_process(first.process)
    second = start_gateway(tmp_path, env=env, ready="restarted")
    try:
        sagemaker = boto("sagemaker", second.base_url)
        sagemaker.delete_endpoint_config(EndpointConfigName="restarted")
        [variant] = sagemaker.describe_endpoint(EndpointName="restarted")["ProductionVariants"]
        assert variant["CurrentServerlessConfig"] == SERVERLESS
        assert invoke(second, "restarted")
    finally:
        stop_process(second.process)
