"""Safe updates: UpdateEndpoint as a blue/green deployment, and UpdateEndpointWeightsAndCapacities.

UpdateEndpoint runs one task per endpoint through these states:

    InService ─UpdateEndpoint─▶ Updating: start the green fleet (the new config) beside blue (the old one)
        every green instance ready?  no ─────────────────────────────────────────────┐
        shift: green takes the canary share, then all; or linear steps; or all at once;  │ an alarm fires,
               each shift is followed by WaitIntervalInSeconds (the last one: baking)    │ or the update runs past
        bake:  TerminationWaitInSeconds more, alarms still watched                       │ MaximumExecutionTimeout-
        retire blue: green becomes the endpoint's fleet; blue drains, then stops         │ InSeconds
        ──▶ InService on the new config                                                  ▼
                                     RollingBack: all traffic back to blue; green drains, then stops
                                     ──▶ InService on the old config; FailureReason says why

A canary or linear step given as INSTANCE_COUNT is that share of green's instances, as a share of the traffic.
Requests are never dropped: the router falls back to the other fleet while one has no ready instance, and a
fleet stops only after its in-flight requests are answered.

Alarms are servelet's own (there is no CloudWatch here): thresholds on the green fleet's requests over the
last 60 seconds, declared by their name in `AutoRollbackConfiguration.Alarms[].AlarmName`, so boto3 sends them
unchanged; any other name is refused, since servelet could not evaluate it:

    servelet:error-rate>0.05     more than 5 % of green's requests failed (errors of the fleet, not 4xx)
    servelet:p99-latency>2.5     green's 99th percentile latency is above 2.5 s (streams: time to first byte)

An alarm is judged once green has answered MIN_REQUESTS requests in the window (20; `,min-requests=N` after the
rule changes it): one failed request among the first few of a canary is noise, not a 100 % error rate.

UpdateEndpointWeightsAndCapacities sets weights at once and adds or removes instances (removed ones drain
first); the endpoint is Updating until the added instances are ready.

A restart during an update puts the endpoint back on its stored (old) config (`ControlPlane.restore`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from dataclasses import dataclass
from typing import Protocol

from ..errors import ResourceInvalid, ResourceMissing
from .endpoints import Deployment, Endpoint, Fleet, Outcomes, VariantPlan
from .records import EndpointRecords
from .resources import (
    DeploymentConfig,
    DesiredWeightAndCapacity,
    EndpointConfigSpec,
    EndpointRecord,
    EndpointStatus,
    PendingDeployment,
    VariantState,
    VariantStep,
    arn,
    now,
)

log = logging.getLogger("servelet.control")

ALARM_PATTERN = re.compile(
    r"^servelet:(error-rate|p99-latency)\s*>\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)(?:\s*,\s*min-requests=([0-9]+))?$"
)
ALARM_FORMS = ("servelet:error-rate>0.05 or servelet:p99-latency>2.5 (seconds), optionally followed by "
               ",min-requests=N (default 20)")
MIN_REQUESTS = 20
DRAIN_TIMEOUT_S = 120.0  # the longest a retired fleet waits for its in-flight requests
WATCH_POLL_S = 0.1


@dataclass
class Alarm:
    name: str
    metric: str  # error-rate | p99-latency
    threshold: float
    min_requests: int = MIN_REQUESTS  # fewer requests in the window: not judged yet

    @classmethod
    def parse(cls, name: str) -> "Alarm":
        match = ALARM_PATTERN.match(name.strip())
        if match is None:
            raise ResourceInvalid(
                f"DeploymentConfig.AutoRollbackConfiguration.Alarms: {name!r} is not an alarm servelet can evaluate "
                f"(there is no CloudWatch here); name a threshold on the new fleet instead: {ALARM_FORMS}"
            )
        if match[3] is not None and int(match[3]) < 1:
            raise ResourceInvalid(
                f"DeploymentConfig.AutoRollbackConfiguration.Alarms: {name!r}: min-requests must be 1 or more"
            )
        return cls(name, match[1], float(match[2]), MIN_REQUESTS if match[3] is None else int(match[3]))

    def fired(self, outcomes: Outcomes) -> str | None:
        """Why the alarm fires on these outcomes, or None."""
        if outcomes.count < self.min_requests:
            return None
        if self.metric == "error-rate":
            value, shown = outcomes.error_rate, lambda x: f"{x:.1%}"
        else:
            value, shown = outcomes.p99_latency, lambda x: f"{x:.3g} s"
        if value is None or value <= self.threshold:
            return None
        return (f"alarm {self.name} fired: the new fleet's {self.metric} was {shown(value)} over its last "
                f"{outcomes.count} requests (threshold {self.threshold:g})")


@dataclass
class Policy:
    """A DeploymentConfig in the terms the update runs by."""

    config: DeploymentConfig | None
    kind: str = "ALL_AT_ONCE"
    step: tuple[str, int] | None = None  # CapacitySize (Type, Value) of the canary or the linear step
    wait_s: float = 0.0
    termination_wait_s: float = 0.0
    timeout_s: float = 3600.0
    alarms: tuple[Alarm, ...] = ()

    @classmethod
    def of(cls, config: DeploymentConfig | None) -> "Policy":
        policy = cls(config)
        blue_green = config.blue_green_update_policy if config else None
        if blue_green is not None:
            routing = blue_green.traffic_routing_configuration
            size = routing.canary_size if routing.type == "CANARY" else routing.linear_step_size
            policy.kind, policy.wait_s = routing.type, float(routing.wait_interval_in_seconds)
            policy.step = (size.type, size.value) if size and routing.type != "ALL_AT_ONCE" else None
            policy.termination_wait_s = float(blue_green.termination_wait_in_seconds)
            policy.timeout_s = float(blue_green.maximum_execution_timeout_in_seconds)
        if config and config.auto_rollback_configuration:
            policy.alarms = tuple(Alarm.parse(a.alarm_name) for a in config.auto_rollback_configuration.alarms)
        return policy

    def shares(self, green_instances: int) -> list[float]:
        """The share of traffic green takes at each shift, ending at 1."""
        if self.step is None:
            return [1.0]
        kind, value = self.step
        share = value / 100 if kind == "CAPACITY_PERCENT" else value / max(green_instances, 1)
        if share >= 1:
            return [1.0]
        if self.kind == "CANARY":
            return [share, 1.0]
        return [min(1.0, k * share) for k in range(1, math.ceil(1 / share - 1e-9) + 1)]


class Rollback(Exception):
    """The update cannot go on; the message says why (it becomes the endpoint's FailureReason)."""


class Configs(Protocol):
    """What the deployer asks of the control plane: the endpoint config an update names, and what it runs."""

    async def describe_endpoint_config(self, name: str) -> EndpointConfigSpec: ...

    def plans(self, config: EndpointConfigSpec, record: EndpointRecord | None = None) -> list[VariantPlan]: ...


class Deployer:
    """Runs endpoint updates for the control plane: at most one per endpoint at a time. Its reads and saves of an
    endpoint's record go through `records` (in a thread, one change per endpoint at a time)."""

    def __init__(self, records: EndpointRecords, fleet: Fleet, configs: Configs, start_timeout: float):
        self.records = records
        self.fleet = fleet
        self.configs = configs
        self.start_timeout = start_timeout
        self._tasks: dict[str, asyncio.Task] = {}

    def updating(self, name: str) -> bool:
        return name in self._tasks

    # -- UpdateEndpoint ---------------------------------------------------------------------------------------
    async def update(
        self,
        name: str,
        config_name: str,
        deployment: DeploymentConfig | None = None,
        retain_variant_properties: set[str] = frozenset(),
        retain_deployment_config: bool = False,
    ) -> EndpointRecord:
        """Check the request, mark the endpoint Updating and start the update in the background."""
        async with self.records.change(name) as record:
            self._check_updatable(name, record)
            config = await self.configs.describe_endpoint_config(config_name)
            if "DataCaptureConfig" in retain_variant_properties:  # the capture serving now goes on with the new config
                config = config.model_copy(update={"data_capture_config": record.data_capture})
            if deployment is None and retain_deployment_config:
                deployment = record.last_deployment_config
            policy = Policy.of(deployment)
            plans = await asyncio.to_thread(self.configs.plans, config)
            self._plan_update(record, config_name, plans, retain_variant_properties)
            await self.records.save(record)
            log.info("endpoint %s: updating to %s (%s)", name, config_name, policy.kind)
            self._run_task(name, self._update(name, config, plans, policy))
        return record

    def _plan_update(
        self, record: EndpointRecord, config_name: str, plans: list[VariantPlan], retain_variant_properties: set[str]
    ) -> None:
        kept = {v.variant_name: v for v in record.every_variant}
        for plan in plans:  # RetainAllVariantProperties: same-named variants keep their weight and count
            if plan.name in kept and "DesiredWeight" in retain_variant_properties:
                plan.weight = kept[plan.name].desired_weight
            if plan.name in kept and "DesiredInstanceCount" in retain_variant_properties:
                plan.instances = kept[plan.name].desired_instance_count
        record.endpoint_status = EndpointStatus.UPDATING
        record.failure_reason = None
        record.pending_deployment_summary = PendingDeployment(
            endpoint_config_name=config_name, **summaries(plans, "Creating", "starting the new fleet")
        )

    async def _update(self, name: str, config: EndpointConfigSpec, plans: list[VariantPlan], policy: Policy) -> None:
        endpoint = self.fleet.get(name)
        try:
            async with asyncio.timeout(policy.timeout_s):
                green = await self.fleet.deploy_green(name, plans, self.start_timeout, config.endpoint_config_name)
                failure = await self.fleet.wait_instances_ready(green.instances(), self.start_timeout)
                if failure:
                    raise Rollback(f"the new fleet (endpoint config {config.endpoint_config_name!r}) did not start: {failure}")
                for share in policy.shares(sum(len(v.instances) for v in green.variants)):  # shadows take no traffic
                    endpoint.green_share = share
                    await self._note(name, "ActivatingTraffic", f"the new fleet takes {share:.0%} of the traffic")
                    await self._watch(green, policy, policy.wait_s)
                await self._note(name, "Baking", f"all traffic on the new fleet; the old one stops in {policy.termination_wait_s:g} s")
                await self._watch(green, policy, policy.termination_wait_s)
        except Rollback as exc:
            reason = str(exc)
        except TimeoutError:
            reason = f"the update took longer than its MaximumExecutionTimeoutInSeconds ({policy.timeout_s:.0f} s)"
        except Exception as exc:  # noqa: BLE001 - whatever went wrong, the endpoint must end on a config that runs
            log.exception("endpoint %s: the update failed", name)
            reason = f"the update failed: {type(exc).__name__}: {exc}"
        else:
            await self._finish(name, endpoint, config, policy)
            return
        await self._roll_back(name, endpoint, reason, policy)

    async def _watch(self, green: Deployment, policy: Policy, seconds: float) -> None:
        """Wait `seconds`, checking the alarms on green's requests as we go."""
        deadline = asyncio.get_running_loop().time() + seconds
        while True:
            for alarm in policy.alarms:
                reason = alarm.fired(green.outcomes)
                if reason:
                    raise Rollback(reason)
            given_up = next((i.given_up for i in green.instances() if i.given_up), None)
            if given_up:  # it kept crashing: the fleet stopped restarting it
                raise Rollback(f"the new fleet failed: {given_up}")
            if asyncio.get_running_loop().time() >= deadline:
                return
            await asyncio.sleep(WATCH_POLL_S)

    async def _finish(self, name: str, endpoint: Endpoint, config: EndpointConfigSpec, policy: Policy) -> None:
        """Green becomes the endpoint's fleet (in one step: every request sees one or the other); blue drains."""
        blue, green = endpoint.blue, endpoint.green
        endpoint.blue, endpoint.green, endpoint.green_share = green, None, 0.0
        await self._note(name, "Deleting", "the old fleet finishes its requests and stops")
        await asyncio.shield(self.fleet.retire(blue, DRAIN_TIMEOUT_S))
        async with self.records.change(name) as record:
            if record is None:
                return
            record.endpoint_config_name = config.endpoint_config_name
            record.async_inference_config = config.async_inference_config
            record.endpoint_config = config
            running = summaries([
                VariantPlan(v.name, v.model_uri, len(v.instances), v.weight, serverless=v.serverless, shadow=v.shadow)
                for v in green.every_variant
            ])
            record.production_variants = running["production_variants"]
            record.shadow_production_variants = running["shadow_production_variants"]
            await self._in_service(record, policy, failure_reason=None)
        log.info("endpoint %s: InService on %s", name, config.endpoint_config_name)

    async def _roll_back(self, name: str, endpoint: Endpoint, reason: str, policy: Policy) -> None:
        log.warning("endpoint %s: rolling back: %s", name, reason)
        async with self.records.change(name) as record:
            if record is None:
                return
            record.endpoint_status = EndpointStatus.ROLLING_BACK
            record.failure_reason = reason
            await self.records.save(record)
        green = endpoint.green
        endpoint.green, endpoint.green_share = None, 0.0
        if green is not None:
            await asyncio.shield(self.fleet.retire(green, DRAIN_TIMEOUT_S))
        async with self.records.change(name) as record:
            if record is None:
                return
            await self._in_service(record, policy, failure_reason=reason)
        log.info("endpoint %s: rolled back, InService on %s", name, record.endpoint_config_name)

    async def _in_service(self, record: EndpointRecord, policy: Policy, failure_reason: str | None) -> None:
        """The update is over, completed (no reason) or rolled back (why): InService, no pending deployment."""
        record.endpoint_status = EndpointStatus.IN_SERVICE
        record.failure_reason = failure_reason
        record.pending_deployment_summary = None
        record.last_deployment_config = policy.config
        await self.records.save(record)

    async def _note(self, name: str, status: str, message: str) -> None:
        """Show where the update stands on the pending variants (DescribeEndpoint's PendingDeploymentSummary)."""
        async with self.records.change(name) as record:
            if record is None or record.pending_deployment_summary is None:
                return
            for variant in record.pending_deployment_summary.every_variant:
                variant.variant_status = [VariantStep(status=status, status_message=message)]
            await self.records.save(record)

    # -- UpdateEndpointWeightsAndCapacities -------------------------------------------------------------------
    async def change_weights_and_capacities(self, name: str, desired: list[DesiredWeightAndCapacity]) -> EndpointRecord:
        async with self.records.change(name) as record:
            self._check_updatable(name, record)
            counts = self._change(name, record, desired)
            await self.records.save(record)
        if counts:
            self._run_task(name, self._scale(name, counts))
        return record

    def _change(self, name: str, record: EndpointRecord, desired: list[DesiredWeightAndCapacity]) -> dict[str, int]:
        """Check `desired` and apply it to the record and the running variants; the instance counts to change."""
        endpoint = self.fleet.get(name)
        states = {v.variant_name: v for v in record.every_variant}  # a shadow's weight and count change alike
        unknown = [d.variant_name for d in desired
                   if d.variant_name not in states or not endpoint.blue.find_any(d.variant_name)]
        if unknown:
            raise ResourceInvalid(
                f"The variant(s) {', '.join(map(repr, unknown))} are not on endpoint {arn('endpoint', name)!r} "
                f"(it has: {', '.join(states)})"
            )
        names = [d.variant_name for d in desired]
        if len(set(names)) != len(names):
            raise ResourceInvalid("DesiredWeightsAndCapacities: each variant may appear once")
        counted = [endpoint.blue.find_any(d.variant_name) for d in desired if d.desired_instance_count is not None]
        serverless = next((v for v in counted if v.serverless is not None), None)
        if serverless is not None:
            raise ResourceInvalid(
                f"variant {serverless.name!r} of endpoint {name!r} is serverless: it scales by itself (from "
                f"ProvisionedConcurrency, or zero, up to MaxConcurrency {serverless.serverless.max_concurrency}), so it "
                "takes no DesiredInstanceCount; send DesiredWeight alone, or change its ServerlessConfig through UpdateEndpoint"
            )
        production = {v.variant_name for v in record.production_variants}  # a shadow's weight is its share of copies
        weights = {n: s.desired_weight for n, s in states.items() if n in production} | {
            d.variant_name: d.desired_weight for d in desired
            if d.desired_weight is not None and d.variant_name in production
        }
        if sum(weights.values()) <= 0:
            raise ResourceInvalid("DesiredWeight: the variants' weights would sum to 0, so no variant would get traffic")
        counts = {}
        for d in desired:
            state, variant = states[d.variant_name], endpoint.blue.find_any(d.variant_name)
            if d.desired_weight is not None:
                variant.weight = state.desired_weight = state.current_weight = d.desired_weight
            if d.desired_instance_count is not None:
                state.desired_instance_count = d.desired_instance_count
                if d.desired_instance_count != len(variant.instances):
                    counts[d.variant_name] = d.desired_instance_count
        if counts:
            record.endpoint_status = EndpointStatus.UPDATING
            record.failure_reason = None
        return counts

    async def _scale(self, name: str, counts: dict[str, int]) -> None:
        added = []
        for variant, count in counts.items():
            added += await self.fleet.scale(name, variant, count, self.start_timeout, DRAIN_TIMEOUT_S)
        failure = await self.fleet.wait_instances_ready(added, self.start_timeout) if added else None
        if failure:  # keep the instances that did start
            for variant in counts:
                live = self.fleet.get(name).blue.find_any(variant)
                await self.fleet.scale(name, variant, len(live.ready_instances()), self.start_timeout, DRAIN_TIMEOUT_S)
        async with self.records.change(name) as record:
            if record is None:
                return
            if failure:
                record.failure_reason = f"could not add instances: {failure}"
                blue = self.fleet.get(name).blue
                for state in record.every_variant:
                    if state.variant_name in counts:
                        state.desired_instance_count = len(blue.find_any(state.variant_name).instances)
            record.endpoint_status = EndpointStatus.IN_SERVICE
            await self.records.save(record)

    # -- shared -----------------------------------------------------------------------------------------------
    def _check_updatable(self, name: str, record: EndpointRecord | None) -> None:
        if record is None:
            raise ResourceMissing(f'Could not find endpoint "{arn("endpoint", name)}".')
        if self.updating(name) or record.endpoint_status in (EndpointStatus.UPDATING, EndpointStatus.ROLLING_BACK):
            raise ResourceInvalid(f'Cannot update in-progress endpoint "{arn("endpoint", name)}".')
        if record.endpoint_status is not EndpointStatus.IN_SERVICE:
            raise ResourceInvalid(
                f'Cannot update endpoint "{arn("endpoint", name)}": it is {record.endpoint_status.value}, '
                "and only an InService endpoint can be updated"
            )
        if name not in self.fleet.endpoints:  # restored at the gateway's start, its model still being fetched
            raise ResourceInvalid(
                f'Cannot update endpoint "{arn("endpoint", name)}" yet: its instances are still being started '
                "(after the gateway's restart); retry once it serves"
            )

    def _run_task(self, name: str, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks[name] = task
        task.add_done_callback(lambda _: self._tasks.pop(name, None) if self._tasks.get(name) is task else None)

    async def cancel(self, name: str) -> None:
        """Stop an update in progress (the endpoint is being deleted)."""
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def close(self) -> None:
        for name in list(self._tasks):
            await self.cancel(name)


def summaries(plans: list[VariantPlan], status: str | None = None, message: str | None = None) -> dict:
    """`production_variants` and `shadow_production_variants` (None without a shadow) as DescribeEndpoint shows them."""
    shadows = variant_states([p for p in plans if p.shadow], status, message)
    return {
        "production_variants": variant_states([p for p in plans if not p.shadow], status, message),
        "shadow_production_variants": shadows or None,
    }


def variant_states(plans: list[VariantPlan], status: str | None = None, message: str | None = None) -> list[VariantState]:
    """What DescribeEndpoint reports for `plans`, serverless configs included: kept with the endpoint, so they
    stay true after its endpoint config is deleted (SageMaker allows that while the endpoint runs)."""
    steps = [VariantStep(status=status, status_message=message, start_time=now())] if status else None
    return [
        VariantState(
            variant_name=p.name, current_weight=p.weight, desired_weight=p.weight,
            desired_instance_count=p.instances, variant_status=steps,
            current_serverless_config=p.serverless, desired_serverless_config=p.serverless,
        )
        for p in plans
    ]
