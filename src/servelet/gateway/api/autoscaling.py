"""Application Auto Scaling as `boto3.client("application-autoscaling")` sends it, for SageMaker variants.

The same AWS JSON 1.1 as the SageMaker control API (`POST /`), told apart by `X-Amz-Target:
AnyScaleFrontendService.<Operation>`; this module registers its operations with that route. Only the
`sagemaker` namespace and the `sagemaker:variant:DesiredInstanceCount` dimension exist here, and only
target-tracking policies on the predefined metrics servelet measures (see `control/autoscaler.py`).
"""

from __future__ import annotations

import asyncio
from typing import Literal

from pydantic import Field

from ...control.autoscaler import (
    DIMENSION,
    NAMESPACE,
    ScalableTarget,
    ScalingPolicy,
    parse_resource_id,
    target_errors,
)
from ...control.plane import ControlPlane
from ...control.resources import CUSTOMIZED_METRICS, Resource, SuspendedState
from .sagemaker_control import Operation, epoch, invalid, operation, request_input

TARGET_PREFIX = "AnyScaleFrontendService."
OPERATIONS: dict[str, Operation] = {}
ACCOUNT = "arn:aws:application-autoscaling:local:000000000000"


class Scope(Resource):
    service_namespace: str
    resource_id: str | None = None
    scalable_dimension: str | None = None

    def variant(self) -> tuple[str, str]:
        """The (endpoint, variant) named; refuses namespaces and dimensions other than SageMaker variants'."""
        if self.resource_id is None:
            raise invalid("ResourceId: required (endpoint/ENDPOINT_NAME/variant/VARIANT_NAME)")
        return parse_resource_id(self.resource_id)

    def check(self) -> "Scope":
        if self.service_namespace != NAMESPACE:
            raise invalid(f"ServiceNamespace {self.service_namespace!r}: servelet scales SageMaker variants only ({NAMESPACE!r})")
        if self.scalable_dimension is not None and self.scalable_dimension != DIMENSION:
            raise invalid(f"ScalableDimension {self.scalable_dimension!r}: servelet scales {DIMENSION!r} only")
        return self


class RegisterInput(Scope):
    min_capacity: int | None = None
    max_capacity: int | None = None
    suspended_state: SuspendedState | None = None
    role_arn: str | None = Field(None, alias="RoleARN", description="Accepted for compatibility, as IAM roles are.")


class PredefinedMetric(Resource):
    predefined_metric_type: str


class TargetTracking(Resource):
    target_value: float = Field(gt=0)
    predefined_metric_specification: PredefinedMetric | None = None
    customized_metric_specification: dict | None = None
    scale_out_cooldown: int = Field(300, ge=0)
    scale_in_cooldown: int = Field(300, ge=0)
    disable_scale_in: bool = False


class PutPolicyInput(Scope):
    policy_name: str = Field(min_length=1, max_length=256)
    policy_type: Literal["TargetTrackingScaling", "StepScaling", "PredictiveScaling"] = "StepScaling"
    target_tracking_scaling_policy_configuration: TargetTracking | None = None


class DeletePolicyInput(Scope):
    policy_name: str


class DescribeInput(Scope):
    resource_ids: list[str] = Field(default_factory=list)
    policy_names: list[str] = Field(default_factory=list)
    max_results: int = Field(50, ge=1, le=50)
    next_token: str | None = None


def register(name: str, input: type[Resource], raises: tuple[str, ...] = ()):
    return operation(name, input, raises, registry=OPERATIONS)


def target_arn(target: ScalableTarget) -> str:
    return f"{ACCOUNT}:scalable-target/{target.endpoint_name}-{target.variant_name}"


def policy_arn(target: ScalableTarget) -> str:
    return f"{ACCOUNT}:scalingPolicy:{target.resource_id}:policyName/{target.policy.policy_name}"


def common(target: ScalableTarget) -> dict:
    return {"ServiceNamespace": NAMESPACE, "ResourceId": target.resource_id, "ScalableDimension": DIMENSION}


