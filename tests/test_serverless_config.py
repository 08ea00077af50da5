"""Serverless variants' configuration as SageMaker defines it: limits, the memory a model needs, what
DescribeEndpoint shows, and no autoscaling, through boto3, the YAML config and `servelet deploy --serverless`."""

from __future__ import annotations

import os
import subprocess
import textwrap

import pytest
from botocore.exceptions import ClientError
from conftest import SERVELET, boto, start_gateway, stop_process

from servelet.config import ConfigError, load_config
from servelet.settings import DEFAULT_MODEL_URI
from servelet.sizing import serverless_threads

# The default model at its default batch (32 × 2048 tokens) needs about 1,393 MB; at batch 4, about 400 MB.
SMALL_BATCH = {"SERVELET_MAX_BATCH_SIZE": "4"}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, model_path):
    """No instance runs: configs need none, and the sizing reads the GGUF header only."""
    running = start_gateway(tmp_path_factory.mktemp("serverless-config"), args=["--instances", "0"], ready=None)
    yield running
    stop_process(running.process)


@pytest.fixture(scope="module")
def sagemaker(gateway):
    client = boto("sagemaker", gateway.base_url)
    client.create_model(ModelName="gemma", PrimaryContainer={"ModelDataUrl": DEFAULT_MODEL_URI})
    client.create_model(
        ModelName="gemma-batch-4", PrimaryContainer={"ModelDataUrl": DEFAULT_MODEL_URI, "Environment": SMALL_BATCH}
    )
    return client


def serverless_variant(model="gemma-batch-4", **serverless) -> dict:
    return {
        "VariantName": "AllTraffic", "ModelName": model,
        "ServerlessConfig": {"MemorySizeInMB": 2048, "MaxConcurrency": 5} | serverless,
    }


def refusal(call) -> str:
    with pytest.raises(ClientError) as raised:
        call()
    assert raised.value.response["Error"]["Code"] == "ValidationException"
    return raised.value.response["Error"]["Message"]


# -- limits ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("serverless, field, rule", [
    ({"MemorySizeInMB": 1500}, "ServerlessConfig.MemorySizeInMB", "1024 to 6144 MB in steps of 1024"),
    ({"MemorySizeInMB": 8192}, "ServerlessConfig.MemorySizeInMB", "1024 to 6144 MB in steps of 1024"),
    ({"MaxConcurrency": 201}, "ServerlessConfig.MaxConcurrency", "1 to 200"),
    ({"MaxConcurrency": 2, "ProvisionedConcurrency": 3}, "ProvisionedConcurrency 3",
     "it must be 1 to MaxConcurrency (2)"),
])
def test_values_out_of_range_are_refused_naming_the_field_and_its_range(sagemaker, serverless, field, rule):
    message = refusal(lambda: sagemaker.create_endpoint_config(
        EndpointConfigName="out-of-range", ProductionVariants=[serverless_variant(**serverless)]
    ))
    assert field in message and rule in message, message


def test_values_below_botocores_minimum_are_refused_by_the_server_too(gateway, sagemaker):
    # botocore checks minimums itself; a client without that check reaches the server's own.
    unchecked = boto("sagemaker", gateway.base_url, parameter_validation=False)
    for serverless, expected in (({"MemorySizeInMB": 512}, "MemorySizeInMB: 512 is not allowed"),
                                 ({"MaxConcurrency": 0}, "MaxConcurrency: 0 is not allowed: 1 to 200"),
                                 ({"ProvisionedConcurrency": 0}, "ProvisionedConcurrency 0 is not allowed")):
        message = refusal(lambda: unchecked.create_endpoint_config(
            EndpointConfigName="below-minimum", ProductionVariants=[serverless_variant(**serverless)]
        ))
        assert expected in message, message


def test_a_serverless_variant_takes_no_instance_type_or_count(sagemaker):
    variant = serverless_variant() | {"InstanceType": "ml.m5.large", "InitialInstanceCount": 1}
    message = refusal(lambda: sagemaker.create_endpoint_config(EndpointConfigName="mixed", ProductionVariants=[variant]))
    assert "a variant with ServerlessConfig takes no InstanceType and no InitialInstanceCount" in message


