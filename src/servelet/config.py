"""`servelet serve --config FILE`: models and endpoints declared in YAML, applied through the control plane.

The file is validated whole before the gateway starts; each problem names its place in the file
(`endpoints[0].variants[0].model: unknown model 'x'`). At start, what the file declares is made to exist:
missing resources are created, an endpoint whose definition changed is re-created, an unchanged one is kept
(a restart does not restart its instances). Endpoints the file does not name (made with the CLI or boto3) are
left alone: the file declares what must exist, it does not own the store.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from .control.resources import (
    MAX_INSTANCES_PER_VARIANT,
    NAME_PATTERN,
    ContainerSpec,
    EndpointConfigSpec,
    ModelSpec,
    ProductionVariant,
    ServerlessConfig,
    available_runtime,
)
from .errors import ResourceInvalid, ResourceMissing

log = logging.getLogger("servelet.config")

NAME_RULE = "use letters, digits and hyphens (at most 63), starting with a letter or digit"


class ConfigError(ValueError):
    """A config file that cannot be applied; the message names the file and each problem's place in it."""


def _as_text(value: Any) -> Any:
    """YAML reads `16` and `true` as numbers and booleans; an environment holds text."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value) if isinstance(value, (int, float)) else value


Name = Annotated[str, Field(pattern=NAME_PATTERN)]
EnvValue = Annotated[str, BeforeValidator(_as_text)]


class Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, not a silently ignored setting


class ModelEntry(Entry):
    name: Name
    uri: str
    runtime: str = "auto"
    mode: str = Field("SingleModel", description="MultiModel: uri is a prefix; each request names its model.")
    environment: dict[str, EnvValue] = Field(default_factory=dict)

    @field_validator("uri")
    @classmethod
    def _known_scheme(cls, uri: str) -> str:
        try:
            ContainerSpec(model_data_url=uri)
        except ValidationError as exc:
            raise ValueError(exc.errors()[0]["msg"].removeprefix("Value error, ").removeprefix("ModelDataUrl ")) from None
        return uri

    @field_validator("runtime")
    @classmethod
    def _runtime_here(cls, runtime: str) -> str:
        return available_runtime(runtime)

    def spec(self) -> ModelSpec:
        container = ContainerSpec(model_data_url=self.uri, environment=self.environment, mode=self.mode)
        return ModelSpec(model_name=self.name, primary_container=container, runtime=self.runtime)


# SageMaker's names in the resources' messages, and what this file calls them.
YAML_NAMES = {
    "MemorySizeInMB": "memory_size_mb", "MaxConcurrency": "max_concurrency",
    "ProvisionedConcurrency": "provisioned_concurrency", "ServerlessConfig": "serverless",
    "InstanceType": "instance_type", "InitialInstanceCount": "instances",
}


def _in_yaml_terms(exc: ValidationError) -> str:
    """A resource's refusal, with the keys named as this file names them."""
    problems = []
    for err in exc.errors():
        where = ".".join(YAML_NAMES.get(str(p), str(p)) for p in err.get("loc", ()))
        message = err.get("msg", "invalid").removeprefix("Value error, ")
        for sagemaker, yaml_name in YAML_NAMES.items():
            message = message.replace(sagemaker, yaml_name)
        problems.append(f"{where}: {message}" if where else message)
    return "; ".join(problems)


def _checked(build):
    """Build a resource from an entry; its refusal becomes the entry's, in this file's terms."""
    try:
        return build()
    except ValidationError as exc:
        raise ValueError(_in_yaml_terms(exc)) from None


class Serverless(Entry):
    """SageMaker's ServerlessConfig on the variant; its limits are the resource's (control/resources.py)."""

    memory_size_mb: int = 2048
    max_concurrency: int = 20
    provisioned_concurrency: int | None = None

    @model_validator(mode="after")
    def _within_limits(self):
        _checked(self.spec)
        return self

    def spec(self) -> ServerlessConfig:
        return ServerlessConfig.model_validate({
            "MemorySizeInMB": self.memory_size_mb, "MaxConcurrency": self.max_concurrency,
            "ProvisionedConcurrency": self.provisioned_concurrency,
        })


class Autoscaling(Entry):
    """Target tracking for one variant (registered as the policy `servelet-config`; see control/autoscaler.py)."""

    min_instances: int = Field(1, ge=0, le=MAX_INSTANCES_PER_VARIANT)  # 0: scale to zero when idle
    max_instances: int = Field(ge=1, le=MAX_INSTANCES_PER_VARIANT)
    target_concurrent_requests_per_instance: float | None = Field(None, gt=0)
    target_invocations_per_instance_per_minute: float | None = Field(None, gt=0)
    scale_out_cooldown_s: float = Field(60.0, ge=0)
    scale_in_cooldown_s: float = Field(300.0, ge=0)

    @model_validator(mode="after")
    def _one_target(self):
        targets = [self.target_concurrent_requests_per_instance, self.target_invocations_per_instance_per_minute]
        if sum(t is not None for t in targets) != 1:
            raise ValueError(
                "set exactly one target: target_concurrent_requests_per_instance or "
                "target_invocations_per_instance_per_minute"
            )
        if self.min_instances > self.max_instances:
            raise ValueError(f"min_instances ({self.min_instances}) is above max_instances ({self.max_instances})")
        return self


