"""Batch transform jobs' control API through boto3's `sagemaker` client: jobs written for SageMaker are created,
described, listed and stopped unchanged, and a job SageMaker would refuse is refused before it runs.

The gateway runs what it accepts; these jobs name an input folder that does not exist, so each ends Failed at
once, before starting an instance: what is checked here is what the API itself does (jobs that run, stop and
resume: test_transform_job.py).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from botocore.exceptions import ClientError
from conftest import boto, start_gateway, stop_process, wait_for

from servelet.control.resources import TransformJobSpec, TransformJobStatus
from servelet.control.store import AlreadyExists, Store
from servelet.settings import DEFAULT_MODEL_URI

MODEL = "transform-model"
MISSING_INPUT = "file:///nonexistent-servelet-input/"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, model_path):
    """No `default` endpoint: transform jobs need a model, not an instance."""
    running = start_gateway(tmp_path_factory.mktemp("transform"), env={"SERVELET_INSTANCES": "0"}, ready=None)
    yield running
    stop_process(running.process)


@pytest.fixture(scope="module")
def sagemaker(gateway):
    client = boto("sagemaker", gateway.base_url)
    client.create_model(ModelName=MODEL, PrimaryContainer={"ModelDataUrl": DEFAULT_MODEL_URI},
                        ExecutionRoleArn="arn:aws:iam::1:role/x")
    return client


def job(name: str, **settings) -> dict:
    """A CreateTransformJob request as SageMaker's documentation writes one."""
    return {
        "TransformJobName": name,
        "ModelName": MODEL,
        "TransformInput": {
            "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": MISSING_INPUT}},
            "ContentType": "application/jsonlines",
            "SplitType": "Line",
        },
        "TransformOutput": {"S3OutputPath": "s3://bucket/output", "AssembleWith": "Line"},
        "TransformResources": {"InstanceType": "ml.m5.large", "InstanceCount": 1},
    } | settings


def refused(call, **kwargs) -> dict:
    """The error boto3 raised, as `{"Code", "Message"}`."""
    with pytest.raises(ClientError) as raised:
        call(**kwargs)
    return raised.value.response["Error"]


# -- the user's story -------------------------------------------------------------------------------------------
def test_create_describe_and_stop_a_job(sagemaker):
    created = sagemaker.create_transform_job(**job(
        "story-job", MaxConcurrentTransforms=4, MaxPayloadInMB=10, BatchStrategy="SingleRecord",
        Environment={"TEMPERATURE": "0"}, DataProcessing={"InputFilter": "$.features", "JoinSource": "Input"},
        ModelClientConfig={"InvocationsTimeoutInSeconds": 60},
    ))
    assert created["TransformJobArn"] == "arn:aws:sagemaker:local:000000000000:transform-job/story-job"

    described = sagemaker.describe_transform_job(TransformJobName="story-job")
    assert described["TransformJobStatus"] in ("InProgress", "Failed")
    assert described["TransformJobArn"] == created["TransformJobArn"]
    assert (described["ModelName"], described["MaxConcurrentTransforms"], described["MaxPayloadInMB"]) == (MODEL, 4, 10)
    assert described["BatchStrategy"] == "SingleRecord"
    assert described["Environment"] == {"TEMPERATURE": "0"}
    assert described["ModelClientConfig"] == {"InvocationsTimeoutInSeconds": 60, "InvocationsMaxRetries": 3}
    assert described["DataProcessing"] == {"InputFilter": "$.features", "JoinSource": "Input"}
    assert described["TransformInput"]["DataSource"]["S3DataSource"]["S3Uri"] == MISSING_INPUT
    assert described["TransformOutput"]["S3OutputPath"] == "s3://bucket/output"
    assert described["TransformResources"] == {"InstanceType": "ml.m5.large", "InstanceCount": 1}
    assert abs(described["CreationTime"] - datetime.now(timezone.utc)) < timedelta(minutes=1)

    assert wait_for(lambda: status(sagemaker, "story-job") == "Failed", 30)
    failed = sagemaker.describe_transform_job(TransformJobName="story-job")
    assert "nonexistent-servelet-input" in failed["FailureReason"] and "TransformEndTime" in failed
    again = refused(sagemaker.stop_transform_job, TransformJobName="story-job")
    assert again["Code"] == "ValidationException" and "Failed" in again["Message"]


def status(sagemaker, name: str) -> str:
    return sagemaker.describe_transform_job(TransformJobName=name)["TransformJobStatus"]


def test_sagemaker_defaults_fill_what_is_unset(gateway, sagemaker):
    sagemaker.create_transform_job(**job("defaults-job"))
    described = sagemaker.describe_transform_job(TransformJobName="defaults-job")
    assert (described["MaxConcurrentTransforms"], described["MaxPayloadInMB"], described["BatchStrategy"]) == (1, 6, "MultiRecord")
    assert described["ModelClientConfig"] == {"InvocationsTimeoutInSeconds": 600, "InvocationsMaxRetries": 3}
    # servelet's progress extension: botocore drops it, the raw JSON carries it.
    with gateway.http() as http:
        raw = http.post("/", headers={"X-Amz-Target": "SageMaker.DescribeTransformJob",
                                      "Content-Type": "application/x-amz-json-1.1"},
                        json={"TransformJobName": "defaults-job"}).json()
    assert raw["Progress"] == {"RecordsDone": 0, "RecordsFailed": 0, "FilesDone": 0, "FilesTotal": 0, "RecordFailures": []}


