"""`InvokeEndpointAsync` as botocore sends it, and the status of an async invocation.

botocore posts to `/endpoints/{EndpointName}/async-invocations` with the input's location in
`X-Amzn-SageMaker-InputLocation`, or the input itself as the body (up to 128,000 bytes), and reads 202 with
`InferenceId` in the JSON body and the output and failure locations in headers. The output is
`<S3OutputPath>[/<S3OutputPathExtension>]/<Filename or InferenceId.out>`. The job is in the store (control/async_queue.py) before the 202 goes out.
"""

from __future__ import annotations

import asyncio
import re
import time

from botocore.exceptions import BotoCoreError
from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import JSONResponse

from ... import objects
from ...control.async_queue import Job, JobStatus, new_inference_id
from ...errors import BadRequest, NotFound, PayloadTooLarge, Unavailable
from ..auth.rules import INFERENCE_ID
from ..errors import error_format
from ..metrics import ASYNC_ENQUEUE_SECONDS
from ..services import Services, note_endpoint, read_body, services
from .sagemaker import ACCOUNT, ENDPOINT_NAME, check_model_headers, render_sagemaker_error, shown

INLINE_BODY_BYTES = 128_000  # SageMaker's, fixed: botocore clients (and `servelet invoke --async`) rely on it
TTL_SECONDS = (60, 21_600)  # RequestTTLSeconds: SageMaker's range; its default is the most
INVOCATION_TIMEOUT_SECONDS = (1, 3_600)
DEFAULT_INVOCATION_TIMEOUT_S = 900
# SageMaker's pattern for InferenceId (INFERENCE_ID, which the auth rules read too): printable, no white space, at
# most 64 characters.
INFERENCE_ID_RULE = "1 to 64 printable ASCII characters, no spaces"
SECONDS = re.compile(r"[0-9]{1,9}")  # whole seconds, in ASCII digits: int() reads others too, and slowly past 4300
SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]{1,255}$")
SAFE_PATH = re.compile(r"^[A-Za-z0-9._/-]{1,1024}$")

router = APIRouter(tags=["SageMaker runtime"], dependencies=[Depends(error_format("sagemaker", render_sagemaker_error))])

ASCII_SCHEMA = {"type": "string", "maxLength": 1024, "pattern": "^[ -~]*$"}
# What /openapi.json says of the route (it reads its headers and body itself), so that the fuzz run sends them too.
DOCUMENTED_REQUEST = {
    "parameters": [
        {"name": name, "in": "header", "required": False, "schema": schema, "description": description}
        for name, schema, description in [
            ("X-Amzn-SageMaker-InputLocation", {"type": "string", "maxLength": 1024},
             "The input's location (s3://BUCKET/KEY or file:///PATH; with auth on, inside SERVELET_FILE_ROOTS), "
             "or none and the input as the body."),
            ("X-Amzn-SageMaker-RequestTTLSeconds", {"type": "integer", "minimum": TTL_SECONDS[0], "maximum": TTL_SECONDS[1]},
             f"How long the job may wait to start (default {TTL_SECONDS[1]})."),
            ("X-Amzn-SageMaker-InvocationTimeoutSeconds",
             {"type": "integer", "minimum": INVOCATION_TIMEOUT_SECONDS[0], "maximum": INVOCATION_TIMEOUT_SECONDS[1]},
             f"How long the model may take (default {DEFAULT_INVOCATION_TIMEOUT_S})."),
            ("X-Amzn-SageMaker-Inference-Id", {"type": "string", "pattern": "^[!-~]{1,64}$"},
             "The job's id (a new one if none); the same id again is the same job."),
            ("X-Amzn-SageMaker-Content-Type", ASCII_SCHEMA, "The input's content type (else Content-Type's)."),
            ("X-Amzn-SageMaker-Accept", ASCII_SCHEMA, "The output's content type."),
            ("X-Amzn-SageMaker-Custom-Attributes", ASCII_SCHEMA, "Handed to the model as they are."),
            ("X-Amzn-SageMaker-S3OutputPathExtension", {"type": "string", "pattern": SAFE_PATH.pattern},
             "A folder under the endpoint's S3OutputPath."),
            ("X-Amzn-SageMaker-Filename", {"type": "string", "pattern": SAFE_NAME.pattern},
             "The output's name (else <InferenceId>.out)."),
        ]
    ],
    "requestBody": {
        "required": False,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        "description": f"The input itself, up to {INLINE_BODY_BYTES:,} bytes, when no InputLocation names it.",
    },
}


