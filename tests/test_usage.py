"""The cost meter, as a user checks their bill: invoke a serverless endpoint with boto3, time each call, and find
the same GB-seconds in `/metrics` and in `servelet usage --json`; and the token rates on every LLM answer."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
from conftest import SERVELET, boto, start_gateway, stop_process, wait_for
from prometheus_client.parser import text_string_to_metric_families
from test_serverless import create_serverless

MEMORY_MB = 2048
# Long enough that the client's own overhead (signing, HTTP, parsing) stays far below the 5% the check allows.
GENERATE = {"inputs": "Tell me a story about a lighthouse.", "parameters": {"max_new_tokens": 48, "ignore_eos": True}}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, model_path):
    """No `default` endpoint: the serverless one gets the cores."""
    running = start_gateway(tmp_path_factory.mktemp("usage"), env={"SERVELET_INSTANCES": "0"}, ready=None)
    yield running
    stop_process(running.process)


@pytest.fixture(scope="module")
def metered(gateway):
    return create_serverless(gateway, "metered", MemorySizeInMB=MEMORY_MB, MaxConcurrency=2)


def runtime(gateway):
    return boto("sagemaker-runtime", gateway.base_url, retries={"total_max_attempts": 1}, read_timeout=120)


def billed(gateway, endpoint: str) -> dict[str, float]:
    """The meter's counters for the endpoint's variant AllTraffic, as Prometheus scrapes them."""
    text = gateway.http(timeout=10).get("/metrics").text
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("servelet_billed_") and sample.labels.get("endpoint") == endpoint:
                assert sample.labels["variant"] == "AllTraffic"
                found[sample.name] = sample.value
    return found


def usage_json(gateway, *args: str) -> list[dict]:
    """`servelet usage --json` against the gateway's store, as a user on the same machine runs it."""
    env = os.environ | {"SERVELET_DATA_DIR": str(gateway.log_path.parent / "data")}
    result = subprocess.run([SERVELET, "usage", "--json", *args], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_billed_gb_seconds_match_the_durations_the_client_measured(gateway, metered):
    client = runtime(gateway)
    durations = []
    for _ in range(3):
        started = time.perf_counter()
        answer = client.invoke_endpoint(EndpointName=metered, Body=json.dumps(GENERATE), ContentType="application/json")
        assert json.loads(answer["Body"].read())["generated_text"]
        durations.append(time.perf_counter() - started)
    started = time.perf_counter()  # a stream is billed until it ends
    answer = client.invoke_endpoint_with_response_stream(EndpointName=metered, Body=json.dumps(GENERATE), ContentType="application/json")
    parts = [event["PayloadPart"]["Bytes"] for event in answer["Body"] if "PayloadPart" in event]
    durations.append(time.perf_counter() - started)
    assert len(parts) > 1

    # The client's duration holds the gateway's plus the client's own overhead, so the bill is at most the client's
    # figure (plus each call's rounding up to the millisecond) and at least 95% of it.
    client_gb_seconds = MEMORY_MB / 1024 * sum(durations)
    rounding = MEMORY_MB / 1024 * 0.001 * len(durations)
    metrics = billed(gateway, metered)
    assert metrics["servelet_billed_requests_total"] == len(durations)
    assert 0.95 * client_gb_seconds <= metrics["servelet_billed_gb_seconds_total"] <= client_gb_seconds + rounding

    # The store has them within a flush (once a second), for `servelet usage`.
    assert wait_for(lambda: sum(row["Requests"] for row in usage_json(gateway, "--endpoint", metered)) == len(durations), 15)
    rows = usage_json(gateway, "--endpoint", metered)
    assert [(row["EndpointName"], row["VariantName"]) for row in rows] == [(metered, "AllTraffic")]
    assert rows[0]["GbSeconds"] == pytest.approx(metrics["servelet_billed_gb_seconds_total"])
    assert rows[0]["Cost"] == pytest.approx(rows[0]["GbSeconds"] * 0.0000166667 + len(durations) * 0.20 / 1e6)
    assert usage_json(gateway, "--endpoint", metered, "--since", "2999-01-01") == []


def test_every_answer_carries_both_token_rates(gateway, metered):
    answer = runtime(gateway).invoke_endpoint(
        EndpointName=metered, ContentType="application/json",
        Body=json.dumps({"inputs": "The capital of France is", "parameters": {"max_new_tokens": 8, "details": True}}),
    )
    details = json.loads(answer["Body"].read())["details"]
    assert details["prompt_tokens_per_second"] > 0 and details["generated_tokens_per_second"] > 0
    headers = answer["ResponseMetadata"]["HTTPHeaders"]
    assert float(headers["x-servelet-prompt-tokens-per-second"]) > 0
    assert float(headers["x-servelet-generated-tokens-per-second"]) > 0
    text = gateway.http(timeout=10).get("/metrics").text
    assert f'servelet_generated_tokens_per_second_count{{endpoint="{metered}"}}' in text
    assert f'servelet_prompt_tokens_per_second_count{{endpoint="{metered}"}}' in text


def test_a_clean_stop_loses_no_billed_request(gateway, metered):
    """Runs last: it stops the module's gateway right after an invocation, before a periodic flush need have come."""
    before = billed(gateway, metered)["servelet_billed_requests_total"]  # the store may be a flush behind
    runtime(gateway).invoke_endpoint(EndpointName=metered, Body=json.dumps(GENERATE), ContentType="application/json")
    stop_process(gateway.process)  # SIGTERM: uvicorn's graceful shutdown, then the gateway's lifespan end
    assert "Application shutdown complete" in gateway.log()
    assert sum(row["Requests"] for row in usage_json(gateway, "--endpoint", metered)) == before + 1
