"""Safe updates through boto3: blue/green UpdateEndpoint under load, rollbacks (a model that cannot load, an alarm
that fires), and UpdateEndpointWeightsAndCapacities with Target-Variant pins."""

from __future__ import annotations

import json
import time

import pytest
from botocore.exceptions import ClientError
from conftest import Load, boto, start_gateway, stop_process, wait_for

from servelet.control.deployer import Alarm, Policy
from servelet.control.endpoints import Deployment, Endpoint, Outcomes, Variant
from servelet.control.resources import DeploymentConfig
from servelet.errors import ResourceInvalid
from servelet.settings import DEFAULT_MODEL_URI

PROMPT = json.dumps({"inputs": "The capital of France is", "parameters": {"max_new_tokens": 2}})
WAIT = {"Delay": 1, "MaxAttempts": 120}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, model_path):
    """One gateway for the module; blue and green fleets run side by side, so each instance gets one thread
    (more threads than cores would spin waiting on each other)."""
    running = start_gateway(tmp_path_factory.mktemp("updates"), env={"SERVELET_THREADS": "1"})
    yield running
    stop_process(running.process)


@pytest.fixture(scope="module")
def sagemaker(gateway):
    return boto("sagemaker", gateway.base_url)


@pytest.fixture(scope="module")
def runtime(gateway):
    # No retries: a request that fails must be seen failing.
    return boto("sagemaker-runtime", gateway.base_url, retries={"total_max_attempts": 1}, read_timeout=120)


def invoke(runtime, endpoint: str, **kwargs) -> str:
    """The variant that answered."""
    answer = runtime.invoke_endpoint(EndpointName=endpoint, Body=PROMPT, ContentType="application/json", **kwargs)
    assert json.loads(answer["Body"].read())["generated_text"]
    return answer["InvokedProductionVariant"]


def config(sagemaker, name: str, *variants: tuple[str, str]) -> str:
    sagemaker.create_endpoint_config(EndpointConfigName=name, ProductionVariants=[
        {"VariantName": v, "ModelName": m, "InitialInstanceCount": 1, "InstanceType": "ml.m5.large"} for v, m in variants
    ])
    return name


def canary(wait: int, termination: int = 1, percent: int = 50, alarms: tuple[str, ...] = ()) -> dict:
    deployment = {"BlueGreenUpdatePolicy": {
        "TrafficRoutingConfiguration": {
            "Type": "CANARY", "WaitIntervalInSeconds": wait, "CanarySize": {"Type": "CAPACITY_PERCENT", "Value": percent},
        },
        "TerminationWaitInSeconds": termination,
        "MaximumExecutionTimeoutInSeconds": 600,
    }}
    if alarms:
        deployment["AutoRollbackConfiguration"] = {"Alarms": [{"AlarmName": a} for a in alarms]}
    return deployment


@pytest.fixture(scope="module")
def endpoint(sagemaker):
    """The endpoint `shop` on config `shop-v1` (variant `blue`), InService."""
    sagemaker.create_model(ModelName="shop-model", PrimaryContainer={"ModelDataUrl": DEFAULT_MODEL_URI})
    config(sagemaker, "shop-v1", ("blue", "shop-model"))
    sagemaker.create_endpoint(EndpointName="shop", EndpointConfigName="shop-v1")
    sagemaker.get_waiter("endpoint_in_service").wait(EndpointName="shop", WaiterConfig=WAIT)
    return "shop"


# -- the user's story: a canary update under steady load ------------------------------------------------------------
def test_a_canary_update_under_steady_load_fails_no_request(sagemaker, runtime, endpoint):
    config(sagemaker, "shop-v2", ("green", "shop-model"))
    with Load(lambda: invoke(runtime, endpoint), threads=2, seconds=180) as load:
        assert wait_for(lambda: len(load.served) >= 4, 60)
        sagemaker.update_endpoint(EndpointName=endpoint, EndpointConfigName="shop-v2", DeploymentConfig=canary(wait=2))
        updating = sagemaker.describe_endpoint(EndpointName=endpoint)
        assert updating["EndpointStatus"] == "Updating"
        assert updating["EndpointConfigName"] == "shop-v1"  # until the update is done
        assert updating["PendingDeploymentSummary"]["EndpointConfigName"] == "shop-v2"
        sagemaker.get_waiter("endpoint_in_service").wait(EndpointName=endpoint, WaiterConfig=WAIT)
        served_during_update = len(load.served)
        assert wait_for(lambda: len(load.served) >= served_during_update + 4, 60)
    assert load.failures == []
    assert {"blue", "green"} <= set(load.served)
    assert load.served[-4:] == ["green"] * 4

    described = sagemaker.describe_endpoint(EndpointName=endpoint)
    assert described["EndpointStatus"] == "InService" and "FailureReason" not in described
    assert described["EndpointConfigName"] == "shop-v2"
    assert [(v["VariantName"], v["CurrentInstanceCount"]) for v in described["ProductionVariants"]] == [("green", 1)]
    routing = described["LastDeploymentConfig"]["BlueGreenUpdatePolicy"]["TrafficRoutingConfiguration"]
    assert routing["Type"] == "CANARY" and routing["CanarySize"] == {"Type": "CAPACITY_PERCENT", "Value": 50}
    assert "PendingDeploymentSummary" not in described
    assert invoke(runtime, endpoint) == "green"


