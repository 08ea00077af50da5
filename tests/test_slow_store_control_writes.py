"""A slow store holds up the control plane's writes, never the data plane: CreateEndpoint and
UpdateEndpointWeightsAndCapacities query the store in a thread, so while they wait for it, streams on the event loop
go on.

As in tests/test_slow_store.py, the store is a real PostgreSQL whose `endpoints` table the test locks (ACCESS
EXCLUSIVE); PostgreSQL itself shows the two writes waiting for the lock. Meanwhile a stream of the endpoint `default`
runs to its end and `/ping` answers; the writes answer once the lock is gone.
"""

from __future__ import annotations

import json
import threading

import psycopg

from conftest import boto, start_gateway, stop_process, wait_for
from postgres import new_database

STREAM_BODY = json.dumps({"inputs": "The capital of France is", "parameters": {"max_new_tokens": 16}})
# A write on the event loop would stall this stream: the client gives up rather than wait for the lock's release.
STREAM_READ_TIMEOUT_S = 30


def waiting_for_the_lock(watch: psycopg.Connection, database: str) -> list[str]:
    """The statements of the gateway's store that wait for a lock, as PostgreSQL reports them."""
    rows = watch.execute(
        "SELECT query FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'", (database,)
    ).fetchall()
    return [query for (query,) in rows]


def call_later(answers: dict, name: str, call) -> threading.Thread:
    """A thread making one control API call, keeping its HTTP status (or its error) in `answers` under `name`."""

    def run() -> None:
        try:
            answers[name] = call()["ResponseMetadata"]["HTTPStatusCode"]
        except Exception as exc:  # noqa: BLE001 - the test shows it
            answers[name] = repr(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_locked_store_holds_up_control_writes_not_streams(postgres, tmp_path, model_path):
    database, url = new_database(postgres)
    gateway = start_gateway(tmp_path / "gateway", env={"SERVELET_DATABASE_URL": url})
    sagemaker = boto("sagemaker", gateway.base_url, retries={"total_max_attempts": 1}, read_timeout=120)
    runtime = boto("sagemaker-runtime", gateway.base_url, retries={"total_max_attempts": 1}, read_timeout=STREAM_READ_TIMEOUT_S)
    try:
        sagemaker.create_model(ModelName="second", PrimaryContainer={"ModelDataUrl": str(model_path)})
        sagemaker.create_endpoint_config(EndpointConfigName="second", ProductionVariants=[
            {"VariantName": "AllTraffic", "ModelName": "second", "InitialInstanceCount": 1}])
        lock = psycopg.connect(postgres.url(database).replace("+psycopg", ""))
        watch = psycopg.connect(postgres.url(database).replace("+psycopg", ""), autocommit=True)
        with lock, watch, gateway.http(timeout=STREAM_READ_TIMEOUT_S) as http:
            lock.execute("LOCK TABLE endpoints IN ACCESS EXCLUSIVE MODE")
            answers: dict[str, object] = {}
            writers = [
                call_later(answers, "CreateEndpoint", lambda: sagemaker.create_endpoint(
                    EndpointName="second", EndpointConfigName="second")),
                call_later(answers, "UpdateEndpointWeightsAndCapacities", lambda: sagemaker.update_endpoint_weights_and_capacities(
                    EndpointName="default", DesiredWeightsAndCapacities=[{"VariantName": "AllTraffic", "DesiredWeight": 2.0}])),
            ]
            # Both writes reached the store and wait there: an INSERT of the new endpoint, a read of `default`'s record.
            assert wait_for(lambda: any("INSERT INTO endpoints" in q for q in waiting_for_the_lock(watch, database))
                            and any("endpoints.name =" in q for q in waiting_for_the_lock(watch, database)), 30), (
                waiting_for_the_lock(watch, database), answers)

            stream = runtime.invoke_endpoint_with_response_stream(
                EndpointName="default", ContentType="application/json", Body=STREAM_BODY)
            parts = [event["PayloadPart"]["Bytes"] for event in stream["Body"] if "PayloadPart" in event]
            assert len(parts) >= 2, parts  # token by token, to its end
            assert http.get("/ping").status_code == 200
            assert not answers, f"a write answered while the store was locked: {answers}"
            lock.rollback()  # the lock goes
            for writer in writers:
                writer.join(timeout=120)
        assert answers == {"CreateEndpoint": 200, "UpdateEndpointWeightsAndCapacities": 200}, answers
        described = sagemaker.describe_endpoint(EndpointName="default")
        assert described["ProductionVariants"][0]["CurrentWeight"] == 2.0
        assert sagemaker.describe_endpoint(EndpointName="second")["EndpointStatus"] in ("Creating", "InService")
    finally:
        stop_process(gateway.process)
