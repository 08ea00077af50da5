"""The control plane: resources kept in the store, endpoints reconciled onto the fleet of instances.

The store says what should run; the fleet is what runs. Creating an endpoint records it as `Creating` and answers;
a background task resolves its models (a download, for a remote one), starts its instances and marks it `InService`
once every instance answers `/ping` (or `Failed`, saying why). A restart brings every stored endpoint back, each in
its own task, so the first one ready serves without waiting for the others' downloads; a crashed instance is
replaced by the fleet, unless it keeps crashing before it serves: then its endpoint fails. Updates (blue/green,
weights and instance counts) are the deployer's (`deployer.py`).

The store is synchronous SQLAlchemy: every call to it runs in a thread, so a slow store delays the control plane
only, never the streams on the event loop (`records.py` keeps an endpoint's read-modify-writes in order).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from ..errors import ResourceExists, ResourceInUse, ResourceInvalid, ResourceMissing
from ..sizing import serverless_memory_problems
from .autoscaler import Autoscaler, ScalingReport
from .deployer import Deployer, Policy, summaries
from .endpoints import Fleet, VariantPlan
from .records import EndpointRecords
from .resources import (
    ContainerSpec,
    DeploymentConfig,
    DesiredWeightAndCapacity,
    EndpointConfigSpec,
    EndpointRecord,
    EndpointStatus,
    InstanceStart,
    ModelSpec,
    ProductionVariant,
    arn,
)
from .serverless import ServerlessScaler, serverless_plan
from .store import AlreadyExists, Store

if TYPE_CHECKING:
    from .transform_runner import TransformRunner

log = logging.getLogger("servelet.control")


class ControlPlane:
    def __init__(
        self, store: Store, fleet: Fleet, start_timeout: float = 600.0, autoscale_interval: float = 5.0,
        serverless_idle_seconds: float = 300.0, serverless_start_timeout: float = 60.0,
        scaling_report: ScalingReport | None = None, allow_loader_environment: bool = False,
    ):
        self.store = store
        self.records = EndpointRecords(store)
        # SERVELET_ALLOW_LOADER_ENVIRONMENT: the control API takes LD_*, PYTHON*, ... (loader_environment.py).
        self.allow_loader_environment = allow_loader_environment
        self.fleet = fleet
        self.start_timeout = start_timeout
        self._tasks: set[asyncio.Task] = set()
        self._starting: dict[str, asyncio.Task] = {}  # endpoint -> its background start, until it is in the fleet
        self.deployer = Deployer(self.records, fleet, self, start_timeout)
        self.autoscaler = Autoscaler(store, fleet, self.deployer, autoscale_interval, scaling_report)
        self.serverless = ServerlessScaler(store, fleet, start_timeout, serverless_idle_seconds, serverless_start_timeout)
        fleet.on_instance_given_up = self._instance_given_up
        # Runs batch transform jobs (control/transform_runner.py); the gateway sets it, the control API calls it.
        self.transforms: TransformRunner | None = None

    # -- models ---------------------------------------------------------------------------------------------
    async def create_model(self, spec: ModelSpec) -> ModelSpec:
        if not spec.uri:
            raise ResourceInvalid(
                f"model {spec.model_name!r} has no artifact: set PrimaryContainer.ModelDataUrl "
                "(a path, file://, s3://, http(s):// or package:// URI)"
            )
        try:
            await asyncio.to_thread(self.store.add_model, spec)
        except AlreadyExists:
            raise ResourceExists(f'Cannot create already existing model "{arn("model", spec.model_name)}".') from None
        return spec

    async def describe_model(self, name: str) -> ModelSpec:
        model = await asyncio.to_thread(self.store.get_model, name)
        if model is None:
            raise ResourceMissing(f'Could not find model "{arn("model", name)}".')
        return model

    async def list_models(self, name_contains: str | None = None) -> list[ModelSpec]:
        return [m for m in await asyncio.to_thread(self.store.list_models) if _contains(m.model_name, name_contains)]

    async def delete_model(self, name: str) -> None:
        await self.describe_model(name)
        users = await asyncio.to_thread(self._configs_in_service_using, name)
        if users:
            raise ResourceInUse(f"model {name!r} is used by endpoint configs in service: {', '.join(users)}")
        await asyncio.to_thread(self.store.delete_model, name)

    def _configs_in_service_using(self, model_name: str) -> list[str]:
        in_service = {e.endpoint_config_name for e in self.store.list_endpoints()}
        return [c.endpoint_config_name for c in self.store.list_endpoint_configs()
                if c.endpoint_config_name in in_service and any(v.model_name == model_name for v in c.every_variant)]

    # -- endpoint configs -----------------------------------------------------------------------------------
    async def create_endpoint_config(self, spec: EndpointConfigSpec) -> EndpointConfigSpec:
        models = await asyncio.to_thread(self._models_of, spec)
        missing = [name for name, model in models.items() if model is None]
        if missing:
            raise ResourceInvalid(f"Could not find model(s) {', '.join(map(repr, missing))}: create them first")
        multi_model = [name for name, model in models.items() if model.primary_container.mode == "MultiModel"]
        if spec.shadow_production_variants and multi_model:
            raise ResourceInvalid(
                f"ShadowProductionVariants: model {multi_model[0]!r} is a multi-model endpoint's (Mode MultiModel), "
                "which a shadow test cannot copy requests for (SageMaker refuses it too)"
            )
        await self._refuse_oversized(spec, models)
        try:
            await asyncio.to_thread(self.store.add_endpoint_config, spec)
        except AlreadyExists:
            name = arn("endpoint-config", spec.endpoint_config_name)
            raise ResourceExists(f'Cannot create already existing endpoint configuration "{name}".') from None
        return spec

    def _models_of(self, spec: EndpointConfigSpec) -> dict[str, ModelSpec | None]:
        return {v.model_name: self.store.get_model(v.model_name) for v in spec.every_variant}

    async def _refuse_oversized(self, spec: EndpointConfigSpec, models: dict[str, ModelSpec | None]) -> None:
        """A serverless variant whose model cannot fit in its MemorySizeInMB is refused now, with the figures, on
        every path (boto3, the config file, the CLI), rather than failing when its instance loads."""
        if not any(v.serverless_config for v in spec.production_variants):
            return
        problems = await asyncio.to_thread(serverless_memory_problems, spec, models)
        if problems:
            raise ResourceInvalid("; ".join(
                f"ProductionVariants.{i}.ServerlessConfig.MemorySizeInMB: {why}" for i, why in problems
            ))

    async def describe_endpoint_config(self, name: str) -> EndpointConfigSpec:
        config = await asyncio.to_thread(self.store.get_endpoint_config, name)
        if config is None:
            raise ResourceMissing(f'Could not find endpoint configuration "{arn("endpoint-config", name)}".')
        return config

    async def list_endpoint_configs(self, name_contains: str | None = None) -> list[EndpointConfigSpec]:
        configs = await asyncio.to_thread(self.store.list_endpoint_configs)
        return [c for c in configs if _contains(c.endpoint_config_name, name_contains)]

    async def delete_endpoint_config(self, name: str) -> None:
        await self.describe_endpoint_config(name)
        # SageMaker lets a config be deleted under a running endpoint; the endpoint keeps a copy (EndpointRecord).
        await asyncio.to_thread(self.store.delete_endpoint_config, name)

    # -- endpoints ------------------------------------------------------------------------------------------
    async def create_endpoint(
        self, name: str, config_name: str, deployment: DeploymentConfig | None = None,
    ) -> EndpointRecord:
        """Record the endpoint `Creating` and answer; its instances start in the background (`_start`). Its
        `deployment` (checked now) is what a later UpdateEndpoint with RetainDeploymentConfig runs by."""
        config = await self.describe_endpoint_config(config_name)
        Policy.of(deployment)  # an alarm servelet cannot evaluate is refused now, not at the first update
        plans = await asyncio.to_thread(self.plans, config)
        record = EndpointRecord(
            endpoint_name=name, endpoint_config_name=config_name, **summaries(plans),
            async_inference_config=config.async_inference_config, endpoint_config=config,
            last_deployment_config=deployment,
        )
        try:
            await self.records.add(record)
        except AlreadyExists:
            raise ResourceExists(f'Cannot create already existing endpoint "{arn("endpoint", name)}".') from None
        self._start(record, plans)
        return record

    async def describe_endpoint(self, name: str) -> EndpointRecord:
        record = await asyncio.to_thread(self.store.get_endpoint, name)
        if record is None:
            raise ResourceMissing(f'Could not find endpoint "{arn("endpoint", name)}".')
        return self._with_live_counts(record)

    async def list_endpoints(self, name_contains: str | None = None, status: str | None = None) -> list[EndpointRecord]:
        return [
            self._with_live_counts(e) for e in await asyncio.to_thread(self.store.list_endpoints)
            if _contains(e.endpoint_name, name_contains) and (status is None or e.endpoint_status.value == status)
        ]

    async def update_endpoint(
        self,
        name: str,
        config_name: str,
        deployment: DeploymentConfig | None = None,
        retain_variant_properties: set[str] = frozenset(),
        retain_deployment_config: bool = False,
    ) -> EndpointRecord:
        """Move the endpoint to another config, blue/green: status Updating, then InService on the new config, or
        (rolled back) on the old one with a FailureReason."""
        return await self.deployer.update(name, config_name, deployment, retain_variant_properties, retain_deployment_config)

    async def update_weights_and_capacities(self, name: str, desired: list[DesiredWeightAndCapacity]) -> EndpointRecord:
        """New variant weights at once; instances added (Updating until ready) or removed (after they drain)."""
        return await self.deployer.change_weights_and_capacities(name, desired)

    async def delete_endpoint(self, name: str) -> None:
        """Also while it is `Creating`: its start is cancelled, and the instances it started are stopped."""
        await self.describe_endpoint(name)
        await self._cancel_start(name)
        await self.deployer.cancel(name)
        async with self.records.change(name) as record:
            if record is None:
                return  # another deletion was quicker
            record.endpoint_status = EndpointStatus.DELETING
            await self.records.save(record)
        await self.fleet.remove(name)
        await self.records.delete(name)

    async def declare(self, name: str, model_uri: str, instances: int = 1, variant: str = "AllTraffic") -> None:
        """Make endpoint `name` serve `model_uri` on `instances` instances, through a model and config of the same
        name: kept if the store already says so (a restart), replaced if it says something else."""
        model = await asyncio.to_thread(self.store.get_model, name)
        config = await asyncio.to_thread(self.store.get_endpoint_config, name)
        record = await self.records.get(name)
        wanted = [(variant, name, instances)]
        if (
            record is not None and record.endpoint_status is not EndpointStatus.FAILED
            and model is not None and model.uri == model_uri
            and config is not None and record.endpoint_config_name == name
            and [(v.variant_name, v.model_name, v.initial_instance_count) for v in config.production_variants] == wanted
        ):
            return
        if record is not None:
            await self._cancel_start(name)
            await self.fleet.remove(name)
            await self.records.delete(name)
        await asyncio.to_thread(self.store.delete_endpoint_config, name)
        await asyncio.to_thread(self.store.delete_model, name)
        await self.create_model(ModelSpec(model_name=name, primary_container=ContainerSpec(model_data_url=model_uri)))
        await self.create_endpoint_config(EndpointConfigSpec(
            endpoint_config_name=name,
            production_variants=[ProductionVariant(variant_name=variant, model_name=name, initial_instance_count=instances)],
        ))
        await self.create_endpoint(name, name)

    # -- reconciling ----------------------------------------------------------------------------------------
    async def restore(self) -> None:
        """Bring back every stored endpoint (after a restart), each started in its own background task; finish
        deletions that were under way."""
        for record in await asyncio.to_thread(self.store.list_endpoints):
            name = record.endpoint_name
            if record.endpoint_status is EndpointStatus.DELETING:
                await self.records.delete(name)
                continue
            if record.endpoint_status is EndpointStatus.FAILED or name in self.fleet.endpoints or name in self._starting:
                continue
            if record.endpoint_status in (EndpointStatus.UPDATING, EndpointStatus.ROLLING_BACK):
                # An update cut short by the restart: the endpoint comes back on the config it had.
                pending = record.pending_deployment_summary
                record.endpoint_status = EndpointStatus.IN_SERVICE
                record.failure_reason = (
                    f"the update to endpoint config {pending.endpoint_config_name!r} was interrupted by a restart"
                    if pending else record.failure_reason
                )
                record.pending_deployment_summary = None
                await self.records.save(record)
            config = record.endpoint_config or await asyncio.to_thread(self.store.get_endpoint_config, record.endpoint_config_name)
            try:
                plans = await asyncio.to_thread(self.plans, config, record) if config else None
            except ResourceInvalid as exc:
                plans, reason = None, exc.message
            else:
                reason = f"its endpoint config {record.endpoint_config_name!r} no longer exists"
            if plans is None:
                await self._fail(name, f"cannot restore the endpoint: {reason}")
                continue
            log.info("restoring endpoint %s", name)
            await self._keep_serverless_configs(record, plans)
            self._start(record, plans)

    async def close(self) -> None:
        await self.serverless.close()
        await self.autoscaler.close()
        await self.deployer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def plans(self, config: EndpointConfigSpec, record: EndpointRecord | None = None) -> list[VariantPlan]:
        """What to run for `config`; with `record`, the weights and instance counts it was changed to since.
        Public for the deployer, which plans an update's new fleet as creation and restore plan theirs. It reads the
        store: call it in a thread."""
        changed = {v.variant_name: v for v in record.every_variant} if record else {}
        shadows = {v.variant_name for v in config.shadow_production_variants or ()}
        plans = []
        for variant in config.every_variant:
            model = self.store.get_model(variant.model_name)
            if model is None:
                raise ResourceInvalid(
                    f"variant {variant.variant_name!r} names model {variant.model_name!r}, which does not exist"
                )
            plans.append(VariantPlan(
                name=variant.variant_name,
                model_uri=model.uri,
                instances=variant.initial_instance_count or 0,  # serverless: its plan says (below)
                weight=variant.initial_variant_weight,
                env=model.instance_environment(),
                start_timeout=variant.container_startup_health_check_timeout_in_seconds,
                **({"routing": variant.routing_config.routing_strategy} if variant.routing_config else {}),
                shadow=variant.variant_name in shadows,
            ))
            if variant.variant_name in changed:
                plans[-1].weight = changed[variant.variant_name].desired_weight
                plans[-1].instances = changed[variant.variant_name].desired_instance_count
            if variant.serverless_config is not None:
                serverless_plan(plans[-1], variant.serverless_config)
        return plans

    async def _keep_serverless_configs(self, record: EndpointRecord, plans: list[VariantPlan]) -> None:
        """Endpoints stored before their variant states held serverless configs get them from their plans, so a
        later deletion of the endpoint config does not lose them."""
        configs = {p.name: p.serverless for p in plans if p.serverless is not None}
        missing = [v for v in record.production_variants if v.current_serverless_config is None and v.variant_name in configs]
        for variant in missing:
            variant.current_serverless_config = variant.desired_serverless_config = configs[variant.variant_name]
        if missing:
            await self.records.save(record)

    def _start(self, record: EndpointRecord, plans: list[VariantPlan]) -> None:
        """Start the endpoint's instances in a task of its own: resolving a remote model is a download, which
        neither CreateEndpoint nor the restore at start waits for, and one endpoint's does not hold up another's."""
        name = record.endpoint_name
        task = self._spawn(self._deploy(name, plans, record.endpoint_config_name))
        self._starting[name] = task
        task.add_done_callback(lambda _: self._starting.pop(name, None) if self._starting.get(name) is task else None)

    async def _deploy(self, name: str, plans: list[VariantPlan], config_name: str) -> None:
        try:
            await self.fleet.deploy_variants(name, plans, self.start_timeout, config_name)
        except Exception as exc:  # noqa: BLE001 - the endpoint fails saying why, as one whose instances never load
            log.exception("endpoint %s: its instances could not be started", name)
            await self.fleet.remove(name)
            await self._fail(name, f"its instances could not be started: {type(exc).__name__}: {exc}")
            return
        self._spawn(self._await_service(name))

    def starting(self, name: str) -> bool:
        """Whether the endpoint's background start is still fetching its models (it is not in the fleet yet)."""
        return name in self._starting

    async def started(self, name: str) -> None:
        """Wait until the endpoint's background start has put it in the fleet (or failed, or was cancelled)."""
        task = self._starting.get(name)
        if task is not None:
            await asyncio.wait({task})  # not the task's outcome: its failure lands on the endpoint's record

    async def _cancel_start(self, name: str) -> None:
        """Stop a start still resolving models or starting instances; the caller removes what it started."""
        task = self._starting.pop(name, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _instance_given_up(self, name: str, reason: str) -> None:
        """An instance the fleet stopped restarting fails its endpoint in service (creation and updates see it
        themselves): a model that keeps crashing should say so, not be restarted forever."""
        if not self.deployer.updating(name):
            self._spawn(self._fail_in_service(name, reason))

    async def _fail_in_service(self, name: str, reason: str) -> None:
        record = await self.records.get(name)
        if record is None or record.endpoint_status is not EndpointStatus.IN_SERVICE or self.deployer.updating(name):
            return
        await self.fleet.remove(name)
        await self._fail(name, reason, only_if=EndpointStatus.IN_SERVICE)

    async def _await_service(self, name: str) -> None:
        failure = await self.fleet.wait_ready(name, self.start_timeout)
        async with self.records.change(name) as record:
            if record is None or record.endpoint_status is EndpointStatus.DELETING:
                return
            if failure:
                await self.fleet.remove(name)
                await self._failed(record, failure)
                return
            if record.endpoint_status is EndpointStatus.CREATING:
                record.endpoint_status = EndpointStatus.IN_SERVICE
                await self.records.save(record)
                log.info("endpoint %s is InService", name)

    async def _fail(self, name: str, reason: str, only_if: EndpointStatus | None = None) -> None:
        """Fail the stored endpoint (unless it is gone, being deleted, or no longer `only_if`)."""
        async with self.records.change(name) as record:
            if record is None or record.endpoint_status is EndpointStatus.DELETING:
                return
            if only_if is None or record.endpoint_status is only_if:
                await self._failed(record, reason)

    async def _failed(self, record: EndpointRecord, reason: str) -> None:
        record.endpoint_status = EndpointStatus.FAILED
        record.failure_reason = reason
        await self.records.save(record)
        log.error("endpoint %s failed: %s", record.endpoint_name, reason)

    def _with_live_counts(self, record: EndpointRecord) -> EndpointRecord:
        endpoint = self.fleet.endpoints.get(record.endpoint_name)
        record = record.model_copy(deep=True)
        blue = {v.name: v for v in endpoint.blue.every_variant} if endpoint else {}
        for variant in record.every_variant:
            running = blue.get(variant.variant_name)
            variant.current_instance_count = len(running.ready_instances()) if running else 0
            variant.last_instance_starts = [
                InstanceStart(kind=s.kind, init_duration_in_seconds=round(s.seconds, 3), start_time=s.at)
                for s in running.starts
            ] if running and running.starts else None
        pending = record.pending_deployment_summary
        if pending is not None:
            green = endpoint.green if endpoint else None
            live = {v.name: len(v.ready_instances()) for v in green.every_variant} if green else {}
            for variant in pending.every_variant:
                variant.current_instance_count = live.get(variant.variant_name, 0)
            # DesiredServerlessConfig: what the update moves each variant to (None: it will run instances).
            moving_to = {v.variant_name: v.current_serverless_config for v in pending.production_variants}
            for variant in record.production_variants:
                variant.desired_serverless_config = moving_to.get(variant.variant_name)
        return record


def _contains(name: str, fragment: str | None) -> bool:
    return fragment is None or fragment.lower() in name.lower()

