"""Hand-made bad input for InvokeEndpointAsync and the async status route, whose headers the OpenAPI fuzz run
only generates from their schemas: numbers that are not numbers, input locations that are no URL, outside the
file roots or not there, an inline body too big or beside an input location, odd InferenceIds, bytes that are not
UTF-8. Each is refused at once with a 4xx in the SageMaker runtime's error shape whose message names what is wrong,
never a 5xx or a hang; the route serves a good request afterwards. The real-time route checks the headers handed
to the model as the async one does.

One gateway with auth on and one file root, running no model but an async endpoint of an echo handler.
"""

from __future__ import annotations

import json
import os
import subprocess

import boto3
import httpx
import pytest
from botocore.config import Config
from conftest import SERVELET, create_async_endpoint, create_key, echo_model, start_gateway, stop_process, wait_for
from error_shapes import message, problem
from postgres import new_database

TIMEOUT = 60  # seconds for any one answer: past it the gateway hangs, which is a failure too
INVOKE = "/endpoints/echo/async-invocations"
TTL, INVOCATION_TIMEOUT = "X-Amzn-SageMaker-RequestTTLSeconds", "X-Amzn-SageMaker-InvocationTimeoutSeconds"
INPUT, INFERENCE_ID = "X-Amzn-SageMaker-InputLocation", "X-Amzn-SageMaker-Inference-Id"


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("async-bad-input")
    allowed = root / "allowed"
    (allowed / "folder").mkdir(parents=True)
    (allowed / "in.json").write_text('{"x": 1}')
    admin = create_key(root / "gateway" / "data", "admin", "--scope", "admin", "--aws")
    invoker = create_key(root / "gateway" / "data", "invoker", "--scope", "invoke:*")["key"]
    gateway = start_gateway(root / "gateway", env={"SERVELET_AUTH": "true", "SERVELET_FILE_ROOTS": str(allowed)},
                            args=["--instances", "0"], ready=None)
    try:
        sagemaker = boto3.client(
            "sagemaker", endpoint_url=gateway.base_url, region_name="us-east-1", config=Config(retries={"max_attempts": 1}),
            aws_access_key_id=admin["access_key_id"], aws_secret_access_key=admin["secret_access_key"],
        )
        create_async_endpoint(sagemaker, "echo", echo_model(root / "echo"), f"file://{allowed}/out")
        yield {"gateway": gateway, "allowed": allowed, "invoker": invoker, "root": root, "sagemaker": sagemaker}
    finally:
        stop_process(gateway.process)


@pytest.fixture(scope="module")
def http(setup):
    with httpx.Client(base_url=setup["gateway"].base_url, headers={"Authorization": f"Bearer {setup['invoker']}"},
                      timeout=TIMEOUT) as client:
        yield client


@pytest.fixture(autouse=True)
def stays_up(setup):
    """After each test the gateway still answers: no bad input takes it down."""
    yield
    gateway = setup["gateway"]
    assert httpx.get(f"{gateway.base_url}/health", timeout=TIMEOUT).status_code == 200, gateway.log()[-3000:]


