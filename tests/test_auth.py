"""Auth on (`--auth`): every route family refuses strangers, wrong keys and wrong scopes; boto3 signs with SigV4 as
it does for AWS; the keys come from `servelet keys`. One gateway for the module, its `default` a handler model."""

from __future__ import annotations

import json
import subprocess
import textwrap
from datetime import datetime, timedelta, timezone
from unittest import mock

import boto3
import httpx
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from conftest import SERVELET, free_port, start_gateway, stop_process, wait_for
from servelet.control.api_keys import ApiKeys
from servelet.control.secret_box import SecretBox
from servelet.control.store import Store

ECHO = '''
import json

def model_fn(model_dir):
    return None

def transform_fn(model, body, content_type, accept):
    return json.dumps({"echo": body.decode(), "content_type": content_type}), "application/json"
'''
# name: (scopes, SigV4 credentials?)
KEYS = {
    "admin": (["admin"], False),
    "invoker": (["invoke:*"], False),
    "default-only": (["invoke:endpoint/default"], False),
    "other-only": (["invoke:endpoint/other"], False),
    "scraper": (["metrics"], False),
    "aws-admin": (["admin"], True),
    "aws-default": (["invoke:endpoint/default"], True),
    "aws-other": (["invoke:endpoint/other"], True),
}


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict:
    """The module's keys, made in the store before the gateway starts (as `servelet keys create` does)."""
    root = tmp_path_factory.mktemp("auth")
    store = Store(Store.default_url(root / "data"))
    try:
        made = ApiKeys(store, SecretBox(root / "data"))
        return {"root": root} | {name: made.create(name, scopes, aws).secrets for name, (scopes, aws) in KEYS.items()}
    finally:
        store.close()


@pytest.fixture(scope="module")
def gateway(keys):
    model = keys["root"] / "echo"
    (model / "code").mkdir(parents=True)
    (model / "code" / "inference.py").write_text(textwrap.dedent(ECHO))
    running = start_gateway(keys["root"], env={"SERVELET_AUTH": "true"}, args=["--model", str(model)])
    yield running
    stop_process(running.process)


