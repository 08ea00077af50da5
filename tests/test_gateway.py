"""The gateway's own routes: hello, docs, health, metrics; and that it runs the model in a separate process."""

from __future__ import annotations


def test_hello_names_the_version_and_endpoints(gateway):
    with gateway.http(timeout=10) as http:
        answer = http.get("/")
    assert answer.status_code == 200
    body = answer.json()
    assert body["message"] == "hello world"
    assert body["version"]
    assert body["endpoints"] == ["default"]


def test_docs_and_openapi_spec(gateway):
    with gateway.http(timeout=10) as http:
        docs = http.get("/docs")
        spec = http.get("/openapi.json")
    assert docs.status_code == 200 and "swagger-ui" in docs.text.lower()
    assert spec.status_code == 200
    assert spec.json()["info"]["title"] == "servelet"


def test_health_reports_the_default_endpoint_ready(gateway):
    with gateway.http(timeout=10) as http:
        health = http.get("/health").json()
    assert health["status"] == "ok"
    assert health["endpoints"]["default"]["ready"] is True


def test_the_gateway_process_does_not_load_the_model(gateway):
    """A model crash must never take the platform down: the weights live in the instance process only."""
    maps = open(f"/proc/{gateway.process.pid}/maps").read()
    assert ".gguf" not in maps
    assert "libllama" not in maps


def test_metrics_speak_prometheus_text(gateway):
    with gateway.http(timeout=10) as http:
        http.get("/health")
        metrics = http.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    assert 'servelet_requests_total{endpoint="",route="/health",status="200",variant=""}' in metrics.text
    assert "servelet_running_sequences" in metrics.text
