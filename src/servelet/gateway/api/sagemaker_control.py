"""The SageMaker control API as boto3's `sagemaker` client sends it: AWS JSON 1.1 over the control plane.

botocore posts every operation to `/` with `X-Amz-Target: SageMaker.<Operation>` and a JSON body, and reads an
error's code from `__type` and its text from `message`. `POST /` without that header is TGI's compat route, so
this module owns the path and hands such requests to `tgi.compat_generate`.
Each operation reads its input shape, calls the `ControlPlane` and answers the service model's output shape.
"""

from __future__ import annotations

import base64
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Annotated, Literal, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import AfterValidator, BaseModel, Field, ValidationError
from pydantic.alias_generators import to_pascal

from ... import objects
from ...control.loader_environment import refuse_loader_environment
from ...control.plane import ControlPlane
from ...control.resources import (
    NAME_PATTERN,
    AsyncInferenceConfig,
    DeploymentConfig,
    DesiredWeightAndCapacity,
    EndpointConfigSpec,
    EndpointRecord,
    ModelSpec,
    Resource,
    arn,
)
from ...errors import GatewayError, ResourceInUse, ResourceMissing
from ...settings import GatewaySettings
from .. import client_json
from ..services import Services, json_body, read_body, services
from . import tgi

log = logging.getLogger("servelet.gateway")

TARGET_HEADER = "x-amz-target"
TARGET_PREFIX = "SageMaker."
AMZ_JSON = "application/x-amz-json-1.1"
NAME_RULE = "use letters, digits and hyphens (at most 63), starting with a letter or digit"
UNSUPPORTED_MEMBER = "servelet does not support this member (it would have no effect here); leave it out"


# -- errors: {"__type": code, "message": text}, as botocore's JSON parser reads them ------------------------
class ControlError(Exception):
    """An error in the control API's own terms: a code botocore raises as ClientError, and an HTTP status."""

    def __init__(self, code: str, message: str, status: int = 400):
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


def invalid(message: str) -> ControlError:
    return ControlError("ValidationException", message)


def control_error(exc: Exception, raises: tuple[str, ...] = ()) -> ControlError:
    """SageMaker answers most refusals with ValidationException (the boto3 waiters rely on it for a missing
    endpoint); ResourceNotFound only where the service model says the operation raises it."""
    if isinstance(exc, ControlError):
        return exc
    if isinstance(exc, ValidationError):
        return invalid(describe(exc))
    if isinstance(exc, ResourceInUse):
        return ControlError("ResourceInUse", exc.message)
    if isinstance(exc, ResourceMissing):
        for code in ("ResourceNotFound", "ObjectNotFoundException"):
            if code in raises:
                return ControlError(code, exc.message)
    if isinstance(exc, GatewayError) and exc.status < 500:
        return invalid(exc.message)
    message = exc.message if isinstance(exc, GatewayError) else f"the control plane failed: {type(exc).__name__}: {exc}"
    return ControlError("InternalFailure", message, 500)


def describe(exc: ValidationError) -> str:
    """One line per problem, naming the field as the user wrote it (`ProductionVariants.0.InitialInstanceCount`)."""
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()))
        message = err.get("msg", "invalid").removeprefix("Value error, ")
        if err.get("type") == "missing":
            message = "required"
        elif err.get("type") == "extra_forbidden":
            message = UNSUPPORTED_MEMBER
        elif err.get("type") == "string_pattern_mismatch" and err.get("ctx", {}).get("pattern") == NAME_PATTERN:
            message = f"{err.get('input')!r} is not a valid name: {NAME_RULE}"
        lines.append(f"{where}: {message}" if where else message)
    return "; ".join(lines) or "the request is not valid"


def render_control_error(error: ControlError) -> Response:
    return answer({"__type": error.code, "message": error.message}, error.status)


def answer(body: dict, status: int = 200) -> Response:
    return JSONResponse(body, status_code=status, media_type=AMZ_JSON, headers={"x-amzn-RequestId": str(uuid.uuid4())})