async def refuse_serverless(plane: ControlPlane, endpoint: str, variant: str) -> None:
    """A serverless variant scales by itself (0 or ProvisionedConcurrency up to MaxConcurrency): no policy applies."""
    record = await plane.records.get(endpoint)
    states = record.production_variants if record else []
    serverless = next((v.current_serverless_config for v in states if v.variant_name == variant), None)
    if serverless is not None:
        raise invalid(
            f"endpoint/{endpoint}/variant/{variant} is a serverless variant: it scales by itself, up to its "
            f"MaxConcurrency ({serverless.max_concurrency}), so it takes no scalable target or scaling policy "
            "(change ServerlessConfig instead, or deploy the variant with instances to autoscale it)"
        )


async def selected(plane: ControlPlane, args: DescribeInput) -> list[ScalableTarget]:
    wanted = set(args.resource_ids) | ({args.resource_id} if args.resource_id else set())
    # The store in a thread, as every control API call: a slow store must not stall the streams on the event loop.
    targets = await asyncio.to_thread(plane.store.list_scaling_targets)
    return [t for t in targets if not wanted or t.resource_id in wanted]


@register("RegisterScalableTarget", RegisterInput)
async def register_scalable_target(plane: ControlPlane, body: dict) -> dict:
    args = request_input(RegisterInput, body).check()
    endpoint, variant = args.variant()
    await refuse_serverless(plane, endpoint, variant)
    problem = target_errors(args.min_capacity, args.max_capacity)
    if problem:
        raise invalid(problem)
    target = await plane.autoscaler.register_target(
        endpoint, variant, args.min_capacity, args.max_capacity, args.suspended_state,
    )
    return {"ScalableTargetARN": target_arn(target)}


@register("PutScalingPolicy", PutPolicyInput, raises=("ObjectNotFoundException",))
async def put_scaling_policy(plane: ControlPlane, body: dict) -> dict:
    args = request_input(PutPolicyInput, body).check()
    endpoint, variant = args.variant()
    await refuse_serverless(plane, endpoint, variant)
    config = args.target_tracking_scaling_policy_configuration
    if args.policy_type != "TargetTrackingScaling":
        raise invalid(f"PolicyType {args.policy_type!r} is not supported: servelet runs TargetTrackingScaling policies")
    if config is None:
        raise invalid("TargetTrackingScalingPolicyConfiguration: required for a TargetTrackingScaling policy")
    policy = ScalingPolicy(
        policy_name=args.policy_name, metric=policy_metric(config, endpoint),
        target_value=config.target_value, scale_out_cooldown=config.scale_out_cooldown,
        scale_in_cooldown=config.scale_in_cooldown, disable_scale_in=config.disable_scale_in,
    )
    target = await plane.autoscaler.put_policy(endpoint, variant, policy)
    return {"PolicyARN": policy_arn(target), "Alarms": []}


def policy_metric(config, endpoint: str) -> str:
    """A predefined metric, or the one customized metric servelet measures: an async endpoint's backlog, named as
    SageMaker's users name it (MetricName ApproximateBacklogSizePerInstance, Dimensions EndpointName)."""
    customized, predefined = config.customized_metric_specification, config.predefined_metric_specification
    if (customized is None) == (predefined is None):
        raise invalid("TargetTrackingScalingPolicyConfiguration: give one PredefinedMetricSpecification or one "
                      f"CustomizedMetricSpecification (servelet measures {', '.join(CUSTOMIZED_METRICS)} of the latter)")
    if predefined is not None:
        return predefined.predefined_metric_type
    name = customized.get("MetricName")
    if name not in CUSTOMIZED_METRICS:
        raise invalid(f"CustomizedMetricSpecification.MetricName {name!r}: servelet measures only "
                      f"{', '.join(CUSTOMIZED_METRICS)} (CloudWatch metrics do not exist here)")
    named = {d.get("Name"): d.get("Value") for d in customized.get("Dimensions", [])}
    if named.get("EndpointName", endpoint) != endpoint:
        raise invalid(f"CustomizedMetricSpecification.Dimensions: EndpointName {named['EndpointName']!r} is not the "
                      f"policy's endpoint {endpoint!r}")
    return name


