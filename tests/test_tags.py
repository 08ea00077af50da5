"""Tags on SageMaker resources through boto3's `sagemaker` client: given at creation, added, replaced, listed page by
page and deleted by the ARN Describe answers; SageMaker's limits refused naming what is wrong; gone with their
resource, so a new one of the same name starts without them.

One gateway that runs no model: its endpoints have no instances and its transform job names an input that does not
exist (it fails at once), so tags are all there is to watch. The store's side also runs on PostgreSQL (one test).
"""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError
from conftest import boto, echo_model, start_gateway, stop_process
from postgres import new_database

from servelet.control.resources import ModelSpec
from servelet.control.store import Store, tags
from servelet.control.tags import TooManyTags


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    running = start_gateway(tmp_path_factory.mktemp("tags"), args=["--instances", "0"], ready=None)
    yield running
    stop_process(running.process)


@pytest.fixture(scope="module")
def model_uri(tmp_path_factory) -> str:
    """A handler model no test starts: a model needs an artifact, not an instance, to be tagged."""
    return echo_model(tmp_path_factory.mktemp("echo"))


@pytest.fixture(scope="module")
def sm(gateway):
    return boto("sagemaker", gateway.base_url, retries={"max_attempts": 1})


def unchecked(base_url: str):
    """A boto3 client that sends what botocore's own checks would stop (page sizes under 50, empty keys, no
    instances), as other SDKs and hand-made requests may."""
    return boto("sagemaker", base_url, retries={"max_attempts": 1}, parameter_validation=False)


@pytest.fixture(scope="module")
def lenient(gateway):
    return unchecked(gateway.base_url)


def tagged(**pairs: str) -> list[dict]:
    return [{"Key": key, "Value": value} for key, value in pairs.items()]


def listed(sm, resource_arn: str) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in sm.list_tags(ResourceArn=resource_arn)["Tags"]}


def refusal(call, **kwargs) -> str:
    """The message of the ValidationException boto3 raised."""
    with pytest.raises(ClientError) as raised:
        call(**kwargs)
    error = raised.value.response["Error"]
    assert error["Code"] == "ValidationException", error
    return error["Message"]


def new_model(sm, model_uri: str, name: str, **tags: str) -> str:
    sm.create_model(ModelName=name, PrimaryContainer={"ModelDataUrl": model_uri}, **({"Tags": tagged(**tags)} if tags else {}))
    return sm.describe_model(ModelName=name)["ModelArn"]


def new_endpoint(sm, name: str, model: str, **tags: str) -> str:
    """An endpoint of no instances (servelet takes 0; botocore asks for 1 at least, so its check is off here)."""
    extra = {"Tags": tagged(**tags)} if tags else {}
    unchecked(sm.meta.endpoint_url).create_endpoint_config(EndpointConfigName=name, ProductionVariants=[
        {"VariantName": "AllTraffic", "ModelName": model, "InitialInstanceCount": 0}], **extra)
    sm.create_endpoint(EndpointName=name, EndpointConfigName=name, **extra)
    return sm.describe_endpoint(EndpointName=name)["EndpointArn"]


def test_tags_given_at_creation_are_listed_by_the_arn_describe_answers(sm, model_uri, tmp_path):
    team = {"team": "search", "cost center": "4711", "note": ""}
    model = new_model(sm, model_uri, "Tagged-Model", **team)
    endpoint = new_endpoint(sm, "tagged-endpoint", "Tagged-Model", stage="prod")
    config = sm.describe_endpoint_config(EndpointConfigName="tagged-endpoint")["EndpointConfigArn"]
    sm.create_transform_job(
        TransformJobName="tagged-job", ModelName="Tagged-Model", Tags=tagged(batch="nightly"),
        TransformInput={"DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": f"file://{tmp_path}/none/"}}},
        TransformOutput={"S3OutputPath": f"file://{tmp_path}/out"},
        TransformResources={"InstanceType": "ml.m5.large", "InstanceCount": 1},
    )
    job = sm.describe_transform_job(TransformJobName="tagged-job")["TransformJobArn"]

    assert model.endswith(":model/tagged-model")  # SageMaker's ARNs carry names in lower case
    assert listed(sm, model) == team
    assert [t["Key"] for t in sm.list_tags(ResourceArn=model)["Tags"]] == sorted(team)
    assert listed(sm, config) == listed(sm, endpoint) == {"stage": "prod"}
    assert listed(sm, job) == {"batch": "nightly"}
    assert listed(sm, model.replace("tagged-model", "Tagged-Model")) == team  # ARNs ignore the name's case


