"""SageMaker batch transform's control operations, as boto3's `sagemaker` client sends them.

They join sagemaker_control's registry (same route, same errors, same paging), so importing this module is what
serves them. This module checks a job, stores it and hands it to the runner (`plane.transforms`, which the gateway
sets); the runner reads the inputs, calls the model and keeps the job's status and progress in the store.
"""

from __future__ import annotations

import asyncio

from ... import objects
from ...control.loader_environment import refuse_loader_environment
from ...control.plane import ControlPlane
from ...control.resources import (
    TRANSFORM_JOB_PROGRESS,
    Resource,
    TransformJobSpec,
    TransformJobStatus,
    arn,
)
from ...control.store import AlreadyExists
from ...errors import ResourceInUse, ResourceMissing
from .sagemaker_control import ListEndpointsInput, epoch, invalid, operation, page, request_input, wire

# The job's kind in its ARN, and the times the wire carries as epoch seconds when set.
JOB_KIND = "transform-job"
JOB_TIMES = ("creation_time", "transform_start_time", "transform_end_time")


class TransformJobNameInput(Resource):
    transform_job_name: str


class ListTransformJobsInput(ListEndpointsInput):
    status_equals: TransformJobStatus | None = None


def missing_job(name: str) -> ResourceMissing:
    return ResourceMissing(f"Could not find requested job with name {name}")


async def find_job(plane: ControlPlane, name: str) -> TransformJobSpec:
    job = await asyncio.to_thread(plane.store.get_transform_job, name)  # the store off the event loop
    if job is None:
        raise missing_job(name)
    return job


def to_alias(field: str) -> str:
    return TransformJobSpec.model_fields[field].alias


def job_wire(job: TransformJobSpec) -> dict:
    """DescribeTransformJob's shape, with servelet's progress counts under `Progress` (botocore drops it; the
    CLI and scripts reading the JSON see it)."""
    body = wire(job, *(t for t in JOB_TIMES if getattr(job, t) is not None))
    body.pop("LastModifiedTime", None)  # not in DescribeTransformJob's shape
    progress = {key: body.pop(key) for key in map(to_alias, TRANSFORM_JOB_PROGRESS)}
    return body | {"TransformJobArn": arn(JOB_KIND, job.transform_job_name), "Progress": progress}


def summary_wire(job: TransformJobSpec) -> dict:
    summary = {
        "TransformJobName": job.transform_job_name,
        "TransformJobArn": arn(JOB_KIND, job.transform_job_name),
        "CreationTime": epoch(job.creation_time),
        "LastModifiedTime": epoch(job.last_modified_time),
        "TransformJobStatus": job.transform_job_status.value,
    }
    if job.transform_end_time is not None:
        summary["TransformEndTime"] = epoch(job.transform_end_time)
    if job.failure_reason:
        summary["FailureReason"] = job.failure_reason
    return summary


@operation("CreateTransformJob", TransformJobSpec, raises=("ResourceNotFound", "ResourceInUse", "ResourceLimitExceeded"))
async def create_transform_job(plane: ControlPlane, body: dict) -> dict:
    refuse_loader_environment({"Environment": body.get("Environment")}, plane.allow_loader_environment)
    job = TransformJobSpec.from_request(body)
    if await asyncio.to_thread(plane.store.get_model, job.model_name) is None:
        # SageMaker's words, and a ValidationException (not ResourceNotFound) as SageMaker answers it.
        raise invalid(f'Could not find model "{arn("model", job.model_name)}".')
    for uri in (job.transform_input.data_source.s3_data_source.s3_uri, job.transform_output.s3_output_path):
        if not uri.startswith("s3://"):
            try:
                objects.check_confined(uri, uri.removeprefix("file://"))
            except objects.ObjectStoreError as exc:
                raise invalid(str(exc)) from None
    try:
        await asyncio.to_thread(plane.store.add_transform_job, job)
    except AlreadyExists:
        raise ResourceInUse(
            "Job name must be unique within an AWS account and region, and a job with this name already exists "
            f"({arn(JOB_KIND, job.transform_job_name)})"
        ) from None
    if plane.transforms is not None:
        plane.transforms.start(job)
    return {"TransformJobArn": arn(JOB_KIND, job.transform_job_name)}


@operation("DescribeTransformJob", TransformJobNameInput, raises=("ResourceNotFound",))
async def describe_transform_job(plane: ControlPlane, body: dict) -> dict:
    return job_wire(await find_job(plane, request_input(TransformJobNameInput, body).transform_job_name))


@operation("StopTransformJob", TransformJobNameInput, raises=("ResourceNotFound",))
async def stop_transform_job(plane: ControlPlane, body: dict) -> dict:
    job = await find_job(plane, request_input(TransformJobNameInput, body).transform_job_name)
    if job.transform_job_status != TransformJobStatus.IN_PROGRESS:
        raise invalid(
            f"The transform job {job.transform_job_name} is {job.transform_job_status.value}: "
            "only a job InProgress can be stopped"
        )
    job.transform_job_status = TransformJobStatus.STOPPING
    await asyncio.to_thread(plane.store.save_transform_job, job)
    if plane.transforms is not None:
        await plane.transforms.stop(job.transform_job_name)
    return {}


@operation("ListTransformJobs", ListTransformJobsInput)
async def list_transform_jobs(plane: ControlPlane, body: dict) -> dict:
    args = request_input(ListTransformJobsInput, body)
    jobs = await asyncio.to_thread(plane.store.list_transform_jobs, args.name_contains, args.status_equals)
    if args.sort_by == "Status":
        # `page` sorts by status through the endpoint's field; its Name sort reads any field it is given.
        shown, token = page(jobs, args.model_copy(update={"sort_by": "Name"}), "transform_job_status")
    else:
        shown, token = page(jobs, args, "transform_job_name")
    return {"TransformJobSummaries": [summary_wire(j) for j in shown]} | ({"NextToken": token} if token else {})