# -- input shapes: PascalCase like the resources; members servelet does not read are refused -------------
# A ValidationError from any of them (or from the resources) answers ValidationException naming the field.
I = TypeVar("I", bound=BaseModel)


def request_input(shape: type[I], body: dict) -> I:
    """An operation's input. A member servelet does not read (VpcConfig, KmsKeyId, ...) is refused with a
    ValidationException naming it: dropped, it would look honoured. The resources themselves ignore unknown
    fields, so the store reads records that older versions wrote."""
    return shape.model_validate(body, extra="forbid")


class ModelNameInput(Resource):
    model_name: str


class EndpointConfigNameInput(Resource):
    endpoint_config_name: str


class EndpointNameInput(Resource):
    endpoint_name: str


class CreateEndpointInput(Resource):
    endpoint_name: str = Field(pattern=NAME_PATTERN)
    endpoint_config_name: str
    deployment_config: DeploymentConfig | None = Field(
        None, description="Kept as the endpoint's LastDeploymentConfig: an UpdateEndpoint with "
        "RetainDeploymentConfig runs by it.",
    )


class VariantProperty(Resource):
    variant_property_type: Literal["DesiredInstanceCount", "DesiredWeight", "DataCaptureConfig"]


# What RetainAllVariantProperties keeps from the endpoint as it runs, unless ExcludeRetainedVariantProperties names it.
RETAINED_VARIANT_PROPERTIES = frozenset({"DesiredInstanceCount", "DesiredWeight", "DataCaptureConfig"})


class UpdateEndpointInput(Resource):
    endpoint_name: str
    endpoint_config_name: str
    deployment_config: DeploymentConfig | None = Field(
        None, description="BlueGreenUpdatePolicy and AutoRollbackConfiguration; alarms are servelet's own "
        "(AlarmName `servelet:error-rate>0.05` or `servelet:p99-latency>2.5`)."
    )
    retain_all_variant_properties: bool = False
    exclude_retained_variant_properties: list[VariantProperty] = Field(default_factory=list)
    retain_deployment_config: bool = False


class UpdateEndpointWeightsAndCapacitiesInput(Resource):
    endpoint_name: str
    desired_weights_and_capacities: list[DesiredWeightAndCapacity] = Field(min_length=1)


def aware(moment: datetime) -> datetime:
    """Times without a zone (as some stores hand them back) are UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


Moment = Annotated[datetime, AfterValidator(aware)]  # botocore sends epoch seconds
SageMakerStatus = Literal[
    "OutOfService", "Creating", "Updating", "SystemUpdating", "RollingBack", "InService", "Deleting", "Failed",
    "UpdateRollbackFailed",
]


class ListInput(Resource):
    name_contains: str | None = None
    sort_by: Literal["Name", "CreationTime"] = "CreationTime"
    sort_order: Literal["Ascending", "Descending"] = "Descending"
    max_results: int = Field(10, ge=1, le=100)
    next_token: str | None = None
    creation_time_before: Moment | None = None
    creation_time_after: Moment | None = None


class ListEndpointsInput(ListInput):
    sort_by: Literal["Name", "CreationTime", "Status"] = "CreationTime"
    status_equals: SageMakerStatus | None = None
    last_modified_time_before: Moment | None = None
    last_modified_time_after: Moment | None = None


# -- output helpers -------------------------------------------------------------------------------------------
def epoch(moment: datetime) -> float:
    """botocore's JSON protocol sends and parses timestamps as epoch seconds."""
    return aware(moment).timestamp()


def wire(resource: BaseModel, *times: str) -> dict:
    """A resource in PascalCase, its timestamps as epoch seconds."""
    body = resource.model_dump(by_alias=True, mode="json", exclude_none=True, exclude=set(times))
    return body | {to_pascal(t): epoch(getattr(resource, t)) for t in times}


