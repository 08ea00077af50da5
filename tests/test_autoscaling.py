"""Autoscaling as users set it up: boto3's `application-autoscaling` client, the CLI and the YAML file; a variant
scales out under steady load and back in when it stops, with no failed request."""

from __future__ import annotations

import asyncio
import json
import textwrap

import httpx
import pytest
from botocore.exceptions import ClientError
from conftest import Load, boto, start_gateway, stop_process, wait_for
from test_cli import servelet

from servelet.control.autoscaler import CONCURRENCY, INVOCATIONS, ScalableTarget, ScalingPolicy
from servelet.control.endpoints import Fleet
from servelet.control.plane import ControlPlane
from servelet.control.resources import EndpointRecord, SuspendedState, VariantState
from servelet.control.store import Store
from servelet.settings import DEFAULT_MODEL_URI

RESOURCE = "endpoint/default/variant/AllTraffic"
DIMENSION = "sagemaker:variant:DesiredInstanceCount"
TARGET = {"ServiceNamespace": "sagemaker", "ResourceId": RESOURCE, "ScalableDimension": DIMENSION}
# Long enough that three callers keep one instance busy; ignore_eos so that each takes as long.
LONG_PROMPT = json.dumps({"inputs": "Tell me a story.", "parameters": {"max_new_tokens": 64, "ignore_eos": True}})



@pytest.fixture(scope="module")
def gateway(tmp_path_factory, model_path):
    """`default` (variant AllTraffic, one instance) with the policies checked every half second."""
    # One llama.cpp thread per instance: two instances on the 2 cores, never more threads than cores (more would
    # spin waiting on each other and slow generation many times over; the gateway warns of that).
    env = {"SERVELET_AUTOSCALE_INTERVAL": "0.5", "SERVELET_THREADS": "1"}
    running = start_gateway(tmp_path_factory.mktemp("autoscaling"), env=env)
    yield running
    stop_process(running.process)


@pytest.fixture(scope="module")
def scaling(gateway):
    return boto("application-autoscaling", gateway.base_url)


@pytest.fixture(scope="module")
def sagemaker(gateway):
    return boto("sagemaker", gateway.base_url)


def instances(sagemaker) -> tuple[int, int]:
    """(current, desired) instance counts of default's variant."""
    variant = sagemaker.describe_endpoint(EndpointName="default")["ProductionVariants"][0]
    return variant["CurrentInstanceCount"], variant["DesiredInstanceCount"]


def status(sagemaker) -> str:
    return sagemaker.describe_endpoint(EndpointName="default")["EndpointStatus"]


def long_generation(runtime) -> str:
    answer = runtime.invoke_endpoint(EndpointName="default", Body=LONG_PROMPT, ContentType="application/json")
    text = json.loads(answer["Body"].read())["generated_text"]
    assert text
    return text


# -- the user's story ---------------------------------------------------------------------------------------------
def test_a_variant_scales_out_under_load_and_back_in_after(gateway, scaling, sagemaker):
    scaling.register_scalable_target(**TARGET, MinCapacity=1, MaxCapacity=2)
    scaling.put_scaling_policy(
        **TARGET, PolicyName="concurrency", PolicyType="TargetTrackingScaling",
        TargetTrackingScalingPolicyConfiguration={
            "TargetValue": 1.0, "PredefinedMetricSpecification": {"PredefinedMetricType": CONCURRENCY},
            "ScaleOutCooldown": 1, "ScaleInCooldown": 4,
        },
    )
    assert instances(sagemaker) == (1, 1)
    runtime = boto("sagemaker-runtime", gateway.base_url, retries={"total_max_attempts": 1}, read_timeout=120)
    with Load(lambda: long_generation(runtime), threads=3, seconds=150) as load:
        assert wait_for(lambda: instances(sagemaker) == (2, 2), 90, poll=0.5), gateway.log()[-3000:]
        served = len(load.served)
        assert wait_for(lambda: len(load.served) >= served + 3, 60)  # both instances answer
    # Scaled in: the removed instance takes no new request at once, and the endpoint is Updating until it stops.
    assert wait_for(lambda: instances(sagemaker) == (1, 1) and status(sagemaker) == "InService", 60, poll=0.5), gateway.log()[-3000:]
    assert load.failures == []

    activities = scaling.describe_scaling_activities(ServiceNamespace="sagemaker", ResourceId=RESOURCE)["ScalingActivities"]
    moves = [(a["Description"], a["StatusCode"]) for a in activities]
    assert moves[:2] == [("Setting desired instance count to 1 (scale in).", "Successful"),
                         ("Setting desired instance count to 2 (scale out).", "Successful")]
    assert "concurrent requests per instance was" in activities[1]["Cause"]

    # DescribeEndpoint names the events (a servelet extension that botocore drops, as it must).
    raw = httpx.post(gateway.base_url + "/", json={"EndpointName": "default"},
                     headers={"X-Amz-Target": "SageMaker.DescribeEndpoint", "Content-Type": "application/x-amz-json-1.1"}).json()
    assert [(e["Variant"], e["From"], e["To"]) for e in raw["ScalingEvents"]][-2:] == [("AllTraffic", 1, 2), ("AllTraffic", 2, 1)]
    assert "ScalingEvents" not in sagemaker.describe_endpoint(EndpointName="default")

    text = httpx.get(gateway.base_url + "/metrics").text
    for direction in ("out", "in"):
        assert f'servelet_scaling_events_total{{direction="{direction}",endpoint="default",variant="AllTraffic"}} 1.0' in text
    assert 'servelet_autoscaling_desired_instances{endpoint="default",variant="AllTraffic"} 1.0' in text
    assert "autoscaling: endpoint default variant AllTraffic scales out from 1 to 2" in gateway.log()

    policies = scaling.describe_scaling_policies(ServiceNamespace="sagemaker", ResourceId=RESOURCE)["ScalingPolicies"]
    assert [(p["PolicyName"], p["TargetTrackingScalingPolicyConfiguration"]["TargetValue"]) for p in policies] == [("concurrency", 1.0)]
    scaling.delete_scaling_policy(**TARGET, PolicyName="concurrency")
    scaling.deregister_scalable_target(**TARGET)
    assert scaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"] == []


