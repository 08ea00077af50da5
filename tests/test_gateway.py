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


def test_metrics_count_requests_by_endpoint_variant_route_and_status_and_time_tokens(gateway):
    body = {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 4}}
    with gateway.http(timeout=60) as http:
        with http.stream("POST", "/generate_stream", json=body) as stream:
            assert stream.status_code == 200
            stream.read()
        assert http.post("/generate", json={"inputs": "Hello", "parameters": {"top_p": 9}}).status_code == 422
        text = http.get("/metrics").text
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line and line[0] != "#"}
    assert samples['servelet_requests_total{endpoint="default",route="/generate_stream",status="200",variant="AllTraffic"}'] >= 1
    assert samples['servelet_requests_total{endpoint="default",route="/generate",status="422",variant=""}'] >= 1
    assert samples['servelet_time_to_first_token_seconds_count{endpoint="default"}'] >= 1
    assert samples['servelet_inter_token_latency_seconds_count{endpoint="default"}'] >= 3
    assert samples['servelet_generated_tokens_total{endpoint="default"}'] >= 4
    assert samples['servelet_prompt_tokens_total{endpoint="default"}'] >= 1
    assert 'servelet_waiting_sequences{endpoint="default",instance="default/AllTraffic/0",variant="AllTraffic"}' in samples