# -- rollbacks -------------------------------------------------------------------------------------------------------
def wait_for_rollback(sagemaker, runtime, endpoint: str) -> tuple[dict, set[str]]:
    """Invoke while the update runs (the alarms need requests); the final description and the statuses seen."""
    seen = set()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        described = sagemaker.describe_endpoint(EndpointName=endpoint)
        seen.add(described["EndpointStatus"])
        if described["EndpointStatus"] == "InService":
            return described, seen
        invoke(runtime, endpoint)
    raise AssertionError(f"the endpoint never came back InService (seen: {seen})")


def test_an_update_whose_model_cannot_load_rolls_back(sagemaker, runtime, endpoint):
    sagemaker.create_model(ModelName="lost-model", PrimaryContainer={"ModelDataUrl": "/nowhere/lost-model.gguf"})
    config(sagemaker, "shop-lost", ("lost", "lost-model"))
    before = sagemaker.describe_endpoint(EndpointName=endpoint)["EndpointConfigName"]
    sagemaker.update_endpoint(EndpointName=endpoint, EndpointConfigName="shop-lost", DeploymentConfig=canary(wait=1))
    described, seen = wait_for_rollback(sagemaker, runtime, endpoint)
    assert "Updating" in seen
    assert described["EndpointConfigName"] == before
    assert "did not start" in described["FailureReason"] and "shop-lost" in described["FailureReason"]
    assert [v["VariantName"] for v in described["ProductionVariants"]] == ["green"]
    assert invoke(runtime, endpoint) == "green"


def test_an_alarm_that_fires_rolls_the_update_back(sagemaker, runtime, endpoint):
    config(sagemaker, "shop-v3", ("purple", "shop-model"))
    alarm = "servelet:p99-latency>0.000001,min-requests=1"
    sagemaker.update_endpoint(
        EndpointName=endpoint, EndpointConfigName="shop-v3", DeploymentConfig=canary(wait=30, termination=30, alarms=(alarm,))
    )
    described, seen = wait_for_rollback(sagemaker, runtime, endpoint)
    assert described["EndpointConfigName"] == "shop-v2"
    assert f"alarm {alarm} fired" in described["FailureReason"]
    assert described["LastDeploymentConfig"]["AutoRollbackConfiguration"]["Alarms"] == [{"AlarmName": alarm}]
    assert invoke(runtime, endpoint) == "green"


def test_alarms_servelet_cannot_evaluate_are_refused(sagemaker, endpoint):
    config(sagemaker, "shop-v4", ("v4", "shop-model"))
    with pytest.raises(ClientError) as refused:
        sagemaker.update_endpoint(EndpointName=endpoint, EndpointConfigName="shop-v4",
                                  DeploymentConfig=canary(wait=1, alarms=("my-cloudwatch-5xx-alarm",)))
    error = refused.value.response["Error"]
    assert error["Code"] == "ValidationException"
    assert "'my-cloudwatch-5xx-alarm'" in error["Message"] and "servelet:error-rate>" in error["Message"]
    assert sagemaker.describe_endpoint(EndpointName=endpoint)["EndpointStatus"] == "InService"


def test_an_update_of_an_updating_endpoint_is_refused(sagemaker, endpoint):
    sagemaker.update_endpoint(EndpointName=endpoint, EndpointConfigName="shop-v4", DeploymentConfig=canary(wait=1))
    with pytest.raises(ClientError) as refused:
        sagemaker.update_endpoint(EndpointName=endpoint, EndpointConfigName="shop-v4")
    assert refused.value.response["Error"]["Message"].startswith("Cannot update in-progress endpoint")
    sagemaker.get_waiter("endpoint_in_service").wait(EndpointName=endpoint, WaiterConfig=WAIT)
    assert sagemaker.describe_endpoint(EndpointName=endpoint)["EndpointConfigName"] == "shop-v4"


