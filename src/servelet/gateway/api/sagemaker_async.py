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

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import JSONResponse

from ... import objects
from ...control.async_queue import Job, JobStatus, new_inference_id
from ...errors import BadRequest, NotFound
from ..errors import error_format
from ..metrics import ASYNC_ENQUEUE_SECONDS
from ..services import Services, note_endpoint, read_body, services
from .sagemaker import ACCOUNT, ENDPOINT_NAME, render_sagemaker_error

INLINE_BODY_BYTES = 128_000
TTL_SECONDS = (60, 21_600)  # RequestTTLSeconds: SageMaker's range; its default is the most
INVOCATION_TIMEOUT_SECONDS = (1, 3_600)
DEFAULT_INVOCATION_TIMEOUT_S = 900
# SageMaker's pattern for InferenceId: printable, no white space, at most 64 characters.
INFERENCE_ID = re.compile(r"^[!-~]{1,64}$")
SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]{1,255}$")
SAFE_PATH = re.compile(r"^[A-Za-z0-9._/-]{1,1024}$")

router = APIRouter(tags=["SageMaker runtime"], dependencies=[Depends(error_format("sagemaker", render_sagemaker_error))])


@router.post(
    "/endpoints/{EndpointName}/async-invocations",
    summary="InvokeEndpointAsync: queue the request; its answer is written to the endpoint's output location",
    status_code=202,
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
    if not INFERENCE_ID.match(inference_id):
        raise BadRequest(f"X-Amzn-SageMaker-Inference-Id {inference_id!r}: 1 to 64 printable characters, no spaces")
    input_location = headers.get("x-amzn-sagemaker-inputlocation")
    body = await read_body(request, INLINE_BODY_BYTES)
    if input_location:
        try:
            objects.parse(input_location)
        except objects.ObjectStoreError as exc:
            raise BadRequest(f"X-Amzn-SageMaker-InputLocation: {exc}") from None
        if body:
            raise BadRequest("send the input either at X-Amzn-SageMaker-InputLocation or as the body, not both")
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
        expires=created + _seconds(headers, "x-amzn-sagemaker-requestttlseconds", TTL_SECONDS, TTL_SECONDS[1]),
        invocation_timeout=_seconds(headers, "x-amzn-sagemaker-invocationtimeoutseconds", INVOCATION_TIMEOUT_SECONDS,
                                    DEFAULT_INVOCATION_TIMEOUT_S),
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


def _output_folder(path: str, headers) -> str:
    """The endpoint's output path, extended by X-Amzn-SageMaker-S3OutputPathExtension when sent."""
    extension = (headers.get("x-amzn-sagemaker-s3outputpathextension") or "").strip("/")
    if not extension:
        return path
    if ".." in extension.split("/") or not SAFE_PATH.match(extension):
        raise BadRequest(f"X-Amzn-SageMaker-S3OutputPathExtension {extension!r}: letters, digits, '-', '_', '.', '/' only, no '..'")
    return objects.join(path, extension)


def _output_name(headers, inference_id: str) -> str:
    """`<InferenceId>.out`, or the X-Amzn-SageMaker-Filename sent."""
    name = headers.get("x-amzn-sagemaker-filename")
    if name is None:
        return f"{inference_id}.out"
    if not SAFE_NAME.match(name) or name in (".", ".."):
        raise BadRequest(f"X-Amzn-SageMaker-Filename {name!r}: letters, digits, '-', '_', '.' only")
    return name


def _seconds(headers, name: str, bounds: tuple[int, int], default: int) -> int:
    value = headers.get(name)
    if value is None:
        return default
    low, high = bounds
    if not value.isdigit() or not low <= int(value) <= high:
        raise BadRequest(f"{name}: {value!r} is not a whole number of seconds from {low} to {high}")
    return int(value)


@router.get(
    "/async-invocations/{InferenceId}",
    summary="The status of an async invocation (a servelet extension: SageMaker tells it only by notification)",
)
async def describe_async_invocation(
    InferenceId: str = Path(..., description="The InferenceId InvokeEndpointAsync answered."),
    services: Services = Depends(services),
):
    job = await asyncio.to_thread(services.jobs.get, InferenceId)
    if job is None:
        raise NotFound(f"no async invocation has InferenceId {InferenceId!r}")
    return describe(job)


def describe(job: Job) -> dict:
    """A job as the status route and `servelet jobs` show it."""
    shown = {
        "InferenceId": job.inference_id, "EndpointName": job.endpoint, "Status": job.status,
        "CreationTime": job.created, "Attempts": job.attempts, "OutputLocation": job.output_location,
    }
    if job.input_location:
        shown["InputLocation"] = job.input_location
    if job.failure_location:
        shown["FailureLocation"] = job.failure_location
    if job.ended:
        shown["EndTime"] = job.ended
    if job.failure_reason:
        shown["FailureReason"] = job.failure_reason
    return shown