def page(items: list, args: ListInput, name_field: str) -> tuple[list, str | None]:
    """Filter by time, sort, and cut one page; the NextToken says where the next page starts."""
    for field in ("creation_time", "last_modified_time"):
        after, before = getattr(args, f"{field}_after", None), getattr(args, f"{field}_before", None)
        if after or before:
            items = [i for i in items if within(aware(getattr(i, field)), after, before)]
    keys = {
        "Name": lambda i: getattr(i, name_field),
        "CreationTime": lambda i: aware(i.creation_time),
        "Status": lambda i: i.endpoint_status.value,
    }
    items = sorted(items, key=keys[args.sort_by], reverse=args.sort_order == "Descending")
    start = read_token(args.next_token)
    end = start + args.max_results
    return items[start:end], (make_token(end) if end < len(items) else None)


def within(moment: datetime, after: datetime | None, before: datetime | None) -> bool:
    return (after is None or moment > after) and (before is None or moment < before)


def make_token(offset: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"offset": offset}).encode()).decode()


def read_token(token: str | None) -> int:
    if not token:
        return 0
    try:
        offset = client_json.loads(base64.urlsafe_b64decode(token.encode()), max_depth=1)["offset"]
        if isinstance(offset, int) and offset >= 0:
            return offset
    except (ValueError, TypeError, KeyError, client_json.TooDeep):
        pass
    raise invalid("NextToken: not a token this server gave; list again without it")


# -- operations -----------------------------------------------------------------------------------------------
Run = Callable[[ControlPlane, dict], Awaitable[dict]]


@dataclass
class Operation:
    name: str
    run: Run
    input: type[BaseModel]  # documents the body in OpenAPI
    raises: tuple[str, ...] = ()  # the error shapes the service model lists for it


OPERATIONS: dict[str, Operation] = {}
# Every AWS JSON service this path answers, by its X-Amz-Target prefix (autoscaling.py adds its own).
SERVICES: dict[str, dict[str, Operation]] = {TARGET_PREFIX: OPERATIONS}


def add_service(target_prefix: str, operations: dict[str, Operation]) -> None:
    """Serve another AWS JSON 1.1 service on `POST /`, told apart by its `X-Amz-Target` prefix."""
    SERVICES[target_prefix] = operations
    document_operations()


# What GET /openapi.json lists for `POST /`: every X-Amz-Target and its body. Filled in place, as FastAPI builds the
# document at its first request: operations registered after this module (transform jobs, autoscaling) are in it.
DOCUMENTED_TARGETS: list[str] = []
DOCUMENTED_INPUTS: list[dict] = []


def document_operations() -> None:
    operations = [(prefix + name, op.input) for prefix, registry in SERVICES.items() for name, op in registry.items()]
    schema = json_body(*(model for _, model in operations))["requestBody"]["content"]["application/json"]["schema"]
    inputs = schema.get("oneOf", [schema])
    for each, (target, _) in zip(inputs, operations):
        each["title"] = target
        _closed(each)
    DOCUMENTED_TARGETS[:] = [target for target, _ in operations]
    DOCUMENTED_INPUTS[:] = inputs


def operation(name: str, input: type[BaseModel], raises: tuple[str, ...] = (), registry: dict[str, Operation] = OPERATIONS):
    def register(run: Run) -> Run:
        registry[name] = Operation(name, run, input, raises)
        return run

    return register


@operation("CreateModel", ModelSpec, raises=("ResourceLimitExceeded",))
async def create_model(plane: ControlPlane, body: dict) -> dict:
    body = {k: v for k, v in body.items() if k != "CreationTime"}
    refuse_loader_environment(container_environments(body), plane.allow_loader_environment)
    containers = body.pop("Containers", None)
    if containers and "PrimaryContainer" not in body:
        if len(containers) > 1:
            raise invalid("Containers: inference pipelines (more than one container) are not supported; send one")
        body["PrimaryContainer"] = containers[0]
    spec = await plane.create_model(request_input(ModelSpec, body))
    return {"ModelArn": arn("model", spec.model_name)}


