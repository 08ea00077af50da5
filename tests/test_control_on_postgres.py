"""The control plane on a real PostgreSQL store: what boto3 creates survives a gateway restart and serves again."""

from __future__ import annotations

import json

import boto3
from conftest import start_gateway, stop_process
from postgres import new_database

from servelet.settings import DEFAULT_MODEL_URI

KEYS = dict(region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
BODY = json.dumps({"inputs": "The capital of France is", "parameters": {"max_new_tokens": 4}})


def invoke(base_url: str) -> dict:
    runtime = boto3.client("sagemaker-runtime", endpoint_url=base_url, **KEYS)
    answer = runtime.invoke_endpoint(EndpointName="pg", Body=BODY, ContentType="application/json")
    return {"variant": answer["InvokedProductionVariant"], "body": json.loads(answer["Body"].read())}


def test_an_endpoint_kept_in_postgresql_comes_back_after_a_restart(postgres, tmp_path):
    _, url = new_database(postgres)
    env = {"SERVELET_DATABASE_URL": url}
    first = start_gateway(tmp_path / "first", env=env, args=["--instances", "0"], ready=None)
    try:
        sm = boto3.client("sagemaker", endpoint_url=first.base_url, **KEYS)
        sm.create_model(ModelName="pg", PrimaryContainer={"ModelDataUrl": DEFAULT_MODEL_URI})
        sm.create_endpoint_config(EndpointConfigName="pg", ProductionVariants=[
            {"VariantName": "green", "ModelName": "pg", "InitialInstanceCount": 1, "InitialVariantWeight": 1}])
        sm.create_endpoint(EndpointName="pg", EndpointConfigName="pg")
        sm.get_waiter("endpoint_in_service").wait(EndpointName="pg", WaiterConfig={"Delay": 1, "MaxAttempts": 120})
        before = invoke(first.base_url)
    finally:
        stop_process(first.process)

    # Another data folder: everything the second gateway knows comes from PostgreSQL.
    second = start_gateway(tmp_path / "second", env=env, args=["--instances", "0"], ready="pg")
    try:
        sm = boto3.client("sagemaker", endpoint_url=second.base_url, **KEYS)
        sm.get_waiter("endpoint_in_service").wait(EndpointName="pg", WaiterConfig={"Delay": 1, "MaxAttempts": 120})
        assert [e["EndpointName"] for e in sm.list_endpoints()["Endpoints"]] == ["pg"]
        assert invoke(second.base_url) == before == {"variant": "green", "body": before["body"]}
    finally:
        stop_process(second.process)