def bearer(keys, name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {keys[name]['key']}"}


def aws(keys, service: str, gateway, name: str | None = None, secret: str | None = None, key_id: str | None = None):
    """A boto3 client signing with one of the module's SigV4 keys, as a user's profile or environment would give."""
    creds = keys[name] if name else {}
    return boto3.client(
        service, endpoint_url=gateway.base_url, region_name="us-east-1",
        aws_access_key_id=key_id or creds["access_key_id"], aws_secret_access_key=secret or creds["secret_access_key"],
        config=Config(retries={"max_attempts": 1}),
    )


def error_code(call) -> str:
    with pytest.raises(ClientError) as raised:
        call()
    return raised.value.response["Error"]["Code"]


def refused(http: httpx.Client, method: str, path: str, headers: dict[str, str], **kwargs) -> int:
    return http.request(method, path, headers=headers, **kwargs).status_code


# -- SageMaker runtime (boto3, SigV4) -----------------------------------------------------------------------------
def test_runtime_refuses_strangers_wrong_secrets_and_wrong_scopes_and_serves_the_right_key(keys, gateway):
    invoke = dict(EndpointName="default", Body=b'{"x": 1}', ContentType="application/json")
    answer = aws(keys, "sagemaker-runtime", gateway, "aws-default").invoke_endpoint(**invoke)
    assert json.loads(answer["Body"].read())["echo"] == '{"x": 1}'
    streamed = aws(keys, "sagemaker-runtime", gateway, "aws-default").invoke_endpoint_with_response_stream(**invoke)
    assert b"".join(event["PayloadPart"]["Bytes"] for event in streamed["Body"] if "PayloadPart" in event)
    assert error_code(lambda: aws(keys, "sagemaker-runtime", gateway, "aws-default", secret="wrong" * 8)
                      .invoke_endpoint(**invoke)) == "InvalidSignatureException"
    assert error_code(lambda: aws(keys, "sagemaker-runtime", gateway, key_id="SVLTNOSUCHKEY0000000", secret="x" * 40)
                      .invoke_endpoint(**invoke)) == "UnrecognizedClientException"
    assert error_code(lambda: aws(keys, "sagemaker-runtime", gateway, "aws-other")
                      .invoke_endpoint(**invoke)) == "AccessDeniedException"
    with gateway.http() as http:
        for path in ("/endpoints/default/invocations", "/endpoints/default/invocations-response-stream",
                     "/endpoints/default/async-invocations", "/invocations"):
            answer = http.post(path, content=b"{}", headers={"content-type": "application/json"})
            assert (answer.status_code, answer.headers["x-amzn-errortype"]) == (403, "MissingAuthenticationTokenException")
        assert http.get("/async-invocations/some-job").status_code == 403
        assert http.get("/async-invocations/some-job", headers=bearer(keys, "other-only")).status_code == 403
        # An API key works on the runtime routes too (curl), with the same scopes.
        assert http.post("/invocations", content=b"{}", headers=bearer(keys, "default-only")).status_code == 200
        assert http.post("/invocations", content=b"{}", headers=bearer(keys, "other-only")).status_code == 403


# -- control APIs: sagemaker and application-autoscaling (admin only) -------------------------------------------
def test_control_apis_need_admin(keys, gateway):
    assert aws(keys, "sagemaker", gateway, "aws-admin").describe_endpoint(EndpointName="default")["EndpointStatus"] == "InService"
    assert error_code(lambda: aws(keys, "sagemaker", gateway, "aws-default").list_endpoints()) == "AccessDeniedException"
    assert error_code(lambda: aws(keys, "sagemaker", gateway, "aws-admin", secret="x" * 40)
                      .list_endpoints()) == "InvalidSignatureException"
    assert error_code(lambda: aws(keys, "sagemaker", gateway, key_id="SVLTNOSUCHKEY0000000", secret="x" * 40)
                      .list_transform_jobs()) == "UnrecognizedClientException"
    scaling = aws(keys, "application-autoscaling", gateway, "aws-admin")
    assert scaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"] == []
    assert error_code(lambda: aws(keys, "application-autoscaling", gateway, "aws-default")
                      .describe_scalable_targets(ServiceNamespace="sagemaker")) == "AccessDeniedException"
    with gateway.http() as http:
        headers = {"x-amz-target": "SageMaker.ListEndpoints", "content-type": "application/x-amz-json-1.1"}
        assert refused(http, "POST", "/", headers, content=b"{}") == 403
        assert refused(http, "POST", "/", headers | bearer(keys, "invoker"), content=b"{}") == 403
        assert refused(http, "POST", "/", headers | bearer(keys, "admin"), content=b"{}") == 200


# -- OpenAI, TGI, QA ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method, path, body", [
    ("GET", "/v1/models", None),
    ("POST", "/v1/completions", {"model": "default", "prompt": "hi", "max_tokens": 1}),
    ("POST", "/v1/chat/completions", {"model": "default", "messages": [{"role": "user", "content": "hi"}]}),
])
def test_openai_routes_refuse_without_the_right_key(keys, gateway, method, path, body):
    check_family(keys, gateway, method, path, body, scoped=method == "POST")


@pytest.mark.parametrize("method, path, body", [
    ("POST", "/generate", {"inputs": "hi"}),
    ("POST", "/generate_stream", {"inputs": "hi"}),
    ("POST", "/", {"inputs": "hi"}),
    ("GET", "/info", None),
])
def test_tgi_routes_refuse_without_the_right_key(keys, gateway, method, path, body):
    check_family(keys, gateway, method, path, body)


@pytest.mark.parametrize("method, path, body", [
    ("POST", "/question", {"question": "what?", "context": "that"}),
    ("GET", "/question?question=what&context=that", None),
    ("POST", "/generate", {"question": "what?", "context": "that", "endpoint": "default"}),
])
def test_question_routes_refuse_without_the_right_key(keys, gateway, method, path, body):
    check_family(keys, gateway, method, path, body)