def container_environments(body: dict) -> dict[str, object]:
    """Each container's Environment as sent, by where it sits (`Containers.0.Environment`)."""
    containers = body.get("Containers")
    sent = {"PrimaryContainer": body.get("PrimaryContainer")} | {
        f"Containers.{i}": container for i, container in enumerate(containers if isinstance(containers, list) else [])
    }
    return {f"{where}.Environment": c.get("Environment") for where, c in sent.items() if isinstance(c, dict)}


@operation("DescribeModel", ModelNameInput)
async def describe_model(plane: ControlPlane, body: dict) -> dict:
    spec = await plane.describe_model(request_input(ModelNameInput, body).model_name)
    return wire(spec, "creation_time") | {"ModelArn": arn("model", spec.model_name)}


@operation("ListModels", ListInput)
async def list_models(plane: ControlPlane, body: dict) -> dict:
    args = request_input(ListInput, body)
    shown, token = page(await plane.list_models(args.name_contains), args, "model_name")
    summaries = [
        {"ModelName": m.model_name, "ModelArn": arn("model", m.model_name), "CreationTime": epoch(m.creation_time)}
        for m in shown
    ]
    return {"Models": summaries} | ({"NextToken": token} if token else {})


@operation("DeleteModel", ModelNameInput)
async def delete_model(plane: ControlPlane, body: dict) -> dict:
    await plane.delete_model(request_input(ModelNameInput, body).model_name)
    return {}


@operation("CreateEndpointConfig", EndpointConfigSpec, raises=("ResourceLimitExceeded",))
async def create_endpoint_config(plane: ControlPlane, body: dict) -> dict:
    body = {k: v for k, v in body.items() if k != "CreationTime"}
    spec = request_input(EndpointConfigSpec, body)
    if spec.async_inference_config is not None:  # kept as sent, so its members are checked here
        request_input(AsyncInferenceConfig, spec.async_inference_config)
    if spec.data_capture_config is not None:
        capture_destination_allowed(spec.data_capture_config.destination_s3_uri)
    spec = await plane.create_endpoint_config(spec)
    return {"EndpointConfigArn": arn("endpoint-config", spec.endpoint_config_name)}


def capture_destination_allowed(uri: str) -> None:
    """With auth on, a file:// destination must be in SERVELET_FILE_ROOTS, as async and transform outputs."""
    if uri.startswith("file://"):
        try:
            objects.check_confined(uri, uri.removeprefix("file://"))
        except objects.ObjectStoreError as exc:
            raise invalid(f"DataCaptureConfig.DestinationS3Uri: {exc}") from None


def serverless_wire(variants: list[dict]) -> None:
    """As SageMaker describes a serverless variant: its config, and no instance counts (it has none of its own)."""
    for variant in variants:
        if "ServerlessConfig" in variant or "CurrentServerlessConfig" in variant:
            for count in ("InitialInstanceCount", "CurrentInstanceCount", "DesiredInstanceCount"):
                variant.pop(count, None)


@operation("DescribeEndpointConfig", EndpointConfigNameInput)
async def describe_endpoint_config(plane: ControlPlane, body: dict) -> dict:
    spec = await plane.describe_endpoint_config(request_input(EndpointConfigNameInput, body).endpoint_config_name)
    described = wire(spec, "creation_time")
    serverless_wire(described["ProductionVariants"])
    return described | {"EndpointConfigArn": arn("endpoint-config", spec.endpoint_config_name)}


@operation("ListEndpointConfigs", ListInput)
async def list_endpoint_configs(plane: ControlPlane, body: dict) -> dict:
    args = request_input(ListInput, body)
    shown, token = page(await plane.list_endpoint_configs(args.name_contains), args, "endpoint_config_name")
    summaries = [
        {
            "EndpointConfigName": c.endpoint_config_name,
            "EndpointConfigArn": arn("endpoint-config", c.endpoint_config_name),
            "CreationTime": epoch(c.creation_time),
        }
        for c in shown
    ]
    return {"EndpointConfigs": summaries} | ({"NextToken": token} if token else {})