@router.post(
    "/endpoints/{EndpointName}/async-invocations",
    summary="InvokeEndpointAsync: queue the request; its answer is written to the endpoint's output location",
    status_code=202,
    openapi_extra=DOCUMENTED_REQUEST,
)
async def invoke_endpoint_async(request: Request, EndpointName: str = ENDPOINT_NAME, services: Services = Depends(services)):
    # An endpoint restored after a restart that still fetches its model takes jobs: the queue keeps them until
    # its instances are ready (one being created is not InService yet, and its config is not read until it is).
    if EndpointName not in services.fleet.endpoints and not services.plane.starting(EndpointName):
        known = ", ".join(sorted(services.fleet.endpoints)) or "none"
        raise BadRequest(f"Endpoint {EndpointName} of account {ACCOUNT} not found. (endpoints here: {known})")
    config = await services.async_worker.config_of(EndpointName)
    if config is None and EndpointName not in services.fleet.endpoints:
        raise BadRequest(f"Endpoint {EndpointName} of account {ACCOUNT} is being created: invoke it once it is InService")
    if config is None:
        raise BadRequest(
            f"Endpoint {EndpointName} of account {ACCOUNT} is not an asynchronous endpoint: its endpoint config has "
            "no AsyncInferenceConfig (give it one with an OutputConfig.S3OutputPath)"
        )
    note_endpoint(request, EndpointName)
    headers = request.headers
    inference_id = headers.get("x-amzn-sagemaker-inference-id") or new_inference_id()
    if not INFERENCE_ID.fullmatch(inference_id):
        raise BadRequest(f"X-Amzn-SageMaker-Inference-Id {shown(inference_id)}: {INFERENCE_ID_RULE}")
    check_model_headers(headers)
    expires_in = _seconds(headers, "X-Amzn-SageMaker-RequestTTLSeconds", TTL_SECONDS, TTL_SECONDS[1])
    invocation_timeout = _seconds(headers, "X-Amzn-SageMaker-InvocationTimeoutSeconds", INVOCATION_TIMEOUT_SECONDS,
                                  DEFAULT_INVOCATION_TIMEOUT_S)
    input_location = headers.get("x-amzn-sagemaker-inputlocation")
    try:
        body = await read_body(request, INLINE_BODY_BYTES)
    except PayloadTooLarge:
        raise PayloadTooLarge(
            f"the request body is over {INLINE_BODY_BYTES} bytes, the most an async request carries (SageMaker's "
            "limit): put the input in the object store and name it in X-Amzn-SageMaker-InputLocation"
        ) from None
    if input_location:
        if body:
            raise BadRequest("send the input either at X-Amzn-SageMaker-InputLocation or as the body, not both")
        await _check_input(input_location)
    elif not body:
        raise BadRequest(
            "no input: name it in X-Amzn-SageMaker-InputLocation (s3:// or file://), or send it as the body "
            f"(up to {INLINE_BODY_BYTES:,} bytes)"
        )
    output = config.output_config
    try:
        output_location = objects.join(_output_folder(output.s3_output_path, headers), _output_name(headers, inference_id))
        failure_location = objects.join(output.s3_failure_path, f"{inference_id}-error.out") if output.s3_failure_path else None
    except objects.ObjectStoreError as exc:
        raise BadRequest(f"the endpoint's AsyncInferenceConfig output location: {exc}") from None
    created = time.time()
    job = Job(
        inference_id=inference_id, endpoint=EndpointName, status=JobStatus.PENDING.value, created=created,
        expires=created + expires_in, invocation_timeout=invocation_timeout,
        input_location=input_location or None, inline_body=None if input_location else body,
        content_type=headers.get("x-amzn-sagemaker-content-type") or headers.get("content-type") or "application/json",
        accept=headers.get("x-amzn-sagemaker-accept"), custom_attributes=headers.get("x-amzn-sagemaker-custom-attributes"),
        output_location=output_location, failure_location=failure_location,
    )
    began = time.perf_counter()
    job = await services.async_worker.accept(job)
    ASYNC_ENQUEUE_SECONDS.labels(EndpointName).observe(time.perf_counter() - began)
    locations = {"X-Amzn-SageMaker-OutputLocation": job.output_location}
    if job.failure_location:
        locations["X-Amzn-SageMaker-FailureLocation"] = job.failure_location
    return JSONResponse(
        {"InferenceId": job.inference_id, "OutputLocation": job.output_location}
        | ({"FailureLocation": job.failure_location} if job.failure_location else {}),
        status_code=202, headers=locations,
    )