def metric_wire(metric: str, endpoint: str) -> dict:
    if metric in CUSTOMIZED_METRICS:
        return {"CustomizedMetricSpecification": {
            "MetricName": metric, "Namespace": "AWS/SageMaker", "Statistic": "Average",
            "Dimensions": [{"Name": "EndpointName", "Value": endpoint}],
        }}
    return {"PredefinedMetricSpecification": {"PredefinedMetricType": metric}}


@register("DescribeScalableTargets", DescribeInput)
async def describe_scalable_targets(plane: ControlPlane, body: dict) -> dict:
    args = request_input(DescribeInput, body).check()
    return {"ScalableTargets": [
        common(t) | {
            "MinCapacity": t.min_capacity, "MaxCapacity": t.max_capacity, "CreationTime": epoch(t.creation_time),
            "RoleARN": f"{ACCOUNT}:role/servelet", "ScalableTargetARN": target_arn(t),
            "SuspendedState": t.suspended_state.model_dump(by_alias=True),
        }
        for t in await selected(plane, args)
    ]}


def policy_wire(target: ScalableTarget) -> dict:
    policy = target.policy
    return common(target) | {
        "PolicyARN": policy_arn(target), "PolicyName": policy.policy_name, "PolicyType": "TargetTrackingScaling",
        "TargetTrackingScalingPolicyConfiguration": {
            "TargetValue": policy.target_value,
            **metric_wire(policy.metric, target.endpoint_name),
            "ScaleOutCooldown": policy.scale_out_cooldown, "ScaleInCooldown": policy.scale_in_cooldown,
            "DisableScaleIn": policy.disable_scale_in,
        },
        "Alarms": [], "CreationTime": epoch(policy.creation_time),
    }


@register("DescribeScalingPolicies", DescribeInput)
async def describe_scaling_policies(plane: ControlPlane, body: dict) -> dict:
    args = request_input(DescribeInput, body).check()
    return {"ScalingPolicies": [
        policy_wire(t) for t in await selected(plane, args)
        if t.policy is not None and (not args.policy_names or t.policy.policy_name in args.policy_names)
    ]}


@register("DeleteScalingPolicy", DeletePolicyInput, raises=("ObjectNotFoundException",))
async def delete_scaling_policy(plane: ControlPlane, body: dict) -> dict:
    args = request_input(DeletePolicyInput, body).check()
    await plane.autoscaler.delete_policy(*args.variant(), args.policy_name)
    return {}


@register("DeregisterScalableTarget", Scope, raises=("ObjectNotFoundException",))
async def deregister_scalable_target(plane: ControlPlane, body: dict) -> dict:
    args = request_input(Scope, body).check()
    await plane.autoscaler.deregister(*args.variant())
    return {}


@register("DescribeScalingActivities", DescribeInput)
async def describe_scaling_activities(plane: ControlPlane, body: dict) -> dict:
    args = request_input(DescribeInput, body).check()
    activities = []
    for target in await selected(plane, args):
        for event in target.events:
            direction = "out" if event.to_count > event.from_count else "in"
            activities.append(common(target) | {
                "ActivityId": event.activity_id,
                "Description": f"Setting desired instance count to {event.to_count} (scale {direction}).",
                "Cause": f"variant {event.variant} from {event.from_count} to {event.to_count} instances: {event.reason}",
                "StartTime": epoch(event.time), "EndTime": epoch(event.time),
                "StatusCode": event.status, "StatusMessage": event.reason,
            })
    activities.sort(key=lambda a: a["StartTime"], reverse=True)  # newest first, as AWS lists them
    return {"ScalingActivities": activities[:args.max_results]}
