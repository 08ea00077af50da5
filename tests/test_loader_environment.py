"""Creating a model must not be a way to run code as servelet's user: CreateModel and CreateTransformJob refuse
environment names that change how processes load code (LD_PRELOAD, PYTHONSTARTUP, SERVELET_INSTALL_REQUIREMENTS,
...) with a ValidationException naming the variable, unless SERVELET_ALLOW_LOADER_ENVIRONMENT is on. Gateways with
auth on, driven by boto3 with an admin's SigV4 key made in the store."""

from __future__ import annotations

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from conftest import start_gateway, stop_process
from servelet.control.api_keys import ApiKeys
from servelet.control.loader_environment import why_refused
from servelet.control.secret_box import SecretBox
from servelet.control.store import Store

SETTING = "SERVELET_ALLOW_LOADER_ENVIRONMENT"


def admin_gateway(folder, env: dict[str, str] | None = None):
    """A gateway with auth on and no endpoint, and an admin's SigV4 credentials for it."""
    store = Store(Store.default_url(folder / "data"))
    try:
        key = ApiKeys(store, SecretBox(folder / "data")).create("admin", ["admin"], True).secrets
    finally:
        store.close()
    gateway = start_gateway(folder, env={"SERVELET_AUTH": "true"} | (env or {}), args=["--instances", "0"], ready=None)
    sagemaker = boto3.client(
        "sagemaker", endpoint_url=gateway.base_url, region_name="us-east-1",
        aws_access_key_id=key["access_key_id"], aws_secret_access_key=key["secret_access_key"],
        config=Config(retries={"max_attempts": 1}),
    )
    return gateway, sagemaker


@pytest.fixture(scope="module")
def sagemaker(tmp_path_factory):
    gateway, client = admin_gateway(tmp_path_factory.mktemp("refusing"))
    yield client
    stop_process(gateway.process)


def refusal(call) -> dict:
    with pytest.raises(ClientError) as raised:
        call()
    return raised.value.response["Error"]


LOADER_NAMES = [
    "LD_PRELOAD", "LD_LIBRARY_PATH", "PYTHONPATH", "PYTHONSTARTUP", "PYTHONHOME", "PIP_INDEX_URL",
    "SERVELET_INSTALL_REQUIREMENTS", "servelet_install_requirements", "GCONV_PATH", "OPENSSL_CONF",
    # where processes read code, config and caches from, outside the model's own files
    "HOME", "PATH", "TMPDIR", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "SERVELET_CACHE_DIR",
    "HF_HOME", "HF_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_MODULES_CACHE", "HF_ENDPOINT", "TORCH_HOME",
    "TRUST_REMOTE_CODE", "OPTION_TRUST_REMOTE_CODE", "AWS_CONFIG_FILE",
    "VLLM_PLUGINS", "VLLM_USE_MODELSCOPE", "VLLM_CACHE_ROOT", "VLLM_ALLOW_INSECURE_SERIALIZATION",
]


@pytest.mark.parametrize("name", LOADER_NAMES)
def test_create_model_refuses_a_loader_variable_naming_it_and_why(sagemaker, name):
    model = f"refused-{LOADER_NAMES.index(name)}"
    error = refusal(lambda: sagemaker.create_model(
        ModelName=model, PrimaryContainer={"ModelDataUrl": "/models/any", "Environment": {"OPTION_DTYPE": "auto", name: "x"}},
    ))
    assert error["Code"] == "ValidationException"
    assert f"PrimaryContainer.Environment.{name}: " in error["Message"] and SETTING in error["Message"], error
    assert why_refused(name) in error["Message"], error
    assert refusal(lambda: sagemaker.describe_model(ModelName=model))["Code"] == "ValidationException"  # not created


def test_create_model_refuses_it_in_containers_too(sagemaker):
    error = refusal(lambda: sagemaker.create_model(
        ModelName="in-containers", Containers=[{"ModelDataUrl": "/models/any", "Environment": {"PYTHONSTARTUP": "/tmp/x.py"}}],
    ))
    assert "Containers.0.Environment.PYTHONSTARTUP" in error["Message"], error


def test_ordinary_variables_are_taken(sagemaker):
    environment = {
        "SERVELET_MAX_BATCH_SIZE": "4", "OPTION_MAX_MODEL_LEN": "512", "HF_TASK": "text-generation",
        "OMP_NUM_THREADS": "2", "SAGEMAKER_PROGRAM": "inference.py", "HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_x",
        "VLLM_ATTENTION_BACKEND": "TORCH_SDPA",
    }
    sagemaker.create_model(ModelName="ordinary", PrimaryContainer={"ModelDataUrl": "/models/any", "Environment": environment})
    assert sagemaker.describe_model(ModelName="ordinary")["PrimaryContainer"]["Environment"] == environment


def test_create_transform_job_refuses_a_loader_variable_naming_it(sagemaker):
    sagemaker.create_model(ModelName="transformer", PrimaryContainer={"ModelDataUrl": "/models/any"})
    error = refusal(lambda: sagemaker.create_transform_job(
        TransformJobName="preloading", ModelName="transformer", Environment={"LD_PRELOAD": "/tmp/evil.so"},
        TransformInput={"DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": "s3://bucket/in/"}}},
        TransformOutput={"S3OutputPath": "s3://bucket/out"},
        TransformResources={"InstanceType": "ml.m5.large", "InstanceCount": 1},
    ))
    assert error["Code"] == "ValidationException"
    assert "Environment.LD_PRELOAD" in error["Message"] and SETTING in error["Message"], error
    assert refusal(lambda: sagemaker.describe_transform_job(TransformJobName="preloading"))["Code"] == "ResourceNotFound"


def test_an_administrator_can_allow_them(tmp_path):
    gateway, sagemaker = admin_gateway(tmp_path / "allowing", env={SETTING: "true"})
    try:
        environment = {"LD_PRELOAD": "/opt/lib/libfast.so", "SERVELET_INSTALL_REQUIREMENTS": "true"}
        sagemaker.create_model(ModelName="allowed", PrimaryContainer={"ModelDataUrl": "/models/any", "Environment": environment})
        assert sagemaker.describe_model(ModelName="allowed")["PrimaryContainer"]["Environment"] == environment
    finally:
        stop_process(gateway.process)