def test_a_restart_during_an_update_brings_the_endpoint_back_on_its_old_config(tmp_path):
    first = start_gateway(tmp_path)
    try:
        sagemaker = boto("sagemaker", first.base_url)
        sagemaker.create_model(ModelName="r-model", PrimaryContainer={"ModelDataUrl": DEFAULT_MODEL_URI})
        config(sagemaker, "r-v1", ("one", "r-model"))
        config(sagemaker, "r-v2", ("two", "r-model"))
        sagemaker.create_endpoint(EndpointName="r", EndpointConfigName="r-v1")
        sagemaker.get_waiter("endpoint_in_service").wait(EndpointName="r", WaiterConfig=WAIT)
        sagemaker.update_endpoint(EndpointName="r", EndpointConfigName="r-v2", DeploymentConfig=canary(wait=600))
        assert sagemaker.describe_endpoint(EndpointName="r")["EndpointStatus"] == "Updating"
    finally:
        stop_process(first.process)

    second = start_gateway(tmp_path, args=["--instances", "0"])
    try:
        sagemaker = boto("sagemaker", second.base_url)
        described = sagemaker.describe_endpoint(EndpointName="r")
        assert (described["EndpointStatus"], described["EndpointConfigName"]) == ("InService", "r-v1")
        assert "interrupted by a restart" in described["FailureReason"] and "PendingDeploymentSummary" not in described
        runtime = boto("sagemaker-runtime", second.base_url, retries={"total_max_attempts": 1})
        assert wait_for(lambda: sagemaker.describe_endpoint(EndpointName="r")["ProductionVariants"][0]
                        ["CurrentInstanceCount"] == 1, 60)
        assert invoke(runtime, "r") == "one"
    finally:
        stop_process(second.process)


# -- weights and capacities --------------------------------------------------------------------------------------------
def test_weights_and_instance_counts_change_and_target_variant_pins(sagemaker, runtime, endpoint):
    config(sagemaker, "pair", ("a", "shop-model"), ("b", "shop-model"))
    sagemaker.create_endpoint(EndpointName="pair", EndpointConfigName="pair")
    sagemaker.get_waiter("endpoint_in_service").wait(EndpointName="pair", WaiterConfig=WAIT)

    sagemaker.update_endpoint_weights_and_capacities(
        EndpointName="pair", DesiredWeightsAndCapacities=[{"VariantName": "a", "DesiredWeight": 0.0}]
    )
    assert {invoke(runtime, "pair") for _ in range(10)} == {"b"}
    assert invoke(runtime, "pair", TargetVariant="a") == "a"
    weights = {v["VariantName"]: (v["CurrentWeight"], v["DesiredWeight"])
               for v in sagemaker.describe_endpoint(EndpointName="pair")["ProductionVariants"]}
    assert weights == {"a": (0.0, 0.0), "b": (1.0, 1.0)}

    sagemaker.update_endpoint_weights_and_capacities(
        EndpointName="pair", DesiredWeightsAndCapacities=[{"VariantName": "b", "DesiredInstanceCount": 2}]
    )
    assert sagemaker.describe_endpoint(EndpointName="pair")["EndpointStatus"] == "Updating"
    sagemaker.get_waiter("endpoint_in_service").wait(EndpointName="pair", WaiterConfig=WAIT)
    counts = {v["VariantName"]: (v["CurrentInstanceCount"], v["DesiredInstanceCount"])
              for v in sagemaker.describe_endpoint(EndpointName="pair")["ProductionVariants"]}
    assert counts == {"a": (1, 1), "b": (2, 2)}

    with Load(lambda: invoke(runtime, "pair"), threads=2, seconds=180) as load:
        assert wait_for(lambda: len(load.served) >= 4, 60)
        sagemaker.update_endpoint_weights_and_capacities(
            EndpointName="pair", DesiredWeightsAndCapacities=[{"VariantName": "b", "DesiredInstanceCount": 1}]
        )
        sagemaker.get_waiter("endpoint_in_service").wait(EndpointName="pair", WaiterConfig=WAIT)
        served = len(load.served)
        assert wait_for(lambda: len(load.served) >= served + 4, 60)
    assert load.failures == []
    counts = {v["VariantName"]: (v["CurrentInstanceCount"], v["DesiredInstanceCount"])
              for v in sagemaker.describe_endpoint(EndpointName="pair")["ProductionVariants"]}
    assert counts == {"a": (1, 1), "b": (1, 1)}

    for bad, message in [
        ([{"VariantName": "zzz", "DesiredWeight": 1.0}], "'zzz'"),
        ([{"VariantName": "b", "DesiredWeight": 0.0}], "sum to 0"),
        ([{"VariantName": "b"}], "DesiredWeight, a DesiredInstanceCount or both"),
    ]:
        with pytest.raises(ClientError) as refused:
            sagemaker.update_endpoint_weights_and_capacities(EndpointName="pair", DesiredWeightsAndCapacities=bad)
        assert refused.value.response["Error"]["Code"] == "ValidationException"
        assert message in refused.value.response["Error"]["Message"]
    sagemaker.delete_endpoint(EndpointName="pair")