def test_add_replaces_a_key_s_value_and_delete_removes_keys(sm, model_uri):
    model = new_model(sm, model_uri, "retagged", owner="ana")
    answer = sm.add_tags(ResourceArn=model, Tags=tagged(owner="bo", **{"env:tier": "gold/1"}))
    assert answer["Tags"] == tagged(owner="bo", **{"env:tier": "gold/1"})
    assert listed(sm, model) == {"owner": "bo", "env:tier": "gold/1"}

    sm.delete_tags(ResourceArn=model, TagKeys=["owner", "never-set"])  # a key it does not have is no error
    assert listed(sm, model) == {"env:tier": "gold/1"}
    assert sm.list_tags(ResourceArn=model)["Tags"] == tagged(**{"env:tier": "gold/1"})


def test_fifty_tags_list_in_one_page_and_smaller_pages_follow_next_token(sm, lenient, model_uri):
    model = new_model(sm, model_uri, "fifty-tags")
    fifty = {f"key-{n:02}": f"value {n}" for n in range(50)}
    sm.add_tags(ResourceArn=model, Tags=tagged(**dict(list(fifty.items())[:30])))
    sm.add_tags(ResourceArn=model, Tags=tagged(**dict(list(fifty.items())[30:])))
    whole = sm.list_tags(ResourceArn=model, MaxResults=50)
    assert "NextToken" not in whole and len(whole["Tags"]) == 50

    pages, token = [], None
    while len(pages) < 10:  # bounded: 3 pages expected
        page = lenient.list_tags(ResourceArn=model, MaxResults=20, **({"NextToken": token} if token else {}))
        pages.append(page["Tags"])
        token = page.get("NextToken")
        if token is None:
            break
    assert [len(p) for p in pages] == [20, 20, 10]
    assert {t["Key"]: t["Value"] for p in pages for t in p} == fifty
    assert "NextToken" in refusal(lenient.list_tags, ResourceArn=model, NextToken="not-a-token")
    assert "MaxResults" in refusal(lenient.list_tags, ResourceArn=model, MaxResults=0)

    # The 51st is refused, and the refused call changes nothing.
    message = refusal(sm.add_tags, ResourceArn=model, Tags=tagged(**{"key-00": "new", "one-more": "x"}))
    assert "51 tags" in message and "at most 50" in message
    assert listed(sm, model) == fifty


BAD_TAGS = [
    ([{"Key": "", "Value": "x"}], "1 to 128"),
    ([{"Key": "k" * 129, "Value": "x"}], "1 to 128"),
    ([{"Key": "long", "Value": "v" * 257}], "at most 256"),
    ([{"Key": "aws:owner", "Value": "x"}], "reserved"),
    ([{"Key": "AWS:Owner", "Value": "x"}], "reserved"),
    ([{"Key": "a|b", "Value": "x"}], "only letters"),
    ([{"Key": "line", "Value": "one\ntwo"}], "only letters"),
    ([{"Key": "no-value"}], "Value: required"),
    ([{"Key": f"k{n}", "Value": "x"} for n in range(51)], "at most 50"),
]
BAD_TAG_IDS = ["empty-key", "long-key", "long-value", "aws-prefix", "aws-prefix-any-case", "pattern", "control-character",
               "no-value", "51-tags"]


@pytest.fixture(scope="module")
def untagged(sm, model_uri) -> str:
    return new_model(sm, model_uri, "untagged")


@pytest.mark.parametrize(("bad", "says"), BAD_TAGS, ids=BAD_TAG_IDS)
def test_tags_breaking_sagemaker_s_rules_are_refused_naming_the_rule(sm, lenient, model_uri, untagged, bad, says):
    model = untagged
    assert says in refusal(lenient.add_tags, ResourceArn=model, Tags=bad)
    assert listed(sm, model) == {}
    # On a Create operation, the same tags create nothing.
    assert says in refusal(lenient.create_model, ModelName="never-made", Tags=bad,
                           PrimaryContainer={"ModelDataUrl": model_uri})
    assert "Could not find model" in refusal(sm.describe_model, ModelName="never-made")