@operation("DeleteEndpointConfig", EndpointConfigNameInput)
async def delete_endpoint_config(plane: ControlPlane, body: dict) -> dict:
    await plane.delete_endpoint_config(request_input(EndpointConfigNameInput, body).endpoint_config_name)
    return {}


@operation("CreateEndpoint", CreateEndpointInput, raises=("ResourceLimitExceeded",))
async def create_endpoint(plane: ControlPlane, body: dict) -> dict:
    args = request_input(CreateEndpointInput, body)
    record = await plane.create_endpoint(args.endpoint_name, args.endpoint_config_name, args.deployment_config)
    return {"EndpointArn": arn("endpoint", record.endpoint_name)}


def endpoint_wire(record: EndpointRecord) -> dict:
    described = wire(record, "creation_time", "last_modified_time")
    described["EndpointArn"] = arn("endpoint", record.endpoint_name)
    described.pop("EndpointConfig", None)  # the record's own copy (resources.EndpointRecord), not SageMaker's
    if record.data_capture is not None:
        described["DataCaptureConfig"] = record.data_capture.summary()
    return described


@operation("DescribeEndpoint", EndpointNameInput)
async def describe_endpoint(plane: ControlPlane, body: dict) -> dict:
    record = await plane.describe_endpoint(request_input(EndpointNameInput, body).endpoint_name)
    # A servelet extension (botocore drops members its model does not know; servelet's CLI reads it).
    events = [
        {"Time": epoch(e.time), "Variant": e.variant, "From": e.from_count, "To": e.to_count, "Reason": e.reason,
         "Status": e.status}
        for e in await plane.autoscaler.events(record.endpoint_name)
    ]
    described = endpoint_wire(record)
    serverless_wire(described.get("ProductionVariants", []))
    return described | ({"ScalingEvents": events} if events else {})


@operation("ListEndpoints", ListEndpointsInput)
async def list_endpoints(plane: ControlPlane, body: dict) -> dict:
    args = request_input(ListEndpointsInput, body)
    # Filtered here rather than by the plane: SageMaker's statuses include some servelet never reports.
    records = [
        r for r in await plane.list_endpoints(args.name_contains)
        if args.status_equals is None or r.endpoint_status.value == args.status_equals
    ]
    shown, token = page(records, args, "endpoint_name")
    fields = ("EndpointName", "EndpointArn", "CreationTime", "LastModifiedTime", "EndpointStatus")
    summaries = [{k: v for k, v in endpoint_wire(r).items() if k in fields} for r in shown]
    return {"Endpoints": summaries} | ({"NextToken": token} if token else {})


@operation("UpdateEndpoint", UpdateEndpointInput, raises=("ResourceLimitExceeded",))
async def update_endpoint(plane: ControlPlane, body: dict) -> dict:
    args = request_input(UpdateEndpointInput, body)
    retained = set()
    if args.retain_all_variant_properties:
        retained = RETAINED_VARIANT_PROPERTIES - {p.variant_property_type for p in args.exclude_retained_variant_properties}
    record = await plane.update_endpoint(
        args.endpoint_name, args.endpoint_config_name, args.deployment_config, retained, args.retain_deployment_config
    )
    return {"EndpointArn": arn("endpoint", record.endpoint_name)}


@operation("UpdateEndpointWeightsAndCapacities", UpdateEndpointWeightsAndCapacitiesInput, raises=("ResourceLimitExceeded",))
async def update_endpoint_weights_and_capacities(plane: ControlPlane, body: dict) -> dict:
    args = request_input(UpdateEndpointWeightsAndCapacitiesInput, body)
    record = await plane.update_weights_and_capacities(args.endpoint_name, args.desired_weights_and_capacities)
    return {"EndpointArn": arn("endpoint", record.endpoint_name)}


@operation("DeleteEndpoint", EndpointNameInput)
async def delete_endpoint(plane: ControlPlane, body: dict) -> dict:
    await plane.delete_endpoint(request_input(EndpointNameInput, body).endpoint_name)
    return {}


