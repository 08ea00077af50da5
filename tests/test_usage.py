"""The cost meter, as a user checks their bill: invoke a serverless endpoint with boto3, time each call, and find
the same GB-seconds in `/metrics` and in `servelet usage --json`; and the token rates on every LLM answer. Its
snapshot units (a template's cache, each restore) are checked on the meter and the store themselves, with the
held templates given, and once end to end: the restore of the serverless endpoint's first instance."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import time
from datetime import date
from types import SimpleNamespace

import pytest
from conftest import SERVELET, boto, start_gateway, stop_process, wait_for
from prometheus_client.parser import text_string_to_metric_families
from test_serverless import create_serverless

from servelet.control.endpoints import Deployment, Endpoint, Fleet, Variant
from servelet.control.instances import COLD, SNAPSHOT, StartRecord
from servelet.control.resources import ServerlessConfig, UsageDay
from servelet.control.store import Store
from servelet.control.usage import CostMeter, Rates

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
    assert rows[0]["Cost"] == pytest.approx(
        rows[0]["GbSeconds"] * 0.0000166667 + len(durations) * 0.20 / 1e6
        + rows[0]["CacheGbSeconds"] * 0.0000015046 + rows[0]["RestoredGb"] * 0.0001397998
    )
    assert usage_json(gateway, "--endpoint", metered, "--since", "2999-01-01") == []


def test_a_snapshot_start_is_billed_one_restore_and_its_template_cache(gateway, metered):
    """The endpoint's first instance was forked from its model's template (the gateway's default)."""
    text = gateway.http(timeout=10).get("/metrics").text
    snapshot_starts = sum(
        sample.value for family in text_string_to_metric_families(text) for sample in family.samples
        if sample.name == "servelet_instance_starts_total" and sample.labels == {
            "endpoint": metered, "variant": "AllTraffic", "kind": SNAPSHOT}
    )
    assert snapshot_starts >= 1
    metrics = billed(gateway, metered)
    assert metrics["servelet_billed_restored_gb_total"] == pytest.approx(MEMORY_MB / 1024 * snapshot_starts)
    assert wait_for(lambda: billed(gateway, metered)["servelet_billed_cache_gb_seconds_total"] > 0, 5)


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


# -- the snapshot units, on the meter and the store ---------------------------------------------------------------
@pytest.fixture
def store(tmp_path):
    opened = Store(f"sqlite:///{tmp_path / 'servelet.db'}")
    yield opened
    opened.close()


class Held:
    """A fake `Fleet.serverless_templates_held`: the tests say which templates are ready, and since when."""

    def __init__(self):
        self.templates: list[tuple[str, str, int, float]] = []

    def __call__(self):
        return list(self.templates)


def test_each_serverless_variant_is_billed_its_own_memory_for_the_time_its_template_is_held(store):
    held = Held()
    meter = CostMeter(store, held)
    ready = time.monotonic()
    # Two variants of one model share a template; a third's template became ready half a second later.
    held.templates = [("e", "big", 2048, ready), ("e", "small", 1024, ready), ("f", "late", 3072, ready + 0.5)]
    meter.bill_cache(ready + 2)
    meter.bill_cache(ready + 3.5)
    held.templates = held.templates[:1]  # the others' templates were evicted
    meter.bill_cache(ready + 4)

    cached = {key: billed.cache_gb_seconds for key, billed in meter.totals.items()}
    assert cached == pytest.approx({("e", "big"): 2 * 4, ("e", "small"): 1 * 3.5, ("f", "late"): 3 * 3})


def test_only_a_snapshot_start_of_a_serverless_variant_is_billed_a_restore(store):
    held = Held()
    held.templates = [("e", "AllTraffic", 4096, time.monotonic())]
    meter = CostMeter(store, held)
    meter.instance_started("e", "AllTraffic", StartRecord(SNAPSHOT, 0.2, time.time()))
    meter.instance_started("e", "AllTraffic", StartRecord(SNAPSHOT, 0.2, time.time()))
    meter.instance_started("e", "AllTraffic", StartRecord(COLD, 3.0, time.time()))
    meter.instance_started("provisioned", "AllTraffic", StartRecord(SNAPSHOT, 0.2, time.time()))  # holds none

    assert {key: billed.restored_gb for key, billed in meter.totals.items()} == {("e", "AllTraffic"): 2 * 4.0}


def test_the_store_adds_up_every_unit_and_the_cost_prices_them_all(store):
    held = Held()
    meter = CostMeter(store, held)
    held.templates = [("e", "AllTraffic", 2048, time.monotonic())]
    meter.bill("e", "AllTraffic", 2048, 0.5)
    meter.instance_started("e", "AllTraffic", StartRecord(SNAPSHOT, 0.2, time.time()))
    asyncio.run(meter.tick())  # the cache held since the meter was made, then the flush
    meter.instance_started("e", "AllTraffic", StartRecord(SNAPSHOT, 0.2, time.time()))
    asyncio.run(meter.flush())

    [row] = store.list_usage("e")
    totals = meter.totals["e", "AllTraffic"]
    assert (row.gb_seconds, row.requests, row.restored_gb) == (1.0, 1, 4.0)
    assert row.cache_gb_seconds == pytest.approx(totals.cache_gb_seconds) and row.cache_gb_seconds > 0
    rates = Rates(per_gb_second=1, per_million_requests=1e6, per_cached_gb_second=10, per_restored_gb=100)
    assert rates.cost(row) == pytest.approx(1.0 + 1 + 10 * row.cache_gb_seconds + 400.0)


def test_a_usage_table_from_before_snapshot_starts_gets_their_columns_and_keeps_its_rows(tmp_path):
    path = tmp_path / "servelet.db"
    with sqlite3.connect(path) as old:  # the table as the previous version made it
        old.execute("CREATE TABLE usage (endpoint VARCHAR(63) NOT NULL, variant VARCHAR(63) NOT NULL, day DATE NOT "
                    "NULL, gb_seconds FLOAT NOT NULL, requests INTEGER NOT NULL, PRIMARY KEY (endpoint, variant, day))")
        old.execute("INSERT INTO usage VALUES ('e', 'AllTraffic', '2026-01-02', 1.5, 3)")
    old.close()

    for _ in range(2):  # the second opening finds the columns there
        store = Store(f"sqlite:///{path}")
        store.add_usage([UsageDay(endpoint_name="e", variant_name="AllTraffic", day=date(2026, 1, 2),
                                  cache_gb_seconds=2.0, restored_gb=0.5)])
        store.close()

    [row] = Store(f"sqlite:///{path}").list_usage()
    assert (row.gb_seconds, row.requests, row.cache_gb_seconds, row.restored_gb) == (1.5, 3, 4.0, 1.0)


def test_the_fleet_names_the_serverless_variants_whose_template_is_ready(tmp_path):
    fleet = Fleet(tmp_path)
    serverless = Variant("AllTraffic", "file:///m.gguf", serverless=ServerlessConfig(MemorySizeInMB=3072))
    other = Variant("Other", "file:///other.gguf", serverless=ServerlessConfig(MemorySizeInMB=1024))
    provisioned = Variant("Provisioned", "file:///m.gguf")  # same model, same template: not billed
    fleet.endpoints["e"] = Endpoint("e", Deployment([serverless, other, provisioned]))
    assert fleet.serverless_templates_held() == []  # snapshots off

    ready = SimpleNamespace(ready=True, alive=True, started=12.5)
    dead = SimpleNamespace(ready=True, alive=False, started=1.0)
    fleet.snapshots = SimpleNamespace(templates={
        fleet._template_spec(serverless).key: ready, fleet._template_spec(other).key: dead,
    })
    assert fleet.serverless_templates_held() == [("e", "AllTraffic", 3072, 12.5)]