def refused(response: httpx.Response, *names: str) -> str:
    """A 4xx in the SageMaker runtime's shape (what botocore parses) whose message names each of `names`."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:500])
    headers = {name.lower(): value for name, value in response.headers.items()}
    assert problem("sagemaker", response.content, headers) is None, response.text[:500]
    said = message("sagemaker", response.content, headers)
    for name in names:
        assert name.lower() in said.lower(), said
    assert len(said) < 2000, said  # a huge value is quoted cut short
    return said


# Header values as bytes: httpx sends them as they are, so invalid UTF-8 (and Latin-1 digits like "²") arrive.
BAD_SECONDS = [b"abc", b"", b"NaN", b"inf", b"-1", b"1e3", b"60.5", b"0x3c", b"\xb2", b"\xd9\xa6\xd9\xa0", b"9" * 5000]


@pytest.mark.parametrize("value", BAD_SECONDS, ids=lambda v: repr(v[:12]))
@pytest.mark.parametrize(("header", "low", "high"), [(TTL, 60, 21600), (INVOCATION_TIMEOUT, 1, 3600)], ids=["ttl", "timeout"])
def test_seconds_that_are_not_whole_numbers_in_range_are_refused_naming_the_header(http, header, low, high, value):
    response = http.post(INVOKE, content=b"{}", headers={header: value})
    refused(response, header, f"from {low} to {high}")


@pytest.mark.parametrize(("header", "value"), [(TTL, b"59"), (TTL, b"21601"), (INVOCATION_TIMEOUT, b"0"),
                                               (INVOCATION_TIMEOUT, b"3601"), (TTL, b"99999999999999999999")])
def test_seconds_out_of_range_are_refused_naming_the_range(http, header, value):
    refused(http.post(INVOKE, content=b"{}", headers={header: value}), header, "whole number of seconds")


def bad_locations(allowed) -> list[tuple[bytes, str]]:
    return [
        (b"not a url", "must be absolute"),
        (b"relative/in.json", "must be absolute"),
        (b"ftp://host/in.json", "unsupported scheme"),
        (b"http://127.0.0.1:9/in.json", "unsupported scheme"),
        (b"s3://only-a-bucket", "names one object"),
        (f"file://{allowed}/".encode(), "not a directory"),
        (b"file:///etc/passwd", "SERVELET_FILE_ROOTS"),
        (f"file://{allowed}/../in.json".encode(), "SERVELET_FILE_ROOTS"),
        (f"file://{allowed}/missing.json".encode(), "no object there"),
        (f"file://{allowed}/folder".encode(), "no object there"),
        (f"file://{allowed}/\xff\xfe.json".encode("latin-1"), "no object there"),
        (f"file://{allowed}/{'x' * 5000}.json".encode(), "too long"),
    ]


LOCATION_IDS = ["no-url", "relative", "ftp", "http", "bucket", "folder-uri", "outside", "dot-dot", "missing",
                "a-folder", "not-utf8", "too-long"]


@pytest.mark.parametrize("case", range(len(LOCATION_IDS)), ids=LOCATION_IDS)
def test_an_input_location_that_names_no_readable_object_is_refused_at_once(http, setup, case):
    location, says = bad_locations(setup["allowed"])[case]
    refused(http.post(INVOKE, headers={INPUT: location}), INPUT, says)


def test_an_input_both_inline_and_at_a_location_is_refused(http, setup):
    response = http.post(INVOKE, content=b'{"x": 1}', headers={INPUT: f"file://{setup['allowed']}/in.json"})
    refused(response, "not both")


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_an_inline_body_over_sagemaker_s_limit_is_refused_naming_it_and_the_way_around(http, chunked):
    body = b"x" * 128_001
    content = iter([body[:64_000], body[64_000:]]) if chunked else body
    refused(http.post(INVOKE, content=content), "128000", INPUT)


@pytest.mark.parametrize("value", [b"x" * 65, b"has space", b"tab\there", "\u00fcber".encode(), b"\xff", b"y" * 10_000],
                         ids=["65", "space", "tab", "utf-8", "not-utf8", "10k"])
def test_an_inference_id_sagemaker_would_refuse_is_refused_naming_the_rule(http, value):
    refused(http.post(INVOKE, content=b"{}", headers={INFERENCE_ID: value}), INFERENCE_ID, "1 to 64")


@pytest.mark.parametrize("header", ["X-Amzn-SageMaker-Content-Type", "Content-Type", "X-Amzn-SageMaker-Accept",
                                    "X-Amzn-SageMaker-Custom-Attributes"])
@pytest.mark.parametrize("value", [b"text/\xff", b"a" * 1025], ids=["not-ascii", "1025"])
def test_content_types_and_attributes_that_are_not_ascii_or_too_long_are_refused(http, header, value):
    refused(http.post(INVOKE, content=b"{}", headers={header: value}), header, "ASCII")


@pytest.mark.parametrize("header", ["Content-Type", "Accept", "X-Amzn-SageMaker-Custom-Attributes"])
def test_a_real_time_request_with_a_header_no_answer_could_carry_is_refused_and_the_instance_serves_on(http, header):
    # The echo model answers with the type it was sent, as the SageMaker toolkit's handlers answer with Accept's:
    # a byte past ASCII there once broke the instance's channel and took the instance out for everyone.
    refused(http.post("/endpoints/echo/invocations", content=b"{}", headers={header: b"text/\xff"}), header, "ASCII")
    served = http.post("/endpoints/echo/invocations", content=b'{"y": 2}', headers={"Content-Type": "application/json"})
    assert served.status_code == 200 and served.json() == {"y": 2}, served.text


LATIN_ANSWER = '''
def model_fn(model_dir):
    return None

def transform_fn(model, body, content_type, accept):
    return body, "text/plain; charset=caf\\u00e9"
'''


def test_a_model_answering_with_a_latin_1_content_type_serves_it_and_breaks_no_other_answer(http, setup):
    """Its answer's head once broke the channel to the instance: every answer on it failed, and the instance went."""
    (model := setup["root"] / "latin" / "code").mkdir(parents=True)
    (model / "inference.py").write_text(LATIN_ANSWER)
    sagemaker = setup["sagemaker"]
    sagemaker.create_model(ModelName="latin", PrimaryContainer={"ModelDataUrl": str(model.parent)})
    sagemaker.create_endpoint_config(EndpointConfigName="latin", ProductionVariants=[
        {"VariantName": "AllTraffic", "ModelName": "latin", "InitialInstanceCount": 1}])
    sagemaker.create_endpoint(EndpointName="latin", EndpointConfigName="latin")
    sagemaker.get_waiter("endpoint_in_service").wait(EndpointName="latin", WaiterConfig={"Delay": 1, "MaxAttempts": 120})
    for _ in range(2):
        answer = http.post("/endpoints/latin/invocations", content=b"hello", headers={"Content-Type": "text/plain"})
        assert answer.status_code == 200, answer.text
        assert answer.content == b"hello"
        assert {name.lower(): value for name, value in answer.headers.raw}[b"content-type"].endswith(b"caf\xe9")


