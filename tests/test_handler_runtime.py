"""A user's SageMaker `inference.py` deployed through the control plane and invoked with boto3, unchanged."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import SERVELET, boto, start_gateway, stop_process

from servelet.runtimes.handler import HandlerError, HandlerRuntime
from servelet.settings import InstanceSettings

FACTOR = 3.0
GREETING = "hello from model_fn"

# Only model_fn and predict_fn: the body is read and the answer written by the toolkit's defaults; the arithmetic
# lives in a sibling module of inference.py, which must import as it does on SageMaker.
SCALER = '''
import json, os
from scaling import scale

def model_fn(model_dir):
    with open(os.path.join(model_dir, "model.json")) as f:
        return json.load(f)["factor"]

def predict_fn(data, factor):
    return scale(data, factor)
'''
SCALING = "def scale(data, factor):\n    return data * factor\n"

TRANSFORM = '''
import json, os

def model_fn(model_dir):
    with open(os.path.join(model_dir, "greeting.txt")) as f:
        return f.read().strip()

def transform_fn(model, body, content_type, accept):
    seen = {"greeting": model, "body": body.decode(), "content_type": content_type, "accept": accept}
    return json.dumps(seen), "application/json"
'''

BROKEN = '''
def model_fn(model_dir):
    return None

def predict_fn(data, model):
    raise ValueError(f"bad things happened to {data.tolist()}")
'''

SLOW = '''
import json, time

def model_fn(model_dir):
    return None

def transform_fn(model, body, content_type, accept):
    seconds = json.loads(body)["sleep"]
    time.sleep(seconds)
    return json.dumps({"slept": seconds}), "application/json"
'''
INVOCATION_TIMEOUT_S = 4


def handler_folder(root: Path, name: str, script: str, files: dict[str, str] | None = None, at_top: bool = False) -> Path:
    """A SageMaker model folder: `code/inference.py` (or `inference.py` at the top) and its model files."""
    folder = root / name
    code = folder if at_top else folder / "code"
    code.mkdir(parents=True)
    (code / "inference.py").write_text(textwrap.dedent(script))
    for relative, text in (files or {}).items():
        (folder / relative).write_text(text)
    return folder


def deploy(sagemaker, name: str, uri: str, environment: dict[str, str] | None = None) -> None:
    container = {"ModelDataUrl": uri} | ({"Environment": environment} if environment else {})
    sagemaker.create_model(ModelName=name, PrimaryContainer=container, ExecutionRoleArn="arn:aws:iam::1:role/x")
    variant = {"VariantName": "AllTraffic", "ModelName": name, "InitialInstanceCount": 1, "InstanceType": "ml.m5.large"}
    sagemaker.create_endpoint_config(EndpointConfigName=name, ProductionVariants=[variant])
    sagemaker.create_endpoint(EndpointName=name, EndpointConfigName=name)


def wait_in_service(sagemaker, *names: str) -> None:
    for name in names:
        sagemaker.get_waiter("endpoint_in_service").wait(EndpointName=name, WaiterConfig={"Delay": 1, "MaxAttempts": 120})


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("handlers")
    handler_folder(root, "scaler", SCALER, {"model.json": json.dumps({"factor": FACTOR}), "code/scaling.py": SCALING})
    handler_folder(root, "transform", TRANSFORM, {"greeting.txt": GREETING + "\n"}, at_top=True)
    handler_folder(root, "broken", BROKEN)
    handler_folder(root, "slow", SLOW)
    return root


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, models):
    env = {"SERVELET_INVOCATION_TIMEOUT": str(INVOCATION_TIMEOUT_S)}
    running = start_gateway(tmp_path_factory.mktemp("gateway"), env=env, args=["--instances", "0"], ready=None)
    sagemaker = boto("sagemaker", running.base_url)
    names = ("scaler", "transform", "broken", "slow")
    for name in names:
        deploy(sagemaker, name, str(models / name))
    wait_in_service(sagemaker, *names)
    yield running
    stop_process(running.process)


@pytest.fixture(scope="module")
def runtime(gateway):
    return boto("sagemaker-runtime", gateway.base_url, retries={"max_attempts": 1})


def invoke(runtime, endpoint: str, body: bytes | str, content_type: str, accept: str | None = None) -> tuple[bytes, str]:
    extra = {"Accept": accept} if accept else {}
    answer = runtime.invoke_endpoint(EndpointName=endpoint, Body=body, ContentType=content_type, **extra)
    return answer["Body"].read(), answer["ContentType"]


# -- the toolkit's default decoders and encoders around the user's predict_fn ----------------------------------
def test_json_in_json_out(runtime):
    numbers = [1, 2.5, -4]
    body, content_type = invoke(runtime, "scaler", json.dumps(numbers), "application/json")
    assert content_type == "application/json"
    assert json.loads(body) == [x * FACTOR for x in numbers]


@pytest.mark.parametrize("accept", ["*/*", "application/json", "text/html, application/json"])
def test_accept_any_or_a_list_answers_the_first_type_it_can(runtime, accept):
    body, content_type = invoke(runtime, "scaler", "[[1, 2], [3, 4]]", "application/json", accept)
    assert content_type == "application/json"
    assert json.loads(body) == [[1 * FACTOR, 2 * FACTOR], [3 * FACTOR, 4 * FACTOR]]


def test_csv_in_csv_out(runtime):
    rows = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    body, content_type = invoke(runtime, "scaler", "1,2,3\n4,5,6\n", "text/csv", "text/csv")
    assert content_type.startswith("text/csv")
    assert np.loadtxt(io.StringIO(body.decode()), delimiter=",").tolist() == (rows * FACTOR).tolist()


def test_npy_in_npy_out(runtime):
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    sent = io.BytesIO()
    np.save(sent, array)
    body, content_type = invoke(runtime, "scaler", sent.getvalue(), "application/x-npy", "application/x-npy")
    assert content_type == "application/x-npy"
    answer = np.load(io.BytesIO(body), allow_pickle=False)
    assert answer.shape == (2, 3) and answer.tolist() == (array * FACTOR).tolist()


def test_a_content_type_without_a_decoder_is_refused_naming_the_accepted_ones(runtime):
    with pytest.raises(runtime.exceptions.ValidationError) as raised:
        invoke(runtime, "scaler", "<numbers/>", "application/xml")
    message = raised.value.response["Error"]["Message"]
    assert "application/xml" in message and "application/json" in message and "text/csv" in message


def test_an_accept_without_an_encoder_is_the_models_406(runtime):
    with pytest.raises(runtime.exceptions.ModelError) as raised:
        invoke(runtime, "scaler", "[1]", "application/json", "application/xml")
    error = raised.value.response
    assert error["OriginalStatusCode"] == 406
    assert "application/xml" in error["OriginalMessage"] and "application/x-npy" in error["OriginalMessage"]


@pytest.mark.parametrize("body", ["[1, 2", "[" * 5000 + "]" * 5000], ids=["cut short", "nested too deep"])
def test_a_body_that_is_not_what_it_says_is_refused(runtime, body):
    with pytest.raises(runtime.exceptions.ValidationError) as raised:
        invoke(runtime, "scaler", body, "application/json")
    assert "not valid application/json" in raised.value.response["Error"]["Message"]


# -- transform_fn, and a handler that raises ---------------------------------------------------------------------
def test_transform_fn_gets_the_model_the_body_and_both_types(runtime):
    body, content_type = invoke(runtime, "transform", "just text", "text/plain; charset=utf-8")
    assert content_type == "application/json"
    assert json.loads(body) == {
        "greeting": GREETING, "body": "just text", "content_type": "text/plain; charset=utf-8", "accept": "application/json",
    }


def test_a_handler_exception_is_a_model_error_with_its_message(gateway, runtime):
    with pytest.raises(runtime.exceptions.ModelError) as raised:
        invoke(runtime, "broken", "[7, 8]", "application/json")
    error = raised.value.response
    assert error["OriginalStatusCode"] == 500
    assert error["OriginalMessage"] == "ValueError: bad things happened to [7, 8]"
    assert "bad things" in error["Error"]["Message"]
    log = gateway.log()  # the instance's traceback, relayed by the gateway
    assert "Traceback" in log and 'raise ValueError(f"bad things happened to' in log


def test_a_model_slower_than_the_invocation_timeout_is_a_model_error_and_its_endpoint_still_serves(runtime):
    started = time.monotonic()
    with pytest.raises(runtime.exceptions.ModelError) as raised:
        invoke(runtime, "slow", json.dumps({"sleep": 10}), "application/json")
    assert time.monotonic() - started < 9  # the gateway gave up; it did not wait for the model
    error = raised.value.response
    assert error["OriginalStatusCode"] == 0  # as SageMaker answers a container that does not answer in time
    assert f"did not answer within {INVOCATION_TIMEOUT_S} s" in error["OriginalMessage"]
    with pytest.raises(runtime.exceptions.ModelError, match="did not answer within"):  # a stream must start in time
        runtime.invoke_endpoint_with_response_stream(
            EndpointName="slow", Body=json.dumps({"sleep": 10}), ContentType="application/json"
        )
    body, _ = invoke(runtime, "slow", json.dumps({"sleep": 0}), "application/json")
    assert json.loads(body) == {"slept": 0}


# -- `servelet new handler`: a template that tests green and deploys -----------------------------------------------
def test_new_handler_writes_a_folder_whose_test_passes_and_which_deploys(gateway, runtime, tmp_path):
    made = subprocess.run([SERVELET, "new", "handler", "pricing"], cwd=tmp_path, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    folder = tmp_path / "pricing"
    assert {"code/inference.py", "code/requirements.txt", "model.json", "test_handler.py", "README.md"} <= {
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()
    }
    readme = (folder / "README.md").read_text()
    assert "servelet deploy ./pricing --name pricing" in readme and "tar -czf model.tar.gz" in readme

    tested = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_handler.py"],
        cwd=folder, capture_output=True, text=True, timeout=120,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "2 passed" in tested.stdout

    sagemaker = boto("sagemaker", gateway.base_url)
    deploy(sagemaker, "pricing", str(folder))
    wait_in_service(sagemaker, "pricing")
    rows = [[1, 2, 3], [10, 0, -1]]
    body, _ = invoke(runtime, "pricing", json.dumps({"instances": rows}), "application/json")
    params = json.loads((folder / "model.json").read_text())
    expected = [sum(w * x for w, x in zip(params["weights"], row)) + params["bias"] for row in rows]
    assert json.loads(body)["predictions"] == pytest.approx(expected)


def test_new_handler_refuses_a_folder_that_holds_files(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep me")
    refused = subprocess.run([SERVELET, "new", "handler", "taken"], cwd=tmp_path, capture_output=True, text=True)
    assert refused.returncode == 2
    assert "already exists" in refused.stderr
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["mine.txt"]


# -- loading: what a script must define, and its requirements ------------------------------------------------------
def test_a_script_without_model_fn_does_not_load_and_says_why(tmp_path):
    folder = handler_folder(tmp_path, "no-model-fn", "def predict_fn(data, model):\n    return data\n")
    with pytest.raises(HandlerError, match="defines no model_fn"):
        HandlerRuntime(folder, InstanceSettings(model=str(folder)))


def test_transform_fn_beside_the_steps_is_refused(tmp_path):
    script = TRANSFORM + "\ndef input_fn(body, content_type):\n    return body\n"
    folder = handler_folder(tmp_path, "mixed", script, {"greeting.txt": "hi"})
    with pytest.raises(HandlerError, match="transform_fn and input_fn"):
        HandlerRuntime(folder, InstanceSettings(model=str(folder)))


def test_requirements_install_only_when_asked(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip must not reach out: what it cannot find locally fails at once
    monkeypatch.setenv("SERVELET_CACHE_DIR", str(tmp_path / "cache"))
    script = "import json\n\ndef model_fn(model_dir):\n    return 1\n"
    missing = handler_folder(tmp_path, "missing", script, {"code/requirements.txt": "# extra packages\nno-such-package-servelet-test\n"})

    with caplog.at_level("WARNING"):
        skipped = HandlerRuntime(missing, InstanceSettings(model=str(missing)))
    assert skipped.model == 1
    assert "SERVELET_INSTALL_REQUIREMENTS=true" in caplog.text

    with pytest.raises(HandlerError, match="pip install -r .*requirements.txt failed"):
        HandlerRuntime(missing, InstanceSettings(model=str(missing), install_requirements=True))

    present = handler_folder(tmp_path, "present", script, {"code/requirements.txt": "numpy\n"})
    assert HandlerRuntime(present, InstanceSettings(model=str(present), install_requirements=True)).model == 1


# -- several scripts in one process (a multi-model instance): each imports its own `code/` siblings ---------------
SIBLING_USER = '''
import time
time.sleep(SLEEP)  # another model's load starts meanwhile
from helper import NAME
FAIL

def model_fn(model_dir):
    return NAME
'''


def sibling_user(root: Path, name: str, sleep: float = 0.0, fail: bool = False) -> Path:
    script = SIBLING_USER.replace("SLEEP", str(sleep)).replace("FAIL", "import no_such_module_servelet_test" if fail else "")
    return handler_folder(root, name, script, {"code/helper.py": f"NAME = {name!r}\n"})


def test_scripts_loading_at_once_each_import_their_own_sibling(tmp_path):
    folders = [sibling_user(tmp_path, name, sleep=0.3) for name in ("first", "second")]
    loaded: dict[str, object] = {}

    def load(folder: Path) -> None:
        loaded[folder.name] = HandlerRuntime(folder, InstanceSettings(model=str(folder)))

    threads = [threading.Thread(target=load, args=(folder,)) for folder in folders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert {name: runtime.model for name, runtime in loaded.items()} == {"first": "first", "second": "second"}
    for runtime in loaded.values():
        runtime.close()


def test_a_script_that_fails_halfway_leaves_no_sibling_for_the_next(tmp_path):
    half = sibling_user(tmp_path, "half", fail=True)
    with pytest.raises(HandlerError, match="no_such_module_servelet_test"):
        HandlerRuntime(half, InstanceSettings(model=str(half)))
    assert "helper" not in sys.modules
    whole = sibling_user(tmp_path, "whole")
    served = HandlerRuntime(whole, InstanceSettings(model=str(whole)))
    assert served.model == "whole"
    served.close()