# -- the route ------------------------------------------------------------------------------------------------
def find_operation(target: str) -> Operation:
    prefix, _, name = target.rpartition(".")
    operations = SERVICES.get(prefix + ".", {})
    if name not in operations:
        supported = ", ".join(p + n for p, ops in SERVICES.items() for n in ops)
        raise ControlError("UnknownOperationException", f"Operation {target!r} is not supported (supported: {supported})")
    return operations[name]


async def read_input(request: Request, settings: GatewaySettings) -> dict:
    body = await read_body(request, settings.max_payload_bytes)
    if not body.strip():
        return {}  # AWS JSON services take an empty body as no input
    try:
        data = client_json.loads(body, settings.max_json_depth)  # too deep: a ValidationException naming the limit
    except (ValueError, UnicodeDecodeError) as exc:
        raise ControlError("SerializationException", f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise ControlError("SerializationException", f"the request body must be a JSON object, not a {kind}")
    return data


async def call(request: Request, hub: Services) -> Response:
    """Run the operation `X-Amz-Target` names; every failure answers in the control API's error shape."""
    target = request.headers[TARGET_HEADER]
    op = None
    try:
        op = find_operation(target)
        body = await read_input(request, hub.settings)
        return answer(await op.run(hub.plane, body))
    except Exception as exc:  # noqa: BLE001 - botocore must always get an error it can parse
        error = control_error(exc, op.raises if op else ())
        if error.status >= 500:
            log.exception("control operation %s failed", target)
        return render_control_error(error)


router = APIRouter()

DESCRIPTION = f"""Two APIs share this path, told apart by the `X-Amz-Target` header.

**SageMaker control API** (`boto3.client("sagemaker", endpoint_url=...)`): `X-Amz-Target: SageMaker.<Operation>`
with a JSON body (`{AMZ_JSON}`); supported: {", ".join(OPERATIONS)}. Errors answer
`{{"__type": "ValidationException" | "ResourceInUse" | ..., "message": "..."}}`.

**TGI's compat route** (what `huggingface_hub.InferenceClient(model=<this server's URL>)` posts to) when there
is no `X-Amz-Target`: generate, or stream server-sent events when the body says `stream: true`."""


def _closed(schema) -> None:
    """Say that objects take no other members, as request_input refuses them (the resources ignore them)."""
    if isinstance(schema, dict):
        if "properties" in schema:
            schema.setdefault("additionalProperties", False)
        for value in schema.values():
            _closed(value)
    elif isinstance(schema, list):
        for value in schema:
            _closed(value)


def _openapi() -> dict:
    extra = json_body(tgi.TGIRequest)
    document_operations()
    extra["requestBody"]["content"][AMZ_JSON] = {"schema": {"oneOf": DOCUMENTED_INPUTS}}
    extra["parameters"] = [{
        "name": "X-Amz-Target", "in": "header", "required": False,
        "description": "`SageMaker.<Operation>` (or `AnyScaleFrontendService.<Operation>`) for the control APIs; "
        "absent for TGI.",
        "schema": {"type": "string", "enum": DOCUMENTED_TARGETS},
    }]
    return extra


OUTPUT = {"schema": {"type": "object", "description": "The operation's output shape (botocore's service model)."}}
ERROR = {"example": {"__type": "ValidationException", "message": 'Could not find endpoint "..."'}}


@router.post(
    "/",
    tags=["SageMaker control", "TGI"],
    summary="SageMaker control API (with X-Amz-Target), or TGI's compat route (without)",
    description=DESCRIPTION,
    response_model=tgi.GenerateResponse,
    responses={
        200: {"content": {AMZ_JSON: OUTPUT}},
        400: {"description": "A control API error", "content": {AMZ_JSON: ERROR}},
    },
    openapi_extra=_openapi(),
)
async def post_root(request: Request, hub: Services = Depends(services)):
    if TARGET_HEADER in request.headers:
        return await call(request, hub)
    await tgi.as_tgi(request)  # errors from here on render as TGI's
    return await tgi.compat_generate(request, hub)