def check_family(keys, gateway, method: str, path: str, body: dict | None, scoped: bool = True) -> None:
    """No key and an unknown key: 401; a key for another endpoint: 403; the right key passes the gate (the handler
    model is no text generator, so what it answers after that is the route's own business, never 401/403)."""
    with gateway.http() as http:
        call = {"json": body} if body is not None else {}
        assert refused(http, method, path, {}, **call) == 401
        assert refused(http, method, path, {"x-api-key": "svl-not-a-key"}, **call) == 401
        assert refused(http, method, path, bearer(keys, "scraper"), **call) == 403
        if scoped:
            assert refused(http, method, path, bearer(keys, "other-only"), **call) == 403
        for good in ("invoker", "default-only", "admin"):
            assert refused(http, method, path, bearer(keys, good), **call) not in (401, 403), good


def test_a_key_for_one_endpoint_cannot_name_another_in_the_body(keys, gateway):
    with gateway.http(headers=bearer(keys, "default-only")) as http:
        assert http.post("/question", json={"question": "q", "context": "c", "endpoint": "other"}).status_code == 403
        assert http.get("/question", params={"question": "q", "context": "c", "endpoint": "other"}).status_code == 403
        assert http.post("/v1/completions", json={"model": "other", "prompt": "hi"}).status_code == 403
        assert http.post("/v1/completions", json={"model": "other/target", "prompt": "hi"}).status_code == 403
        assert http.post("/v1/completions", json={"prompt": "hi"}).status_code == 403  # no model: cannot tell


# -- WebSocket ----------------------------------------------------------------------------------------------------
def ws_url(gateway) -> str:
    return gateway.base_url.replace("http", "ws") + "/ws"


def test_websocket_takes_a_key_on_the_upgrade_or_as_first_message_and_checks_each_request(keys, gateway):
    with pytest.raises(Exception, match="403"):  # a wrong key on the upgrade: refused before it is accepted
        connect(ws_url(gateway), additional_headers={"x-api-key": "svl-not-a-key"}).close()
    with connect(ws_url(gateway)) as ws:  # no key, and a request first: told why, then closed
        ws.send(json.dumps({"inputs": "hi"}))
        refusal = json.loads(ws.recv(timeout=10))
        assert (refusal["type"], refusal["code"]) == ("error", 401)
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)
    with connect(ws_url(gateway)) as ws:  # the first message carries the key
        ws.send(json.dumps({"type": "auth", "key": keys["other-only"]["key"]}))
        assert json.loads(ws.recv(timeout=10)) == {"type": "authenticated", "key": "other-only"}
        assert json.loads(ws.recv(timeout=10))["type"] == "welcome"
        ws.send(json.dumps({"id": 1, "inputs": "hi"}))  # the endpoint `default`: not this key's
        frame = json.loads(ws.recv(timeout=10))
        assert (frame["type"], frame["id"], frame["code"]) == ("error", 1, 403)
    with connect(ws_url(gateway), additional_headers=bearer(keys, "default-only")) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "welcome"
        ws.send(json.dumps({"id": 2, "inputs": "hi"}))
        frame = json.loads(ws.recv(timeout=10))
        assert frame["id"] == 2 and frame.get("code") not in (401, 403)


# -- /metrics, /docs, and what stays open ---------------------------------------------------------------------
def test_metrics_need_the_metrics_scope_and_docs_need_a_key(keys, gateway):
    with gateway.http() as http:
        assert http.get("/metrics").status_code == 401
        assert http.get("/metrics", headers=bearer(keys, "invoker")).status_code == 403
        assert http.get("/metrics", headers=bearer(keys, "scraper")).status_code == 200
        assert http.get("/metrics", headers=bearer(keys, "admin")).status_code == 200
        for path in ("/docs", "/openapi.json", "/", "/no-such-route"):
            assert http.get(path).status_code == 401, path
            assert http.get(path, headers={"x-api-key": "svl-not-a-key"}).status_code == 401, path
        assert http.get("/openapi.json", headers=bearer(keys, "scraper")).status_code == 200
        assert http.get("/ping").status_code == 200 and http.get("/health").status_code == 200