class VariantEntry(Entry):
    name: Name
    model: Name
    instances: int = Field(1, ge=0, le=MAX_INSTANCES_PER_VARIANT)
    weight: float = Field(1.0, ge=0.0)
    instance_type: str | None = None
    serverless: Serverless | None = None
    autoscaling: Autoscaling | None = None

    @model_validator(mode="after")
    def _instances_within_scaling(self):
        scaling = self.autoscaling
        if scaling and self.serverless:
            raise ValueError("a serverless variant scales by itself: remove `autoscaling` or `serverless`")
        if scaling and not scaling.min_instances <= self.instances <= scaling.max_instances:
            raise ValueError(
                f"instances ({self.instances}) must lie within autoscaling's "
                f"min_instances..max_instances ({scaling.min_instances}..{scaling.max_instances})"
            )
        if self.serverless:
            _checked(self.spec)  # the resource's rule on mixing serverless and instances
        return self

    def spec(self) -> ProductionVariant:
        # In SageMaker's names, as a user sends them, so the variant's own checks see what this entry set.
        variant = {"VariantName": self.name, "ModelName": self.model, "InitialVariantWeight": self.weight,
                   "InstanceType": self.instance_type}
        if self.serverless:
            variant["ServerlessConfig"] = self.serverless.spec()
        if not self.serverless or "instances" in self.model_fields_set:
            variant["InitialInstanceCount"] = self.instances
        return ProductionVariant.model_validate(variant)


class AsyncInference(Entry):
    """Stored on the endpoint config in SageMaker's AsyncInferenceConfig shape, for the async-jobs issue."""

    output_path: str
    failure_path: str | None = None
    max_concurrent_invocations_per_instance: int | None = Field(None, ge=1, le=1000)

    def spec(self) -> dict:
        output = {"S3OutputPath": self.output_path} | ({"S3FailurePath": self.failure_path} if self.failure_path else {})
        client = (
            {"ClientConfig": {"MaxConcurrentInvocationsPerInstance": self.max_concurrent_invocations_per_instance}}
            if self.max_concurrent_invocations_per_instance else {}
        )
        return {"OutputConfig": output} | client


class EndpointEntry(Entry):
    name: Name
    variants: list[VariantEntry] = Field(min_length=1, max_length=10)
    async_inference: AsyncInference | None = None

    def spec(self) -> EndpointConfigSpec:
        """Its endpoint config, named as the endpoint (as `servelet deploy` names it)."""
        return EndpointConfigSpec(
            endpoint_config_name=self.name,
            production_variants=[v.spec() for v in self.variants],
            async_inference_config=self.async_inference.spec() if self.async_inference else None,
        )


class ServeConfig(Entry):
    models: list[ModelEntry] = Field(default_factory=list)
    endpoints: list[EndpointEntry] = Field(default_factory=list)

    def declares(self, endpoint: str) -> bool:
        return any(e.name == endpoint for e in self.endpoints)


