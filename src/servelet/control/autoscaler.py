"""Autoscaling: target tracking per production variant, as Application Auto Scaling does it for SageMaker.

A variant is registered as a *scalable target* (min and max instances) and given one target-tracking *policy*:
a target value for one metric per instance, and cooldowns. Both are kept in the store (one row per variant,
with its last scaling events), so they survive a restart and go when the endpoint is deleted.

The loop, every `interval` seconds, per variant with a policy:

    metric   concurrency: requests in flight per ready instance, averaged over the last `window` seconds
             invocations: requests answered in the last 60 s per ready instance
             backlog: an async endpoint's jobs waiting or running (the queue's), per ready instance
    desired  ceil(instances x metric / target), within [min, max]
    out      when desired > instances, at most once per ScaleOutCooldown, straight to desired
    in       when desired < instances, one instance at a time, at most once per ScaleInCooldown after any
             scaling, and only if the load sampled over the whole cooldown never needed the current count
             (conservative: a lull between requests does not undo a scale-out)

With MinCapacity 0 (as SageMaker allows for inference components) the last instance goes after a ScaleInCooldown
without load, and the first request to the empty variant starts one through the serverless start path (the router
holds it, bounded by SERVELET_SERVERLESS_START_TIMEOUT); the policy takes over again once it is ready.

Nothing scales while the endpoint is not InService (Creating, Updating, RollingBack, ...). A change goes through
UpdateEndpointWeightsAndCapacities: new instances start (the endpoint is Updating until they are ready),
removed ones finish their requests first.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from ..errors import GatewayError, ResourceInvalid, ResourceMissing
from .endpoints import Fleet
from .loop import ControlLoop
from .resources import (
    BACKLOG,
    CONCURRENCY,  # noqa: F401 - config.py and the autoscaling API name the metrics here
    INVOCATIONS,
    MAX_INSTANCES_PER_VARIANT,
    METRICS,
    DesiredWeightAndCapacity,
    EndpointRecord,
    EndpointStatus,
    ScalableTarget,
    ScalingEvent,
    ScalingPolicy,
    SuspendedState,
    arn,
    resource_id,
)
from .store import Store

log = logging.getLogger("servelet.autoscaling")

NAMESPACE = "sagemaker"
DIMENSION = "sagemaker:variant:DesiredInstanceCount"
EVENTS_KEPT = 20
MAX_SCALE_IN_MEMORY_S = 3600  # samples kept for the scale-in decision, at most
CONFIG_POLICY = "servelet-config"  # the policy a config file's `autoscaling` block registers


def parse_resource_id(value: str) -> tuple[str, str]:
    parts = value.split("/")
    if len(parts) != 4 or parts[0] != "endpoint" or parts[2] != "variant" or not parts[1] or not parts[3]:
        raise ResourceInvalid(f"ResourceId {value!r}: write endpoint/ENDPOINT_NAME/variant/VARIANT_NAME")
    return parts[1], parts[3]


def target_errors(min_capacity: int | None, max_capacity: int | None) -> str | None:
    """A readable refusal for capacities out of range, before pydantic words it."""
    if min_capacity is not None and min_capacity < 0:
        return f"MinCapacity ({min_capacity}) must be 0 (scale to zero when idle) or more"
    if max_capacity is not None and max_capacity < 1:
        return f"MaxCapacity ({max_capacity}) must be at least 1: a variant that can never run an instance serves nothing"
    for label, value in (("MinCapacity", min_capacity), ("MaxCapacity", max_capacity)):
        if value is not None and value > MAX_INSTANCES_PER_VARIANT:
            return f"{label} ({value}) is above the limit of {MAX_INSTANCES_PER_VARIANT} instances per variant"
    if min_capacity is not None and max_capacity is not None and min_capacity > max_capacity:
        return f"MinCapacity ({min_capacity}) is above MaxCapacity ({max_capacity})"
    return None


class Updates(Protocol):
    """What the autoscaler asks of the deployer: whether an endpoint is being updated, and a change of counts."""

    def updating(self, name: str) -> bool: ...

    async def change_weights_and_capacities(
        self, name: str, desired: list[DesiredWeightAndCapacity]
    ) -> EndpointRecord: ...


class ScalingReport(Protocol):
    """Where the autoscaler reports its readings and changes (the gateway's metrics: control/ never imports them)."""

    def checked(self, endpoint: str, variant: str, metric: float | None, desired: int) -> None: ...

    def scaled(self, endpoint: str, variant: str, direction: str) -> None: ...


class Unreported:
    """A ScalingReport for a control plane without a gateway (the CLI, tests): it reports nowhere."""

    def checked(self, endpoint: str, variant: str, metric: float | None, desired: int) -> None:
        pass

    def scaled(self, endpoint: str, variant: str, direction: str) -> None:
        pass


class Autoscaler(ControlLoop):
    """Registers targets and policies (in the store) and runs the loop that applies them to the fleet."""

    def __init__(
        self, store: Store, fleet: Fleet, updates: Updates, interval: float = 5.0, report: ScalingReport | None = None,
    ):
        self.store = store
        # An async endpoint's queue length (jobs waiting or running), told by whoever runs the queue.
        self.backlog: Callable[[str], int] = lambda _endpoint: 0
        self.fleet = fleet
        self.updates = updates
        self.report = report or Unreported()
        self.interval = interval
        # Concurrency is averaged over this long: SageMaker's high-resolution metric is per 10 s at 5 s ticks.
        self.window = max(2 * interval, 1.0)
        self._samples: dict[tuple[str, str], deque[tuple[float, float]]] = {}
        self._last_out: dict[tuple[str, str], float] = {}
        self._last_any: dict[tuple[str, str], float] = {}
        # Each change of a target (read, change, save) runs in a thread, so that a slow store stalls no stream; one
        # at a time, so that a policy put and a scaling event kept at once do not lose one another.
        self._changing = asyncio.Lock()

    async def _change(self, change: Callable, *args):
        async with self._changing:
            return await asyncio.to_thread(change, *args)

    # -- registration ------------------------------------------------------------------------------------------
    async def register_target(
        self, endpoint: str, variant: str, min_capacity: int | None, max_capacity: int | None,
        suspended: SuspendedState | None = None,
    ) -> ScalableTarget:
        """RegisterScalableTarget: new, or new bounds for one already registered (a bound or a SuspendedState not
        given is kept)."""
        return await self._change(self._register, endpoint, variant, min_capacity, max_capacity, suspended)

    def _register(
        self, endpoint: str, variant: str, min_capacity: int | None, max_capacity: int | None,
        suspended: SuspendedState | None = None,
    ) -> ScalableTarget:
        record = self.store.get_endpoint(endpoint)
        if record is None:
            raise ResourceInvalid(f'Could not find endpoint "{arn("endpoint", endpoint)}": create it before registering it for autoscaling')
        variants = [v.variant_name for v in record.production_variants]
        if variant not in variants:
            raise ResourceInvalid(f"endpoint {endpoint!r} has no variant {variant!r} (it has: {', '.join(variants)})")
        existing = self.store.get_scaling_target(resource_id(endpoint, variant))
        if existing is None and (min_capacity is None or max_capacity is None):
            raise ResourceInvalid("MinCapacity and MaxCapacity are required to register a new scalable target")
        low = min_capacity if min_capacity is not None else existing.min_capacity
        high = max_capacity if max_capacity is not None else existing.max_capacity
        problem = target_errors(low, high)
        if problem:
            raise ResourceInvalid(problem)
        target = existing or ScalableTarget(endpoint_name=endpoint, variant_name=variant, min_capacity=low, max_capacity=high)
        target.min_capacity, target.max_capacity = low, high
        if suspended is not None:
            target.suspended_state = suspended
        self.store.save_scaling_target(target)
        log.info("autoscaling: %s registered, %d..%d instances", target.resource_id, low, high)
        return target

    async def put_policy(self, endpoint: str, variant: str, policy: ScalingPolicy) -> ScalableTarget:
        """PutScalingPolicy: one target-tracking policy per variant; the same name replaces it."""
        return await self._change(self._put_policy, endpoint, variant, policy)

    def _put_policy(self, endpoint: str, variant: str, policy: ScalingPolicy) -> ScalableTarget:
        target = self._target(endpoint, variant)
        if target.policy is not None and target.policy.policy_name != policy.policy_name:
            raise ResourceInvalid(
                f"{target.resource_id} already has the scaling policy {target.policy.policy_name!r}; servelet tracks one "
                "target per variant: delete that policy first, or put it again under its name to change it"
            )
        if target.policy is not None:
            policy.creation_time = target.policy.creation_time
        target.policy = policy
        self.store.save_scaling_target(target)
        log.info("autoscaling: %s tracks %s = %g", target.resource_id, policy.metric, policy.target_value)
        return target

    async def delete_policy(self, endpoint: str, variant: str, policy_name: str) -> None:
        await self._change(self._delete_policy, endpoint, variant, policy_name)

    def _delete_policy(self, endpoint: str, variant: str, policy_name: str) -> None:
        target = self.store.get_scaling_target(resource_id(endpoint, variant))
        if target is None or target.policy is None or target.policy.policy_name != policy_name:
            raise ResourceMissing(f"No scaling policy found for service namespace: sagemaker, resource ID: "
                                  f"{resource_id(endpoint, variant)}, policy name: {policy_name}")
        target.policy = None
        self.store.save_scaling_target(target)

    async def deregister(self, endpoint: str, variant: str) -> None:
        """DeregisterScalableTarget: the target and its policy go; the instances stay as they are."""
        if not await self._change(self.store.delete_scaling_target, resource_id(endpoint, variant)):
            raise ResourceMissing(f"No scalable target found for service namespace: sagemaker, resource ID: "
                                  f"{resource_id(endpoint, variant)}, scalable dimension: {DIMENSION}")

    def _target(self, endpoint: str, variant: str) -> ScalableTarget:
        target = self.store.get_scaling_target(resource_id(endpoint, variant))
        if target is None:
            raise ResourceMissing(f"No scalable target registered for service namespace: sagemaker, resource ID: "
                                  f"{resource_id(endpoint, variant)}, scalable dimension: {DIMENSION}; register it first")
        return target

    async def events(self, endpoint: str, last: int = 10) -> list[ScalingEvent]:
        """The endpoint's last scaling events, over all its variants, oldest first."""
        events = [e for t in await asyncio.to_thread(self.store.list_scaling_targets, endpoint) for e in t.events]
        return sorted(events, key=lambda e: e.time)[-last:]

    # -- the loop ----------------------------------------------------------------------------------------------
    async def _run(self) -> None:
        step = max(min(self.interval / 5, 1.0), 0.05)  # concurrency is sampled more often than it is acted on
        next_check = time.monotonic() + self.interval
        while True:
            await asyncio.sleep(step)
            try:
                # The store in a thread: this runs every second, and a slow store must not stall the data plane.
                targets = [t for t in await asyncio.to_thread(self.store.list_scaling_targets) if t.policy is not None]
                for target in targets:
                    self._sample(target)
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + self.interval
                    for target in targets:
                        await self.check(target)
            except Exception:  # noqa: BLE001 - a bad tick must not end autoscaling for good
                log.exception("autoscaling: the check failed")

    def _variant(self, target: ScalableTarget):
        endpoint = self.fleet.endpoints.get(target.endpoint_name)
        return endpoint.blue.find(target.variant_name) if endpoint else None

    def _sample(self, target: ScalableTarget) -> None:
        variant = self._variant(target)
        if variant is None:
            return
        ready = len(variant.ready_instances())
        samples = self._samples.setdefault((target.endpoint_name, target.variant_name), deque())
        moment = time.monotonic()
        if ready:
            samples.append((moment, sum(variant.in_flight.values()) / ready))
        # Kept for the scale-in cooldown too: scaling in needs the load to have stayed low that long.
        keep = max(self.window, min(target.policy.scale_in_cooldown, MAX_SCALE_IN_MEMORY_S)) if target.policy else self.window
        while samples and samples[0][0] < moment - keep:
            samples.popleft()

    def measure(self, target: ScalableTarget) -> float | None:
        """The policy's metric for the variant now; None when it cannot be read (no ready instance, no samples)."""
        variant = self._variant(target)
        if variant is None or not variant.ready_instances():
            return None
        if target.policy.metric == INVOCATIONS:
            return variant.served.count / len(variant.ready_instances())
        if target.policy.metric == BACKLOG:
            return self.backlog(target.endpoint_name) / len(variant.ready_instances())
        samples = self._samples.get((target.endpoint_name, target.variant_name))
        recent = [value for moment, value in samples or () if moment >= time.monotonic() - self.window]
        return sum(recent) / len(recent) if recent else None

    def peak(self, target: ScalableTarget, seconds: float) -> float | None:
        """The highest concurrency sampled over the last `seconds` (invocations and backlog: their value now)."""
        if target.policy.metric in (INVOCATIONS, BACKLOG):
            return self.measure(target)
        samples = self._samples.get((target.endpoint_name, target.variant_name))
        values = [value for moment, value in samples or () if moment >= time.monotonic() - seconds]
        return max(values) if values else None

    async def check(self, target: ScalableTarget) -> None:
        """One evaluation of one variant's policy; scales it if the policy says so and the cooldowns allow."""
        record = await asyncio.to_thread(self.store.get_endpoint, target.endpoint_name)
        variant = self._variant(target)
        if (record is None or variant is None or record.endpoint_status is not EndpointStatus.IN_SERVICE
                or self.updates.updating(target.endpoint_name)
                or self.fleet.endpoints[target.endpoint_name].green is not None):
            return
        policy, key = target.policy, (target.endpoint_name, target.variant_name)
        current = len(variant.instances)
        value = self.measure(target)
        # Without a reading (no ready instance yet) only the bounds can move the count.
        wanted = current if value is None else math.ceil(current * value / policy.target_value - 1e-9)
        desired = max(target.min_capacity, min(target.max_capacity, wanted))
        self.report.checked(target.endpoint_name, target.variant_name, value, desired)
        moment = time.monotonic()
        measured = f"{METRICS[policy.metric]} was {value:.3g}, target {policy.target_value:g}" if value is not None else ""
        if desired > current:
            if current < target.min_capacity:
                reason = f"below MinCapacity {target.min_capacity}"
            elif moment - self._last_out.get(key, -math.inf) < policy.scale_out_cooldown:
                return
            else:
                reason = measured
        elif desired < current:
            if current > target.max_capacity:
                reason = f"above MaxCapacity {target.max_capacity}"
            elif policy.disable_scale_in or moment - self._last_any.get(key, -math.inf) < policy.scale_in_cooldown:
                return
            elif self._busy_lately(target, current):
                return  # a lull between requests is not a drop in load: it must last the whole cooldown
            else:
                desired, reason = current - 1, measured  # one step at a time
        else:
            return
        if not target.policy_may_move(current, desired):
            return
        await self._scale(target, current, desired, reason)
        self._last_any[key] = moment
        if desired > current:
            self._last_out[key] = moment

    def _busy_lately(self, target: ScalableTarget, current: int) -> bool:
        """Whether the load at any sample of the scale-in cooldown still needed `current` instances."""
        peak = self.peak(target, max(target.policy.scale_in_cooldown, self.window))
        return peak is not None and math.ceil(current * peak / target.policy.target_value - 1e-9) >= current

    async def _scale(self, target: ScalableTarget, current: int, desired: int, reason: str) -> None:
        direction = "out" if desired > current else "in"
        status = "Successful"
        try:
            await self.updates.change_weights_and_capacities(
                target.endpoint_name, [DesiredWeightAndCapacity(variant_name=target.variant_name, desired_instance_count=desired)]
            )
        except GatewayError as exc:
            status, reason = "Failed", f"{reason}; the change was refused: {exc.message}"
        event = ScalingEvent(variant=target.variant_name, from_count=current, to_count=desired, reason=reason, status=status)
        log.info("autoscaling: endpoint %s variant %s scales %s from %d to %d instances: %s",
                 target.endpoint_name, target.variant_name, direction, current, desired, reason)
        if status == "Successful":
            self.report.scaled(target.endpoint_name, target.variant_name, direction)
        await self._change(self._keep_event, target.resource_id, event)

    def _keep_event(self, target_id: str, event: ScalingEvent) -> None:
        stored = self.store.get_scaling_target(target_id)  # as it is now: an API call may have changed it
        if stored is not None:
            stored.events = (stored.events + [event])[-EVENTS_KEPT:]
            self.store.save_scaling_target(stored)