@pytest.mark.parametrize(("path", "says"), [
    ("/async-invocations/" + "x" * 65, "1 to 64"),
    ("/async-invocations/no%20space", "1 to 64"),
    ("/async-invocations/%FF%FE", "1 to 64"),
    ("/async-invocations/%00", "1 to 64"),
    ("/async-invocations/" + "z" * 5000, "1 to 64"),
    ("/async-invocations/never-queued", "never-queued"),
    ("/async-invocations/a%2Fb", ""),
], ids=["65", "space", "not-utf8", "nul", "5000", "unknown", "slash"])
def test_the_status_of_an_odd_inference_id_is_a_refusal_naming_it(http, path, says):
    refused(http.get(path), says)


def test_a_good_request_still_serves_after_the_bad_ones(http, setup):
    accepted = http.post(INVOKE, headers={INPUT: f"file://{setup['allowed']}/in.json", INFERENCE_ID: "good-one",
                                          TTL: "60", INVOCATION_TIMEOUT: "3600"})
    assert accepted.status_code == 202, accepted.text
    output = setup["allowed"] / "out" / "good-one.out"
    assert wait_for(output.exists, 60)
    assert output.read_text() == '{"x": 1}'
    assert http.get("/async-invocations/good-one").json()["Status"] == "Completed"


def test_an_endpoint_limited_key_asking_for_an_id_holding_nul_is_refused_on_postgresql(postgres, tmp_path):
    """Such a key's job is looked up in the store to learn its endpoint: a NUL in the id failed PostgreSQL's query
    (a plain 500). An id no job can have is now never looked up. A gateway of its own, on PostgreSQL."""
    _, url = new_database(postgres)
    env = {"SERVELET_DATABASE_URL": url, "SERVELET_AUTH": "true"}
    done = subprocess.run([SERVELET, "keys", "create", "limited", "--scope", "invoke:endpoint/echo", "--json"],
                          env=os.environ | env | {"SERVELET_DATA_DIR": str(tmp_path / "data")},
                          capture_output=True, text=True, timeout=120, check=True)
    limited = {"Authorization": f"Bearer {json.loads(done.stdout)['key']}"}
    gateway = start_gateway(tmp_path, env=env, args=["--instances", "0"], ready=None)
    try:
        for path in ("/async-invocations/%00", "/async-invocations/a%00b", "/async-invocations/never-queued"):
            answer = httpx.get(f"{gateway.base_url}{path}", headers=limited, timeout=TIMEOUT)
            refused(answer, "may not invoke")
    finally:
        stop_process(gateway.process)