def test_letters_digits_and_spaces_of_any_script_are_allowed(sm, model_uri):
    model = new_model(sm, model_uri, "unicode-tags")
    tags = {"Kostenstelle Ä": "Größe 42", "チーム": "検索", "k" * 128: "v" * 256, "_.:/=+-@": ""}
    sm.add_tags(ResourceArn=model, Tags=tagged(**tags))
    assert listed(sm, model) == tags


@pytest.mark.parametrize(("arn", "says"), [
    ("arn:aws:sagemaker:local:000000000000:model/no-such-model", 'Could not find model "arn:aws:sagemaker'),
    ("arn:aws:sagemaker:local:000000000000:endpoint/no-such-endpoint", "Could not find endpoint"),
    ("arn:aws:sagemaker:local:000000000000:endpoint-config/nothing", "Could not find endpoint configuration"),
    ("arn:aws:sagemaker:local:000000000000:transform-job/nothing", "Could not find transform job"),
    ("arn:aws:sagemaker:us-east-1:123456789012:model/elsewhere", "Could not find model"),
    ("arn:aws:sagemaker:local:000000000000:notebook-instance/nb", "not 'notebook-instance'"),
    ("arn:aws:sagemaker:local:000000000000:model/", "names no model"),
    ("model/no-arn", "not a SageMaker ARN"),
    ("arn:aws:s3:::bucket", "not a SageMaker ARN"),
    ("arn:aws:sagemaker:local:000000000000:model/" + "m" * 300, "not a SageMaker ARN"),
], ids=["model", "endpoint", "config", "job", "other-account", "other-kind", "no-name", "no-arn", "s3", "too-long"])
def test_an_arn_that_names_nothing_here_is_refused(sm, arn, says):
    for call, kwargs in ((sm.list_tags, {}), (sm.add_tags, {"Tags": tagged(a="b")}), (sm.delete_tags, {"TagKeys": ["a"]})):
        assert says in refusal(call, ResourceArn=arn, **kwargs)


def test_tags_go_with_their_resource(sm, model_uri):
    model = new_model(sm, model_uri, "short-lived", keep="no")
    endpoint = new_endpoint(sm, "short-lived", "short-lived", keep="no")
    config = sm.describe_endpoint_config(EndpointConfigName="short-lived")["EndpointConfigArn"]

    sm.delete_endpoint(EndpointName="short-lived")
    sm.get_waiter("endpoint_deleted").wait(EndpointName="short-lived", WaiterConfig={"Delay": 1, "MaxAttempts": 60})
    sm.delete_endpoint_config(EndpointConfigName="short-lived")
    sm.delete_model(ModelName="short-lived")
    for gone in (model, endpoint, config):
        assert "Could not find" in refusal(sm.list_tags, ResourceArn=gone)

    assert new_model(sm, model_uri, "short-lived") == model
    assert new_endpoint(sm, "short-lived", "short-lived") == endpoint
    assert listed(sm, model) == listed(sm, endpoint) == listed(sm, config) == {}


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_store_keeps_tags_and_adds_their_table_to_a_database_an_older_version_wrote(request, backend, tmp_path):
    url = Store.default_url(tmp_path) if backend == "sqlite" else new_database(request.getfixturevalue("postgres"))[1]
    older = Store(url)
    with older.engine.begin() as connection:  # as a version before tags left it
        tags.drop(connection)
    older.close()
    store = Store(url)
    try:
        store.add_model(ModelSpec(model_name="pg", primary_container={"model_data_url": "/models/x"}))
        resource = store.resource_arn("model", "PG")
        assert resource == "arn:aws:sagemaker:local:000000000000:model/pg"
        store.add_tags(resource, {"b": "1", "a": "2"}, 50)
        store.add_tags(resource, {"b": "3"}, 50)
        with pytest.raises(TooManyTags):
            store.add_tags(resource, {f"k{n}": "" for n in range(49)}, 50)
        assert store.list_tags(resource) == {"a": "2", "b": "3"}
        store.delete_tags(resource, ["a"])
        assert store.list_tags(resource) == {"b": "3"}
        store.delete_model("pg")
        assert store.list_tags(resource) == {} and store.resource_arn("model", "pg") is None
    finally:
        store.close()
