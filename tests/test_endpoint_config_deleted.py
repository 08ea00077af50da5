"""An endpoint whose endpoint config was deleted while it ran (SageMaker allows it) comes back after a restart.

It used to come back `Failed`: "its endpoint config no longer exists". The endpoint now keeps a copy of its config.
"""

from __future__ import annotations

import json

import httpx
from conftest import boto, start_gateway, stop_process, wait_for

from servelet.settings import DEFAULT_MODEL_URI

WAIT = {"Delay": 1, "MaxAttempts": 180}


def test_a_restart_restores_an_endpoint_whose_config_was_deleted(tmp_path, model_path):
    env = {"SERVELET_INSTANCES": "0"}
    gateway = start_gateway(tmp_path, env=env, ready=None)
    try:
        sagemaker = boto("sagemaker", gateway.base_url)
        sagemaker.create_model(ModelName="kept", PrimaryContainer={"ModelDataUrl": DEFAULT_MODEL_URI})
        sagemaker.create_endpoint_config(
            EndpointConfigName="kept-v1",
            ProductionVariants=[{"VariantName": "AllTraffic", "ModelName": "kept", "InitialInstanceCount": 1}],
        )
        sagemaker.create_endpoint(EndpointName="kept", EndpointConfigName="kept-v1")
        sagemaker.get_waiter("endpoint_in_service").wait(EndpointName="kept", WaiterConfig=WAIT)
        sagemaker.delete_endpoint_config(EndpointConfigName="kept-v1")
    finally:
        stop_process(gateway.process)

    gateway = start_gateway(tmp_path, env=env, ready=None)  # the same data folder: the same store
    try:
        sagemaker = boto("sagemaker", gateway.base_url)

        def settled() -> bool:  # failed, or serving with its instance ready
            failed = sagemaker.describe_endpoint(EndpointName="kept")["EndpointStatus"] == "Failed"
            return failed or httpx.get(f"{gateway.base_url}/health").json()["endpoints"].get("kept", {}).get("ready")

        assert wait_for(settled, 180)
        described = sagemaker.describe_endpoint(EndpointName="kept")
        assert described["EndpointStatus"] == "InService" and "FailureReason" not in described
        assert described["EndpointConfigName"] == "kept-v1"
        runtime = boto("sagemaker-runtime", gateway.base_url)
        body = {"inputs": "Hello", "parameters": {"max_new_tokens": 2}}
        answer = runtime.invoke_endpoint(EndpointName="kept", Body=json.dumps(body), ContentType="application/json")
        assert "generated_text" in json.loads(answer["Body"].read())
    finally:
        stop_process(gateway.process)