# -- memory ----------------------------------------------------------------------------------------------------------
def test_a_model_too_big_for_its_memory_size_is_refused_with_the_figures(sagemaker):
    message = refusal(lambda: sagemaker.create_endpoint_config(
        EndpointConfigName="too-small", ProductionVariants=[serverless_variant("gemma", MemorySizeInMB=1024)]
    ))
    assert "ProductionVariants.0.ServerlessConfig.MemorySizeInMB: model gemma needs about 1,393 MB" in message
    assert "(weights 241 MB + KV cache 1,152 MB for 32 sequences × 2048 tokens)" in message
    assert "but ServerlessConfig.MemorySizeInMB is 1024" in message
    with pytest.raises(ClientError):
        sagemaker.describe_endpoint_config(EndpointConfigName="too-small")


def test_a_smaller_batch_fits_and_the_config_reads_back_as_stored(sagemaker):
    variant = serverless_variant(MemorySizeInMB=1024, MaxConcurrency=4, ProvisionedConcurrency=1)
    sagemaker.create_endpoint_config(EndpointConfigName="fits", ProductionVariants=[variant])
    [stored] = sagemaker.describe_endpoint_config(EndpointConfigName="fits")["ProductionVariants"]
    assert stored["ServerlessConfig"] == {"MemorySizeInMB": 1024, "MaxConcurrency": 4, "ProvisionedConcurrency": 1}
    assert "InitialInstanceCount" not in stored and "InstanceType" not in stored


# -- the endpoint: DescribeEndpoint, autoscaling ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def serverless_endpoint(sagemaker):
    sagemaker.create_endpoint_config(EndpointConfigName="chat", ProductionVariants=[serverless_variant(MaxConcurrency=3)])
    sagemaker.create_endpoint(EndpointName="chat", EndpointConfigName="chat")
    yield "chat"
    sagemaker.delete_endpoint(EndpointName="chat")


def test_describe_endpoint_reports_the_serverless_config_and_no_instance_counts(sagemaker, serverless_endpoint):
    [variant] = sagemaker.describe_endpoint(EndpointName=serverless_endpoint)["ProductionVariants"]
    expected = {"MemorySizeInMB": 2048, "MaxConcurrency": 3}
    assert variant["CurrentServerlessConfig"] == expected and variant["DesiredServerlessConfig"] == expected
    assert "CurrentInstanceCount" not in variant and "DesiredInstanceCount" not in variant


def test_autoscaling_a_serverless_variant_is_refused(gateway, serverless_endpoint):
    scaling = boto("application-autoscaling", gateway.base_url)
    target = {"ServiceNamespace": "sagemaker", "ResourceId": f"endpoint/{serverless_endpoint}/variant/AllTraffic",
              "ScalableDimension": "sagemaker:variant:DesiredInstanceCount"}
    message = refusal(lambda: scaling.register_scalable_target(**target, MinCapacity=1, MaxCapacity=2))
    assert f"endpoint/{serverless_endpoint}/variant/AllTraffic is a serverless variant: it scales by itself" in message
    policy = {"TargetValue": 4.0, "PredefinedMetricSpecification": {
        "PredefinedMetricType": "SageMakerVariantConcurrentRequestsPerModelHighResolution"}}
    message = refusal(lambda: scaling.put_scaling_policy(
        **target, PolicyName="p", PolicyType="TargetTrackingScaling", TargetTrackingScalingPolicyConfiguration=policy
    ))
    assert "is a serverless variant: it scales by itself" in message


# -- `servelet deploy --serverless` ----------------------------------------------------------------------------------
def servelet(*args: str, url: str) -> subprocess.CompletedProcess:
    env = os.environ | {"SERVELET_URL": url, "COLUMNS": "200"}
    return subprocess.run([SERVELET, *args], env=env, capture_output=True, text=True, timeout=120)