def test_a_browser_opens_the_docs_with_the_key_as_its_basic_password_and_nothing_else(keys, gateway):
    """A browser cannot add a header to a page: after a 401 with WWW-Authenticate it asks for a user and password,
    then sends them by itself, so only the read-only pages take them."""
    basic = httpx.BasicAuth("anyone", keys["invoker"]["key"])
    with gateway.http() as http:
        asked = http.get("/docs")
        assert asked.status_code == 401 and asked.headers["www-authenticate"].startswith("Basic ")
        assert http.get("/docs", auth=basic).status_code == 200
        assert http.get("/openapi.json", auth=basic).json()["info"]["title"] == "servelet"
        assert http.get("/docs", auth=httpx.BasicAuth("anyone", "svl-not-a-key")).status_code == 401
        refused = http.post("/invocations", content=b"{}", auth=basic, headers={"content-type": "application/json"})
        assert refused.status_code == 403 and "www-authenticate" not in refused.headers
        assert http.get("/metrics", auth=httpx.BasicAuth("anyone", keys["scraper"]["key"])).status_code == 401


# -- SigV4 details: the clock-skew window and the payload hash ------------------------------------------------
def signed_request(keys, gateway, body: bytes, when: datetime) -> AWSRequest:
    creds = keys["aws-default"]
    request = AWSRequest(method="POST", url=f"{gateway.base_url}/endpoints/default/invocations", data=body,
                         headers={"Content-Type": "application/json"})
    with mock.patch("botocore.auth.get_current_datetime", return_value=when.replace(tzinfo=None)):
        SigV4Auth(Credentials(creds["access_key_id"], creds["secret_access_key"]), "sagemaker", "us-east-1").add_auth(request)
    return request


def send(request: AWSRequest, body: bytes) -> httpx.Response:
    return httpx.post(request.url, content=body, headers=dict(request.headers.items()))


def test_a_signed_request_replayed_outside_the_clock_skew_window_is_refused(keys, gateway):
    now = datetime.now(timezone.utc)
    assert send(signed_request(keys, gateway, b"{}", now), b"{}").status_code == 200
    for when in (now - timedelta(minutes=6), now + timedelta(minutes=6)):
        answer = send(signed_request(keys, gateway, b"{}", when), b"{}")
        assert (answer.status_code, answer.headers["x-amzn-errortype"]) == (403, "InvalidSignatureException")
        assert "Signature" in answer.json()["message"]


def test_a_signed_request_with_another_body_is_refused(keys, gateway):
    request = signed_request(keys, gateway, b'{"a": 1}', datetime.now(timezone.utc))
    answer = send(request, b'{"a": 2}')
    assert (answer.status_code, answer.headers["x-amzn-errortype"]) == (403, "InvalidSignatureException")


# -- browsers -----------------------------------------------------------------------------------------------------
def test_browser_requests_are_refused_before_any_key_is_asked_for(keys, gateway):
    with gateway.http(headers=bearer(keys, "admin")) as http:
        assert http.get("/health", headers={"Host": "rebound.example"}).status_code == 400
        form = http.post("/invocations", content=b"a=1", headers={"content-type": "application/x-www-form-urlencoded"})
        assert (form.status_code, form.headers["x-amzn-errortype"]) == (400, "ValidationError")  # SageMaker's answer
        assert "refused" in form.json()["Message"]
        assert http.post("/generate", content=b'{"inputs": "hi"}', headers={"content-type": "text/plain"}).status_code == 415
        assert http.post("/invocations", content=b"hi", headers={"content-type": "text/plain"}).status_code == 200
        assert http.get("/openapi.json", headers={"Origin": "https://evil.example"}).status_code == 403
        assert http.get("/openapi.json", headers={"Origin": gateway.base_url}).status_code == 200
        assert "access-control-allow-origin" not in http.get("/openapi.json").headers
    with pytest.raises(Exception, match="403"):  # a page's WebSocket, even with a key
        connect(ws_url(gateway), origin="https://evil.example", additional_headers=bearer(keys, "admin")).close()


# -- servelet keys, and the gateway seeing a revocation ------------------------------------------------------
def keys_cli(keys, *args: str) -> subprocess.CompletedProcess:
    env = {"SERVELET_DATA_DIR": str(keys["root"] / "data"), "PATH": "/usr/bin:/bin"}
    return subprocess.run([SERVELET, "keys", *args], capture_output=True, text=True, env=env, timeout=60)