# -- the pieces, without processes ------------------------------------------------------------------------------------
def policy(routing: dict, alarms: tuple[str, ...] = ()) -> Policy:
    body = {"BlueGreenUpdatePolicy": {"TrafficRoutingConfiguration": {"WaitIntervalInSeconds": 1} | routing}}
    if alarms:
        body["AutoRollbackConfiguration"] = {"Alarms": [{"AlarmName": a} for a in alarms]}
    return Policy.of(DeploymentConfig.model_validate(body))


def test_traffic_shifts_follow_the_policy():
    assert Policy.of(None).shares(3) == [1.0]
    assert policy({"Type": "ALL_AT_ONCE"}).shares(3) == [1.0]
    assert policy({"Type": "CANARY", "CanarySize": {"Type": "CAPACITY_PERCENT", "Value": 10}}).shares(3) == [0.1, 1.0]
    assert policy({"Type": "CANARY", "CanarySize": {"Type": "INSTANCE_COUNT", "Value": 1}}).shares(4) == [0.25, 1.0]
    assert policy({"Type": "CANARY", "CanarySize": {"Type": "INSTANCE_COUNT", "Value": 5}}).shares(4) == [1.0]
    linear = policy({"Type": "LINEAR", "LinearStepSize": {"Type": "CAPACITY_PERCENT", "Value": 30}}).shares(1)
    assert linear == pytest.approx([0.3, 0.6, 0.9, 1.0])
    assert policy({"Type": "LINEAR", "LinearStepSize": {"Type": "INSTANCE_COUNT", "Value": 1}}).shares(2) == [0.5, 1.0]


def test_alarms_read_the_green_fleets_outcomes():
    outcomes = Outcomes(seconds=60)
    errors = Alarm.parse("servelet:error-rate>0.25,min-requests=3")
    latency = Alarm.parse("servelet:p99-latency > 2.5 , min-requests=3")
    assert errors.fired(outcomes) is None and latency.fired(outcomes) is None  # no requests, no alarm
    for failed, seconds in [(False, 0.1), (False, 0.2), (True, 3.0)]:
        outcomes.record(failed, seconds)
    assert "error-rate was 33.3%" in errors.fired(outcomes)
    assert "p99-latency was 3 s" in latency.fired(outcomes)
    outcomes.record(False, 0.1)
    assert errors.fired(outcomes) is None
    for name in ("HighErrorRate", "servelet:error-rate<0.5", "servelet:p50-latency>1",
                 "servelet:error-rate>0.5,min-requests=0", "servelet:error-rate>0.5,min=3"):
        with pytest.raises(ResourceInvalid):
            Alarm.parse(name)


def test_an_alarm_waits_for_enough_requests_before_it_judges():
    """One failed request among a canary's first few is not a 100 % error rate (default: 20 requests)."""
    outcomes = Outcomes(seconds=60)
    alarm = Alarm.parse("servelet:error-rate>0.05")
    outcomes.record(True, 0.1)
    assert alarm.fired(outcomes) is None
    for _ in range(18):
        outcomes.record(False, 0.1)
    assert alarm.fired(outcomes) is None  # 19 requests: not judged yet
    outcomes.record(True, 0.1)
    assert "error-rate was 10.0% over its last 20 requests" in alarm.fired(outcomes)


def test_a_pinned_variant_prefers_green_while_green_takes_traffic():
    class Ready:
        ready = True

        def __init__(self, name):
            self.name = name

    blue = Deployment([Variant("main", "m", instances=[Ready("blue-0")]), Variant("old", "m", instances=[Ready("o")])])
    green = Deployment([Variant("main", "m", instances=[Ready("green-0")])])
    endpoint = Endpoint("e", blue, green, green_share=0.0)
    assert endpoint.route("main")[0] is blue  # green takes no traffic yet
    endpoint.green_share = 0.1
    assert endpoint.route("main")[0] is green
    assert endpoint.route("old")[0] is blue  # only blue has it
    endpoint.green_share = 1.0
    assert {endpoint.route()[0] is green for _ in range(20)} == {True}
    green.variants[0].instances[0].ready = False  # green lost its instance: blue answers
    assert endpoint.route()[0] is blue