def test_deploy_serverless_creates_a_serverless_variant(gateway, sagemaker):
    result = servelet("deploy", DEFAULT_MODEL_URI, "--name", "cli-serverless", "--serverless", "2048:10:2",
                      "--no-wait", url=gateway.base_url)
    assert result.returncode == 0, result.stderr
    try:
        [variant] = sagemaker.describe_endpoint_config(EndpointConfigName="cli-serverless")["ProductionVariants"]
        assert variant["ServerlessConfig"] == {"MemorySizeInMB": 2048, "MaxConcurrency": 10, "ProvisionedConcurrency": 2}
        capacity = "serverless, 2048 MB, up to 10 requests at once, 2 provisioned"
        for command in (["endpoints", "describe", "cli-serverless"], ["endpoints", "list"]):
            shown = servelet(*command, url=gateway.base_url)
            assert capacity in shown.stdout and "instances" not in shown.stdout, shown.stdout + shown.stderr
    finally:
        sagemaker.delete_endpoint(EndpointName="cli-serverless")


@pytest.mark.parametrize("args, message", [
    (["--serverless", "2048"], "--serverless '2048': write MEMORY:CONCURRENCY[:PROVISIONED]"),
    (["--serverless", "3000:10"], "ServerlessConfig.MemorySizeInMB: 3000 is not allowed"),
    (["--serverless", "1024:10"], "model cli-refused needs about 1,393 MB"),
    (["--serverless", "2048:10", "--instances", "2"], "takes no InitialInstanceCount"),
])
def test_deploy_serverless_refusals_name_what_is_wrong(gateway, sagemaker, args, message):
    result = servelet("deploy", DEFAULT_MODEL_URI, "--name", "cli-refused", *args, "--no-wait", url=gateway.base_url)
    assert result.returncode != 0 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    with pytest.raises(ClientError):  # nothing half-made is left behind
        sagemaker.describe_model(ModelName="cli-refused")


# -- the YAML config -------------------------------------------------------------------------------------------------
def config_with(tmp_path, variant: str, environment: str = "{}"):
    path = tmp_path / "servelet.yaml"
    path.write_text(textwrap.dedent(f"""
        models:
          - {{name: gemma, uri: {DEFAULT_MODEL_URI}, environment: {environment}}}
        endpoints:
          - name: chat
            variants:
              - {variant}
    """))
    return path


@pytest.mark.parametrize("variant, message", [
    ("{name: a, model: gemma, serverless: {memory_size_mb: 1500}}",
     "endpoints[0].variants[0].serverless: memory_size_mb: 1500 is not allowed: 1024 to 6144 MB in steps of 1024"),
    ("{name: a, model: gemma, serverless: {max_concurrency: 2, provisioned_concurrency: 3}}",
     "provisioned_concurrency 3 is not allowed: it must be 1 to max_concurrency (2)"),
    ("{name: a, model: gemma, instances: 2, serverless: {}}",
     "endpoints[0].variants[0]: a variant with serverless takes no instances"),
])
def test_the_config_file_reaches_the_same_rules(tmp_path, model_path, variant, message):
    with pytest.raises(ConfigError) as raised:
        load_config(config_with(tmp_path, variant))
    assert message in str(raised.value), raised.value


def test_the_config_file_meets_the_memory_check_of_every_endpoint_config(tmp_path, model_path):
    """The control plane checks the memory size of each endpoint config it creates, the config file's included."""
    path = config_with(tmp_path, "{name: a, model: gemma, serverless: {memory_size_mb: 1024}}")
    with pytest.raises(RuntimeError) as refused:
        start_gateway(tmp_path / "gateway", args=["--instances", "0", "--config", str(path)], ready=None)
    assert "ProductionVariants.0.ServerlessConfig.MemorySizeInMB: model gemma needs about 1,393 MB" in str(refused.value)


def test_the_config_file_accepts_a_serverless_variant_that_fits(tmp_path, model_path):
    config = load_config(config_with(tmp_path, "{name: a, model: gemma, serverless: {memory_size_mb: 1024}}",
                                     "{SERVELET_MAX_BATCH_SIZE: 4}"))
    [variant] = config.endpoints[0].spec().production_variants
    assert variant.serverless_config.memory_size_in_mb == 1024


# -- CPU in proportion to memory ---------------------------------------------------------------------------------
@pytest.mark.parametrize("memory_mb, cores, threads", [
    (1024, 16, 1), (3538, 16, 2), (6144, 16, 3), (10240, 16, 5), (6144, 2, 2), (1024, 1, 1),
])
def test_threads_follow_memory_as_lambda_gives_cpu(memory_mb, cores, threads):
    assert serverless_threads(memory_mb, cores) == threads