def test_keys_cli_creates_lists_and_revokes_and_the_gateway_follows(keys, gateway):
    made = keys_cli(keys, "create", "ci", "--scope", "invoke:endpoint/default", "--json")
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)["key"]
    aws_made = keys_cli(keys, "create", "ci-aws", "--scope", "admin", "--aws", "--json")
    assert set(json.loads(aws_made.stdout)) == {"access_key_id", "secret_access_key"}
    listed = keys_cli(keys, "list", "--json")
    rows = {row["name"]: row for row in map(json.loads, listed.stdout.splitlines())}
    assert rows["ci"]["scopes"] == ["invoke:endpoint/default"] and rows["ci-aws"]["kind"] == "aws"
    secret = json.loads(aws_made.stdout)["secret_access_key"]
    assert key not in listed.stdout and secret not in listed.stdout
    data = keys["root"] / "data"
    stored = b"".join(p.read_bytes() for p in data.glob("servelet.db*"))
    assert key.encode() not in stored and secret.encode() not in stored  # a hash, and an encrypted secret
    assert (data / "secrets.key").stat().st_mode & 0o777 == 0o600
    with gateway.http(headers={"x-api-key": key}) as http:
        assert http.post("/invocations", content=b"{}").status_code == 200
        assert keys_cli(keys, "revoke", "ci").returncode == 0
        assert wait_for(lambda: http.post("/invocations", content=b"{}").status_code == 403, 10)  # AWS: 403
    assert keys_cli(keys, "revoke", "ci").returncode == 1
    bad = keys_cli(keys, "create", "x", "--scope", "everything")
    assert bad.returncode == 2 and "invoke:endpoint/NAME" in bad.stderr


def test_the_cli_sends_servelet_api_key(keys, gateway):
    def endpoints_list(**env: str) -> subprocess.CompletedProcess:
        return subprocess.run([SERVELET, "endpoints", "list", "--url", gateway.base_url], capture_output=True, text=True,
                              env={"PATH": "/usr/bin:/bin", **env}, timeout=60)

    refused = endpoints_list()
    assert refused.returncode != 0 and "SERVELET_API_KEY" in refused.stderr
    listed = endpoints_list(SERVELET_API_KEY=keys["admin"]["key"])
    assert listed.returncode == 0 and "default" in listed.stdout


def test_boto3_finds_the_credentials_where_users_keep_them(keys, gateway, tmp_path, monkeypatch):
    creds = keys["aws-admin"]
    (tmp_path / "credentials").write_text(
        f"[servelet]\naws_access_key_id = {creds['access_key_id']}\naws_secret_access_key = {creds['secret_access_key']}\n"
    )
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    profile = boto3.Session(profile_name="servelet").client("sagemaker", endpoint_url=gateway.base_url, region_name="eu-west-3")
    assert profile.list_endpoints()["Endpoints"][0]["EndpointName"] == "default"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", creds["access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", creds["secret_access_key"])
    environment = boto3.Session().client("sagemaker", endpoint_url=gateway.base_url, region_name="us-west-2")
    assert environment.list_endpoints()["Endpoints"][0]["EndpointName"] == "default"


def test_no_key_or_secret_reaches_the_log(keys, gateway):
    log = gateway.log()
    secrets = [made.get("key") or made["secret_access_key"] for name, made in keys.items() if name != "root"]
    assert len(secrets) == len(KEYS) and not [s for s in secrets if s in log]


# -- binding ------------------------------------------------------------------------------------------------------
def test_serve_refuses_a_public_address_without_auth(tmp_path):
    env = {"SERVELET_DATA_DIR": str(tmp_path / "data"), "SERVELET_RUN_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    run = subprocess.run([SERVELET, "serve", "--host", "0.0.0.0", "--port", str(free_port()), "--instances", "0"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 2
    assert "--auth" in run.stderr and "--insecure" in run.stderr


def test_serve_insecure_says_so(tmp_path):
    gateway = start_gateway(tmp_path, args=["--host", "0.0.0.0", "--insecure", "--instances", "0"], ready=None)
    try:
        assert "auth OFF" in gateway.log()
    finally:
        stop_process(gateway.process)
