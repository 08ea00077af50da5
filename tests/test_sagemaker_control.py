"""The SageMaker control API through boto3's `sagemaker` client: deployment scripts written for SageMaker run unchanged."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import botocore.parsers
import pytest
from botocore.exceptions import ClientError
from conftest import boto
from pydantic import ValidationError

from servelet.control.resources import EndpointConfigSpec, ModelSpec
from servelet.errors import GatewayError, ResourceInUse, ResourceInvalid, ResourceMissing
from servelet.gateway.api import sagemaker_control as control
from servelet.settings import DEFAULT_MODEL_URI

PROMPT = {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 4}}




@pytest.fixture(scope="module")
def sagemaker(gateway):
    return boto("sagemaker", gateway.base_url)


def model(name: str, uri: str = DEFAULT_MODEL_URI) -> dict:
    return {"ModelName": name, "PrimaryContainer": {"ModelDataUrl": uri}, "ExecutionRoleArn": "arn:aws:iam::1:role/x"}


def variant(name: str, model_name: str, **kwargs) -> dict:
    return {"VariantName": name, "ModelName": model_name, "InitialInstanceCount": 1, "InstanceType": "ml.m5.large"} | kwargs


def refused(call, **kwargs) -> dict:
    """The error boto3 raised, as `{"Code", "Message"}`."""
    with pytest.raises(ClientError) as raised:
        call(**kwargs)
    return raised.value.response["Error"]


# -- the user's story: deploy, wait, invoke, look, tear down -----------------------------------------------------
def test_create_wait_invoke_describe_and_delete_an_endpoint(gateway, sagemaker):
    created = sagemaker.create_model(**model("story-model"))
    assert created["ModelArn"].endswith(":model/story-model")
    config = sagemaker.create_endpoint_config(
        EndpointConfigName="story-config", ProductionVariants=[variant("blue", "story-model")]
    )
    assert config["EndpointConfigArn"].endswith(":endpoint-config/story-config")
    endpoint = sagemaker.create_endpoint(EndpointName="story", EndpointConfigName="story-config")
    assert endpoint["EndpointArn"].endswith(":endpoint/story")
    assert sagemaker.describe_endpoint(EndpointName="story")["EndpointStatus"] in ("Creating", "InService")

    sagemaker.get_waiter("endpoint_in_service").wait(EndpointName="story", WaiterConfig={"Delay": 1, "MaxAttempts": 120})

    answer = boto("sagemaker-runtime", gateway.base_url).invoke_endpoint(
        EndpointName="story", Body=json.dumps(PROMPT), ContentType="application/json"
    )
    assert answer["InvokedProductionVariant"] == "blue"
    assert json.loads(answer["Body"].read())["generated_text"].strip()

    described = sagemaker.describe_endpoint(EndpointName="story")
    assert described["EndpointStatus"] == "InService"
    assert described["EndpointConfigName"] == "story-config"
    assert described["EndpointArn"] == endpoint["EndpointArn"]
    assert described["LastModifiedTime"] >= described["CreationTime"]  # botocore parsed both as datetimes
    [summary] = described["ProductionVariants"]
    assert summary == {
        "VariantName": "blue", "CurrentWeight": 1.0, "DesiredWeight": 1.0,
        "CurrentInstanceCount": 1, "DesiredInstanceCount": 1,
    }
    listed = sagemaker.list_endpoints(NameContains="stor")["Endpoints"]
    assert [(e["EndpointName"], e["EndpointStatus"]) for e in listed] == [("story", "InService")]
    assert sagemaker.list_endpoints(StatusEquals="Failed", NameContains="story")["Endpoints"] == []

    config_described = sagemaker.describe_endpoint_config(EndpointConfigName="story-config")
    [declared] = config_described["ProductionVariants"]
    assert (declared["VariantName"], declared["ModelName"], declared["InitialInstanceCount"]) == ("blue", "story-model", 1)
    model_described = sagemaker.describe_model(ModelName="story-model")
    assert model_described["PrimaryContainer"]["ModelDataUrl"] == DEFAULT_MODEL_URI
    assert model_described["ModelArn"] == created["ModelArn"]

    # What cannot be done while the endpoint runs.
    again = refused(sagemaker.create_endpoint, EndpointName="story", EndpointConfigName="story-config")
    assert again["Code"] == "ValidationException" and "already existing endpoint" in again["Message"]
    in_use = refused(sagemaker.delete_model, ModelName="story-model")
    assert in_use["Code"] == "ResourceInUse" and "story-model" in in_use["Message"]

    sagemaker.delete_endpoint(EndpointName="story")
    sagemaker.get_waiter("endpoint_deleted").wait(EndpointName="story", WaiterConfig={"Delay": 1, "MaxAttempts": 60})
    gone = refused(sagemaker.describe_endpoint, EndpointName="story")
    assert gone == {"Code": "ValidationException", "Message": f'Could not find endpoint "{endpoint["EndpointArn"]}".'}
    sagemaker.delete_endpoint_config(EndpointConfigName="story-config")
    sagemaker.delete_model(ModelName="story-model")
    assert refused(sagemaker.describe_model, ModelName="story-model")["Code"] == "ValidationException"
    assert sagemaker.list_models(NameContains="story")["Models"] == []


def test_lists_filter_sort_and_page(sagemaker):
    for name in ("page-b", "page-a", "page-c"):
        sagemaker.create_model(**model(name))
    first = sagemaker.list_models(NameContains="PAGE-", SortBy="Name", SortOrder="Ascending", MaxResults=2)
    assert [m["ModelName"] for m in first["Models"]] == ["page-a", "page-b"]
    rest = sagemaker.list_models(NameContains="page-", SortBy="Name", SortOrder="Ascending", MaxResults=2,
                                 NextToken=first["NextToken"])
    assert [m["ModelName"] for m in rest["Models"]] == ["page-c"] and "NextToken" not in rest

    pages = sagemaker.get_paginator("list_models").paginate(NameContains="page-", PaginationConfig={"PageSize": 1})
    newest_first = [m["ModelName"] for p in pages for m in p["Models"]]
    assert newest_first == ["page-c", "page-a", "page-b"]  # SageMaker's default: CreationTime, Descending

    later = datetime.now(timezone.utc) + timedelta(hours=1)
    assert len(sagemaker.list_models(NameContains="page-", CreationTimeBefore=later)["Models"]) == 3
    assert sagemaker.list_models(NameContains="page-", CreationTimeAfter=later)["Models"] == []

    sagemaker.create_endpoint_config(EndpointConfigName="page-config", ProductionVariants=[variant("v", "page-a")])
    configs = sagemaker.list_endpoint_configs(NameContains="page")["EndpointConfigs"]
    assert [c["EndpointConfigName"] for c in configs] == ["page-config"]
    assert configs[0]["EndpointConfigArn"].endswith(":endpoint-config/page-config")
    bad = refused(sagemaker.list_models, NextToken="not-ours")
    assert bad["Code"] == "ValidationException" and "NextToken" in bad["Message"]


# -- bad definitions are refused with a message the user can act on ----------------------------------------------
@pytest.fixture(scope="module")
def known_model(sagemaker):
    sagemaker.create_model(**model("known"))
    return "known"


def test_a_variant_naming_an_unknown_model_is_refused(sagemaker):
    error = refused(sagemaker.create_endpoint_config, EndpointConfigName="c-unknown",
                    ProductionVariants=[variant("a", "no-such-model")])
    assert error["Code"] == "ValidationException" and "no-such-model" in error["Message"]


def test_weights_summing_to_zero_are_refused(sagemaker, known_model):
    variants = [variant("a", known_model, InitialVariantWeight=0.0), variant("b", known_model, InitialVariantWeight=0.0)]
    error = refused(sagemaker.create_endpoint_config, EndpointConfigName="c-zero", ProductionVariants=variants)
    assert error["Code"] == "ValidationException" and "sum to 0" in error["Message"]


def test_duplicate_variant_names_are_refused(sagemaker, known_model):
    variants = [variant("a", known_model), variant("a", known_model)]
    error = refused(sagemaker.create_endpoint_config, EndpointConfigName="c-dup", ProductionVariants=variants)
    assert error["Code"] == "ValidationException" and "unique; repeated: a" in error["Message"]


def test_an_instance_count_out_of_range_names_the_field(sagemaker, known_model):
    error = refused(sagemaker.create_endpoint_config, EndpointConfigName="c-many",
                    ProductionVariants=[variant("a", known_model, InitialInstanceCount=1000)])
    assert error["Code"] == "ValidationException"
    assert error["Message"].startswith("ProductionVariants.0.InitialInstanceCount: ")


def test_an_unsupported_uri_scheme_is_refused(sagemaker):
    error = refused(sagemaker.create_model, **model("ftp-model", "ftp://example.com/model.gguf"))
    assert error["Code"] == "ValidationException"
    assert error["Message"].startswith("PrimaryContainer.ModelDataUrl: ") and "scheme is not supported" in error["Message"]


def test_a_model_without_an_artifact_is_refused(sagemaker):
    error = refused(sagemaker.create_model, ModelName="empty", PrimaryContainer={"Image": "some/image"})
    assert error["Code"] == "ValidationException" and "ModelDataUrl" in error["Message"]


def test_a_single_container_in_containers_is_the_primary_container(sagemaker):
    sagemaker.create_model(ModelName="listed-container", Containers=[{"ModelDataUrl": DEFAULT_MODEL_URI}])
    described = sagemaker.describe_model(ModelName="listed-container")
    assert described["PrimaryContainer"]["ModelDataUrl"] == DEFAULT_MODEL_URI
    pipeline = [{"ModelDataUrl": DEFAULT_MODEL_URI}, {"ModelDataUrl": DEFAULT_MODEL_URI}]
    error = refused(sagemaker.create_model, ModelName="pipeline", Containers=pipeline)
    assert error["Code"] == "ValidationException" and "inference pipelines" in error["Message"]


def test_a_bad_resource_name_is_refused(sagemaker):
    error = refused(sagemaker.create_model, **model("not_valid"))
    assert error["Code"] == "ValidationException"
    assert error["Message"].startswith("ModelName: 'not_valid' is not a valid name: use letters, digits and hyphens")


def test_duplicate_names_are_refused(sagemaker, known_model):
    error = refused(sagemaker.create_model, **model(known_model))
    assert error["Code"] == "ValidationException" and "already existing model" in error["Message"]
    sagemaker.create_endpoint_config(EndpointConfigName="c-twice", ProductionVariants=[variant("a", known_model)])
    error = refused(sagemaker.create_endpoint_config, EndpointConfigName="c-twice",
                    ProductionVariants=[variant("a", known_model)])
    assert error["Code"] == "ValidationException" and "already existing endpoint configuration" in error["Message"]
    # A duplicate endpoint name is in test_create_wait_invoke_describe_and_delete_an_endpoint.


def test_an_endpoint_on_a_missing_config_is_refused(sagemaker):
    error = refused(sagemaker.create_endpoint, EndpointName="orphan", EndpointConfigName="no-such-config")
    assert error["Code"] == "ValidationException" and "no-such-config" in error["Message"]


def test_missing_resources_are_validation_errors(sagemaker):
    for call, kwargs in [
        (sagemaker.describe_endpoint, {"EndpointName": "nowhere"}),
        (sagemaker.delete_endpoint, {"EndpointName": "nowhere"}),
        (sagemaker.describe_endpoint_config, {"EndpointConfigName": "nowhere"}),
        (sagemaker.delete_model, {"ModelName": "nowhere"}),
    ]:
        error = refused(call, **kwargs)
        assert error["Code"] == "ValidationException" and error["Message"].startswith("Could not find"), error


# -- the wire: operations, bodies and the path shared with TGI ---------------------------------------------------
def test_an_unknown_operation_is_named(gateway):
    with gateway.http(timeout=30) as http:
        answer = http.post("/", content=b"{}", headers={"X-Amz-Target": "SageMaker.CreateTrainingJob",
                                                         "Content-Type": control.AMZ_JSON})
    assert answer.status_code == 400
    assert answer.json()["__type"] == "UnknownOperationException"
    assert "SageMaker.CreateTrainingJob" in answer.json()["message"]


def test_a_body_that_is_not_json_is_a_serialization_error(gateway):
    with gateway.http(timeout=30) as http:
        answer = http.post("/", content=b"{not json", headers={"X-Amz-Target": "SageMaker.ListModels"})
    assert answer.status_code == 400 and answer.json()["__type"] == "SerializationException"


def test_post_root_without_the_target_is_still_tgi(gateway):
    with gateway.http(timeout=120) as http:
        generated = http.post("/", json=PROMPT)
        refusal = http.post("/", json={"parameters": {}})
    assert generated.status_code == 200 and generated.json()["generated_text"].strip()
    assert refusal.status_code == 422 and set(refusal.json()) == {"error", "error_type"}


def test_openapi_documents_both_apis_on_post_root(gateway):
    with gateway.http(timeout=30) as http:
        post = http.get("/openapi.json").json()["paths"]["/"]["post"]
    content = post["requestBody"]["content"]
    assert set(content) == {"application/json", control.AMZ_JSON}
    titles = [schema["title"] for schema in content[control.AMZ_JSON]["schema"]["oneOf"]]
    [target] = post["parameters"]
    assert target["name"] == "X-Amz-Target" and titles == target["schema"]["enum"]  # each target with its body
    # Operations registered after the control API's module are listed too: transform jobs, Application Auto Scaling.
    assert [f"SageMaker.{name}" for name in control.OPERATIONS] == titles[:len(control.OPERATIONS)]
    assert {"SageMaker.CreateTransformJob", "AnyScaleFrontendService.RegisterScalableTarget"} <= set(titles)


# -- errors as botocore's own parser reads them (no server needed) ----------------------------------------------
def parsed_error(error: control.ControlError) -> dict:
    response = control.render_control_error(error)
    client = boto("sagemaker", "http://127.0.0.1:1")
    return botocore.parsers.JSONParser().parse(
        {"status_code": response.status_code, "headers": dict(response.headers), "body": response.body},
        client.meta.service_model.operation_model("DescribeEndpoint").output_shape,
    )


@pytest.mark.parametrize(
    ("raised", "raises", "code", "status"),
    [
        (ResourceMissing('Could not find endpoint "x".'), (), "ValidationException", 400),
        (ResourceMissing('Could not find endpoint "x".'), ("ResourceNotFound",), "ResourceNotFound", 400),
        (ResourceInvalid("variant 'a' names model 'm', which does not exist"), (), "ValidationException", 400),
        (ResourceInUse("model 'm' is used"), (), "ResourceInUse", 400),
        (GatewayError("the store is unreachable"), (), "InternalFailure", 500),
    ],
)
def test_plane_errors_map_to_the_codes_botocore_raises(raised, raises, code, status):
    error = control.control_error(raised, raises)
    assert error.status == status
    parsed = parsed_error(error)
    assert parsed["Error"] == {"Code": code, "Message": raised.message}
    assert parsed["ResponseMetadata"]["HTTPStatusCode"] == status
    assert parsed["ResponseMetadata"]["RequestId"]


def test_an_unexpected_failure_is_an_internal_failure_naming_it():
    error = control.control_error(KeyError("plane"))
    assert (error.code, error.status) == ("InternalFailure", 500) and "KeyError" in error.message


def test_validation_messages_name_fields_as_the_user_wrote_them():
    bad_config = {
        "EndpointConfigName": "c",
        "ProductionVariants": [{"VariantName": "a", "ModelName": "m", "InitialInstanceCount": -1}],
    }
    with pytest.raises(ValidationError) as raised:
        EndpointConfigSpec.model_validate(bad_config)
    message = control.control_error(raised.value).message
    assert message == "ProductionVariants.0.InitialInstanceCount: Input should be greater than or equal to 0"
    with pytest.raises(ValidationError) as raised:
        ModelSpec.model_validate({})
    assert control.control_error(raised.value).message == "ModelName: required"