async def _check_input(uri: str) -> None:
    """Refuse now an input location that names nothing this server may read, rather than fail the job later."""
    try:
        found = await objects.exists(uri)
    except objects.ObjectStoreError as exc:
        raise BadRequest(f"X-Amzn-SageMaker-InputLocation: {exc}") from None
    except OSError as exc:  # a path the system refuses to look up (too long, ...)
        raise BadRequest(f"X-Amzn-SageMaker-InputLocation {shown(uri)}: {exc.strerror or exc}") from None
    except BotoCoreError as exc:
        raise Unavailable(f"X-Amzn-SageMaker-InputLocation {shown(uri)}: the object store did not answer: {exc}") from None
    if not found:
        raise BadRequest(f"X-Amzn-SageMaker-InputLocation {shown(uri)}: no object there (upload the input first)")


def _output_folder(path: str, headers) -> str:
    """The endpoint's output path, extended by X-Amzn-SageMaker-S3OutputPathExtension when sent."""
    extension = (headers.get("x-amzn-sagemaker-s3outputpathextension") or "").strip("/")
    if not extension:
        return path
    if ".." in extension.split("/") or not SAFE_PATH.match(extension):
        raise BadRequest(f"X-Amzn-SageMaker-S3OutputPathExtension {shown(extension)}: letters, digits, '-', '_', '.', '/' only, no '..'")
    return objects.join(path, extension)


def _output_name(headers, inference_id: str) -> str:
    """`<InferenceId>.out`, or the X-Amzn-SageMaker-Filename sent."""
    name = headers.get("x-amzn-sagemaker-filename")
    if name is None:
        return f"{inference_id}.out"
    if not SAFE_NAME.match(name) or name in (".", ".."):
        raise BadRequest(f"X-Amzn-SageMaker-Filename {shown(name)}: letters, digits, '-', '_', '.' only")
    return name


def _seconds(headers, name: str, bounds: tuple[int, int], default: int) -> int:
    value = headers.get(name)
    if value is None:
        return default
    low, high = bounds
    if not SECONDS.fullmatch(value) or not low <= int(value) <= high:
        raise BadRequest(f"{name}: {shown(value)} is not a whole number of seconds from {low} to {high}")
    return int(value)


@router.get(
    "/async-invocations/{InferenceId}",
    summary="The status of an async invocation (a servelet extension: SageMaker tells it only by notification)",
)
async def describe_async_invocation(
    InferenceId: str = Path(..., description="The InferenceId InvokeEndpointAsync answered."),
    services: Services = Depends(services),
):
    if not INFERENCE_ID.fullmatch(InferenceId):  # no job can have it
        raise BadRequest(f"InferenceId {shown(InferenceId)}: {INFERENCE_ID_RULE}")
    job = await asyncio.to_thread(services.jobs.get, InferenceId)
    if job is None:
        raise NotFound(f"no async invocation has InferenceId {InferenceId!r}")
    return describe(job)


def describe(job: Job) -> dict:
    """A job as the status route and `servelet jobs` show it."""
    described = {
        "InferenceId": job.inference_id, "EndpointName": job.endpoint, "Status": job.status,
        "CreationTime": job.created, "Attempts": job.attempts, "OutputLocation": job.output_location,
    }
    if job.input_location:
        described["InputLocation"] = job.input_location
    if job.failure_location:
        described["FailureLocation"] = job.failure_location
    if job.ended:
        described["EndTime"] = job.ended
    if job.failure_reason:
        described["FailureReason"] = job.failure_reason
    return described