def test_bad_registrations_are_refused(scaling):
    def refused(call, code: str, message: str, **kwargs) -> None:
        with pytest.raises(ClientError) as error:
            call(**kwargs)
        assert error.value.response["Error"]["Code"] == code
        assert message in error.value.response["Error"]["Message"]

    register = scaling.register_scalable_target
    refused(register, "ValidationException", 'Could not find endpoint', ServiceNamespace="sagemaker",
            ResourceId="endpoint/nowhere/variant/AllTraffic", ScalableDimension=DIMENSION, MinCapacity=1, MaxCapacity=2)
    refused(register, "ValidationException", "has no variant 'blue' (it has: AllTraffic)", ServiceNamespace="sagemaker",
            ResourceId="endpoint/default/variant/blue", ScalableDimension=DIMENSION, MinCapacity=1, MaxCapacity=2)
    refused(register, "ValidationException", "MinCapacity (3) is above MaxCapacity (2)", **TARGET, MinCapacity=3, MaxCapacity=2)
    refused(register, "ValidationException", "MaxCapacity (65) is above the limit of 64", **TARGET, MinCapacity=1, MaxCapacity=65)
    refused(register, "ValidationException", "write endpoint/ENDPOINT_NAME/variant/VARIANT_NAME",
            ServiceNamespace="sagemaker", ResourceId="default", ScalableDimension=DIMENSION, MinCapacity=1, MaxCapacity=2)
    refused(register, "ValidationException", "servelet scales SageMaker variants only",
            ServiceNamespace="ecs", ResourceId="service/c/s", ScalableDimension="ecs:service:DesiredCount", MinCapacity=1, MaxCapacity=2)

    policy = {"PolicyName": "p", "PolicyType": "TargetTrackingScaling", "TargetTrackingScalingPolicyConfiguration": {
        "TargetValue": 5.0, "PredefinedMetricSpecification": {"PredefinedMetricType": INVOCATIONS}}}
    refused(scaling.put_scaling_policy, "ObjectNotFoundException", "register it first", **TARGET, **policy)
    scaling.register_scalable_target(**TARGET, MinCapacity=1, MaxCapacity=2)
    try:
        unknown = json.loads(json.dumps(policy))
        unknown["TargetTrackingScalingPolicyConfiguration"]["PredefinedMetricSpecification"]["PredefinedMetricType"] = "ECSServiceAverageCPUUtilization"
        refused(scaling.put_scaling_policy, "ValidationException", "is not one servelet measures", **TARGET, **unknown)
        refused(scaling.put_scaling_policy, "ValidationException", "servelet runs TargetTrackingScaling policies",
                **TARGET, PolicyName="s", PolicyType="StepScaling")
        refused(scaling.delete_scaling_policy, "ObjectNotFoundException", "No scaling policy found", **TARGET, PolicyName="p")
    finally:
        scaling.deregister_scalable_target(**TARGET)
    refused(scaling.deregister_scalable_target, "ObjectNotFoundException", "No scalable target found", **TARGET)


def test_suspended_scaling_is_kept_and_shown(scaling):
    """SuspendedState is honoured (it was refused by name): kept until a registration gives another."""
    suspended = {"DynamicScalingInSuspended": True, "DynamicScalingOutSuspended": False, "ScheduledScalingSuspended": False}
    scaling.register_scalable_target(**TARGET, MinCapacity=1, MaxCapacity=2, SuspendedState=suspended)
    try:
        scaling.register_scalable_target(**TARGET, MaxCapacity=3)  # no SuspendedState: the one given stays
        [target] = scaling.describe_scalable_targets(ServiceNamespace="sagemaker", ResourceIds=[RESOURCE])["ScalableTargets"]
        assert target["SuspendedState"] == suspended and target["MaxCapacity"] == 3
    finally:
        scaling.deregister_scalable_target(**TARGET)