# -- reading the file -------------------------------------------------------------------------------------
def load_config(path: Path) -> ServeConfig:
    """Read and validate the whole file; ConfigError lists every problem at once."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
    if raw is None:
        raise ConfigError(f"{path}: the file is empty; declare `models:` and `endpoints:`")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the file must be a mapping with `models:` and `endpoints:`, not a {type(raw).__name__}")
    try:
        config = ServeConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_report(path, [_problem(err) for err in exc.errors()])) from None
    problems = _cross_check(config)
    if problems:
        raise ConfigError(_report(path, problems))
    return config


def _report(path: Path, problems: list[str]) -> str:
    return f"{path}: invalid config:\n  " + "\n  ".join(problems)


def _where(loc: tuple) -> str:
    """('endpoints', 0, 'variants', 1, 'model') -> endpoints[0].variants[1].model"""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _problem(err: dict) -> str:
    message = err.get("msg", "invalid").removeprefix("Value error, ")
    kind = err.get("type")
    if kind == "missing":
        message = "required"
    elif kind == "extra_forbidden":
        message = "unknown key"
    elif kind == "too_short":
        message = "declare at least one"
    elif kind == "string_pattern_mismatch" and err.get("ctx", {}).get("pattern") == NAME_PATTERN:
        message = f"{err.get('input')!r} is not a valid name: {NAME_RULE}"
    where = _where(tuple(err.get("loc", ())))
    return f"{where}: {message}" if where else message


def _cross_check(config: ServeConfig) -> list[str]:
    """What one entry cannot see alone: names unique, variants naming declared models, weights that route."""
    problems = _duplicates("models", [m.name for m in config.models])
    problems += _duplicates("endpoints", [e.name for e in config.endpoints])
    models = {m.name for m in config.models}
    for i, endpoint in enumerate(config.endpoints):
        problems += _duplicates(f"endpoints[{i}].variants", [v.name for v in endpoint.variants])
        for j, variant in enumerate(endpoint.variants):
            if variant.model not in models:
                declared = ", ".join(sorted(models)) or "none"
                problems.append(f"endpoints[{i}].variants[{j}].model: unknown model {variant.model!r} (declared: {declared})")
        if sum(v.weight for v in endpoint.variants) <= 0:
            problems.append(f"endpoints[{i}].variants: the weights sum to 0, so no variant would get traffic")
    return problems


def _duplicates(where: str, names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    problems = []
    for index, name in enumerate(names):
        if name in seen:
            problems.append(f"{where}[{index}].name: {name!r} is declared twice (also {where}[{seen[name]}])")
        seen.setdefault(name, index)
    return problems


# -- applying it ----------------------------------------------------------------------------------------------
async def apply_config(plane, config: ServeConfig) -> dict[str, str]:
    """Make the store say what the file says; returns what happened to each endpoint (created, kept, re-created).

    A changed model re-creates the declared endpoints that use it. Instances start in the background, as with
    CreateEndpoint; the endpoints turn InService when they are ready.
    """
    models = {m.name: m.spec() for m in config.models}
    changed_models = set()
    for name, spec in models.items():
        existing = await _described(plane.describe_model(name))
        if existing is not None and _model_key(existing) != _model_key(spec):
            changed_models.add(name)

    outcome: dict[str, str] = {}
    for entry in config.endpoints:
        wanted = entry.spec()
        record = await _described(plane.describe_endpoint(entry.name))
        stored = await _described(plane.describe_endpoint_config(entry.name))
        if record is None:
            outcome[entry.name] = "created"
        elif (
            record.endpoint_status.value != "Failed"
            and record.endpoint_config_name == entry.name
            and stored is not None and _config_key(stored) == _config_key(wanted)
            and not any(v.model in changed_models for v in entry.variants)
        ):
            outcome[entry.name] = "kept"
        else:
            outcome[entry.name] = "re-created"
            await plane.delete_endpoint(entry.name)

    for name in changed_models:
        await plane.delete_model(name)  # ResourceInUse if an endpoint the file does not declare still uses it
    for name, spec in models.items():
        if name in changed_models or await _described(plane.describe_model(name)) is None:
            await plane.create_model(spec)
    for entry in config.endpoints:
        if outcome[entry.name] == "kept":
            continue
        if await _described(plane.describe_endpoint_config(entry.name)) is not None:
            await plane.delete_endpoint_config(entry.name)
        await plane.create_endpoint_config(entry.spec())
        await plane.create_endpoint(entry.name, entry.name)

    for entry in config.endpoints:
        log.info("config: endpoint %s %s", entry.name, outcome[entry.name])
        for variant in entry.variants:
            await _apply_autoscaling(plane, entry.name, variant)
    return outcome


async def _apply_autoscaling(plane, endpoint: str, variant: VariantEntry) -> None:
    """Register the variant's `autoscaling` block; a block removed from the file removes the policy it made."""
    from .control.autoscaler import CONCURRENCY, CONFIG_POLICY, INVOCATIONS, ScalingPolicy, resource_id

    scaler = plane.autoscaler
    scaling = variant.autoscaling
    if scaling is None:
        existing = plane.store.get_scaling_target(resource_id(endpoint, variant.name))
        if existing is not None and existing.policy is not None and existing.policy.policy_name == CONFIG_POLICY:
            await scaler.deregister(endpoint, variant.name)
            log.info("config: endpoint %s variant %s: autoscaling removed", endpoint, variant.name)
        return
    if scaling.target_concurrent_requests_per_instance is not None:
        metric, target = CONCURRENCY, scaling.target_concurrent_requests_per_instance
    else:
        metric, target = INVOCATIONS, scaling.target_invocations_per_instance_per_minute
    policy = ScalingPolicy(
        policy_name=CONFIG_POLICY, metric=metric, target_value=target,
        scale_out_cooldown=round(scaling.scale_out_cooldown_s), scale_in_cooldown=round(scaling.scale_in_cooldown_s),
    )
    await scaler.register_target(endpoint, variant.name, scaling.min_instances, scaling.max_instances)
    try:
        await scaler.put_policy(endpoint, variant.name, policy)
    except ResourceInvalid as exc:  # a policy registered through the API is left as it is
        log.warning("config: endpoint %s variant %s: autoscaling not applied: %s", endpoint, variant.name, exc.message)
        return
    log.info("config: endpoint %s variant %s: autoscaling %d..%d instances, %s = %g",
             endpoint, variant.name, scaling.min_instances, scaling.max_instances, metric, target)


async def _described(call):
    try:
        return await call
    except ResourceMissing:
        return None


def _model_key(spec: ModelSpec) -> tuple:
    return spec.primary_container.model_data_url, spec.primary_container.environment, spec.runtime


def _config_key(spec: EndpointConfigSpec) -> tuple:
    variants = [v.model_dump(mode="json") for v in spec.production_variants]
    return variants, spec.async_inference_config