def test_list_filters_sorts_and_pages(sagemaker):
    names = [f"listed-{i}" for i in range(5)]
    for name in names:
        sagemaker.create_transform_job(**job(name))
    assert wait_for(lambda: all(status(sagemaker, n) == "Failed" for n in names), 30)

    listed = sagemaker.list_transform_jobs(NameContains="LISTED", SortBy="Name", SortOrder="Ascending")
    assert [s["TransformJobName"] for s in listed["TransformJobSummaries"]] == names
    summary = listed["TransformJobSummaries"][0]
    assert summary["TransformJobArn"].endswith(":transform-job/listed-0") and summary["TransformJobStatus"] == "Failed"
    assert summary["LastModifiedTime"] >= summary["CreationTime"] and "FailureReason" in summary

    failed = sagemaker.list_transform_jobs(NameContains="listed", StatusEquals="Failed")["TransformJobSummaries"]
    assert sorted(s["TransformJobName"] for s in failed) == names
    assert not sagemaker.list_transform_jobs(NameContains="listed", StatusEquals="InProgress")["TransformJobSummaries"]

    paged, token = [], None
    while True:
        page = sagemaker.list_transform_jobs(NameContains="listed", MaxResults=2, **({"NextToken": token} if token else {}))
        paged += [s["TransformJobName"] for s in page["TransformJobSummaries"]]
        if not (token := page.get("NextToken")):
            break
    assert paged == names[::-1]  # newest first, SageMaker's default

    assert sagemaker.list_transform_jobs(NameContains="listed", CreationTimeAfter=datetime.now(timezone.utc) + timedelta(hours=1))[
        "TransformJobSummaries"] == []
    assert refused(sagemaker.list_transform_jobs, NextToken="nonsense")["Code"] == "ValidationException"


# -- refusals, named as SageMaker names them ---------------------------------------------------------------------
@pytest.mark.parametrize("settings, named", [
    ({"BatchStrategy": "AllAtOnce"}, "BatchStrategy"),
    ({"MaxConcurrentTransforms": 20, "MaxPayloadInMB": 6}, "MaxConcurrentTransforms (20) × MaxPayloadInMB (6)"),
    ({"DataProcessing": {"InputFilter": "$..features"}}, "InputFilter '$..features'"),
    ({"MaxPayloadInMB": 101}, "MaxPayloadInMB"),
    ({"TransformResources": {"InstanceType": "ml.m5.large", "InstanceCount": 11}}, "TransformResources.InstanceCount"),
    ({"TransformOutput": {"S3OutputPath": "http://example.com/out"}}, "TransformOutput.S3OutputPath"),
    ({"TransformJobName": "not_a_name"}, "TransformJobName"),
])
def test_a_job_sagemaker_would_refuse_is_refused_naming_the_field(sagemaker, settings, named):
    error = refused(sagemaker.create_transform_job, **job("refused-job", **settings))
    assert error["Code"] == "ValidationException"
    assert named in error["Message"]
    assert refused(sagemaker.describe_transform_job, TransformJobName="refused-job")["Code"] == "ResourceNotFound"


def test_unknown_model_duplicate_name_and_unknown_job(sagemaker):
    unknown_model = refused(sagemaker.create_transform_job, **job("orphan-job", ModelName="no-such-model"))
    assert unknown_model == {
        "Code": "ValidationException",
        "Message": 'Could not find model "arn:aws:sagemaker:local:000000000000:model/no-such-model".',
    }

    sagemaker.create_transform_job(**job("twice-job"))
    duplicate = refused(sagemaker.create_transform_job, **job("twice-job"))
    assert duplicate["Code"] == "ResourceInUse" and "transform-job/twice-job" in duplicate["Message"]

    for call in (sagemaker.describe_transform_job, sagemaker.stop_transform_job):
        missing = refused(call, TransformJobName="no-such-job")
        assert missing == {"Code": "ResourceNotFound", "Message": "Could not find requested job with name no-such-job"}


# -- the record and its store, without a gateway -----------------------------------------------------------------
def test_state_sent_by_a_user_is_ignored_and_the_store_keeps_the_runners(tmp_path):
    spec = TransformJobSpec.from_request(job("stored-job", TransformJobStatus="Completed", RecordsDone=7))
    assert (spec.transform_job_status, spec.records_done) == (TransformJobStatus.IN_PROGRESS, 0)

    store = Store(Store.default_url(tmp_path))
    store.add_transform_job(spec)
    with pytest.raises(AlreadyExists):
        store.add_transform_job(spec)
    for i in range(25):
        spec.add_record_failure("a.jsonl", i, "the model answered 500")
    spec.transform_job_status = TransformJobStatus.FAILED
    store.save_transform_job(spec)

    kept = store.get_transform_job("stored-job")
    assert (kept.records_failed, len(kept.record_failures)) == (25, 20)
    assert [j.transform_job_name for j in store.list_transform_jobs(status="Failed")] == ["stored-job"]
    assert store.list_transform_jobs(status=TransformJobStatus.IN_PROGRESS) == []
    assert store.get_transform_job("nothing") is None
    store.close()