def test_a_suspended_direction_stops_the_policy_but_not_a_return_inside_the_bounds():
    target = ScalableTarget(endpoint_name="e", variant_name="v", min_capacity=2, max_capacity=4)
    assert target.policy_may_move(2, 3) and target.policy_may_move(3, 2)
    target.suspended_state = SuspendedState(dynamic_scaling_out_suspended=True)
    assert not target.policy_may_move(2, 3) and target.policy_may_move(3, 2)
    assert target.policy_may_move(1, 2)  # below MinCapacity: back inside the bounds
    target.suspended_state = SuspendedState(dynamic_scaling_in_suspended=True)
    assert not target.policy_may_move(3, 2) and target.policy_may_move(2, 3)
    assert target.policy_may_move(5, 4)  # above MaxCapacity


def test_the_cli_turns_autoscaling_on_and_off(gateway, scaling):
    on = servelet("autoscale", "default", "--variant", "AllTraffic", "--min", "1", "--max", "3",
                  "--target-invocations-per-minute", "600", "--scale-in-cooldown", "120", url=gateway.base_url)
    assert on.returncode == 0, on.stderr
    assert "autoscales between 1 and 3 instances, target 600 invocations per instance per minute" in on.stdout
    (policy,) = scaling.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"]
    tracking = policy["TargetTrackingScalingPolicyConfiguration"]
    assert (policy["ResourceId"], tracking["PredefinedMetricSpecification"]["PredefinedMetricType"]) == (RESOURCE, INVOCATIONS)
    assert (tracking["TargetValue"], tracking["ScaleInCooldown"]) == (600.0, 120)

    described = servelet("endpoints", "describe", "default", url=gateway.base_url)
    assert "autoscaling: 1..3 instances, target 600 invocations per instance per minute" in described.stdout, described.stdout

    for args, message in [
        (["--min", "1", "--max", "2"], "give one target"),
        (["--min", "2", "--max", "1", "--target-concurrency", "2"], "MinCapacity (2) is above MaxCapacity (1)"),
        (["--variant", "blue", "--min", "1", "--max", "2", "--target-concurrency", "2"], "has no variant 'blue'"),
    ]:
        result = servelet("autoscale", "default", *args, url=gateway.base_url)
        assert result.returncode != 0 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr

    off = servelet("autoscale", "default", "--off", url=gateway.base_url)
    assert off.returncode == 0 and "autoscaling of endpoint default variant AllTraffic is off" in off.stdout, off.stderr
    assert scaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"] == []
    again = servelet("autoscale", "default", "--off", url=gateway.base_url)
    assert again.returncode != 0 and "is not autoscaled" in again.stderr


def test_the_config_file_registers_a_policy_that_survives_a_restart(tmp_path):
    config = tmp_path / "servelet.yaml"
    config.write_text(textwrap.dedent(f"""
        models:
          - name: small
            uri: {DEFAULT_MODEL_URI}
        endpoints:
          - name: default
            variants:
              - name: main
                model: small
                autoscaling:
                  min_instances: 1
                  max_instances: 2
                  target_concurrent_requests_per_instance: 4
                  scale_in_cooldown_s: 30
    """))
    running = start_gateway(tmp_path, args=["--config", str(config)])
    try:
        scaling = boto("application-autoscaling", running.base_url)
        (target,) = scaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
        assert (target["ResourceId"], target["MinCapacity"], target["MaxCapacity"]) == ("endpoint/default/variant/main", 1, 2)
        (policy,) = scaling.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"]
        tracking = policy["TargetTrackingScalingPolicyConfiguration"]
        assert policy["PolicyName"] == "servelet-config"
        assert (tracking["PredefinedMetricSpecification"]["PredefinedMetricType"], tracking["TargetValue"]) == (CONCURRENCY, 4.0)
        assert tracking["ScaleInCooldown"] == 30
    finally:
        stop_process(running.process)
    store = Store(Store.default_url(tmp_path / "data"))
    try:
        (kept,) = store.list_scaling_targets()
        assert (kept.resource_id, kept.policy.policy_name) == ("endpoint/default/variant/main", "servelet-config")
    finally:
        store.close()


def test_deleting_an_endpoint_removes_its_scaling_targets(tmp_path):
    async def story() -> list:
        store = Store(f"sqlite:///{tmp_path / 'store.db'}")
        plane = ControlPlane(store, Fleet(tmp_path))
        store.add_endpoint(EndpointRecord(endpoint_name="gone", endpoint_config_name="c", production_variants=[
            VariantState(variant_name="v", current_weight=1, desired_weight=1, desired_instance_count=1)]))
        target = ScalableTarget(endpoint_name="gone", variant_name="v", min_capacity=1, max_capacity=2,
                                policy=ScalingPolicy(policy_name="p", metric=CONCURRENCY, target_value=2))
        store.save_scaling_target(target)
        assert [t.resource_id for t in store.list_scaling_targets("gone")] == ["endpoint/gone/variant/v"]
        await plane.delete_endpoint("gone")
        left = store.list_scaling_targets()
        store.close()
        return left

    assert asyncio.run(story()) == []
