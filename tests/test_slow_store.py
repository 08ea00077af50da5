"""A slow store must not stall the data plane: the store calls made per request (the auth gate's key lookups on a
cache miss, an endpoint-limited key's async job lookup, an unknown endpoint's catalog lookup, /health, the control
API's Describe and List reads that boto3's waiters poll) and by the control loops (the autoscaler every second, the
serverless scaler) run off the gateway's event loop.

The store is a real PostgreSQL whose tables the test locks (ACCESS EXCLUSIVE) for a few seconds: every query on
them waits, as on a slow or overloaded server. Meanwhile a client invokes the endpoint `default` over and over, and
each call must come back at once; the calls that read the store answer once the lock is gone.
"""

from __future__ import annotations

import textwrap
import threading
import time

import boto3
import psycopg
from botocore.config import Config

from conftest import start_gateway, stop_process
from postgres import new_database
from servelet.control.api_keys import ApiKeys
from servelet.control.secret_box import SecretBox
from servelet.control.store import Store
from servelet.gateway.auth.credentials import CACHE_SECONDS

ECHO = '''
def model_fn(model_dir):
    return None

def transform_fn(model, body, content_type, accept):
    return body, content_type
'''
JSON = {"content-type": "application/json"}
DESCRIBE_ENDPOINT = {"x-amz-target": "SageMaker.DescribeEndpoint", "content-type": "application/x-amz-json-1.1"}
LOCKED_TABLES = "endpoints, scaling_targets, catalog, api_keys, async_jobs"
HOLD_S = 3.0
SLOWEST_INVOCATION_S = 1.0  # while the store is locked: far below HOLD_S, which a stalled loop would take
TARGET = {
    "ServiceNamespace": "sagemaker", "ResourceId": "endpoint/default/variant/AllTraffic",
    "ScalableDimension": "sagemaker:variant:DesiredInstanceCount",
}


def make_keys(data, url: str) -> dict[str, dict]:
    store = Store(url)
    try:
        keys = ApiKeys(store, SecretBox(data))
        return {
            "admin": keys.create("admin", ["admin"]).secrets,
            "aws": keys.create("admin-aws", ["admin"], True).secrets,
            "limited": keys.create("limited", ["invoke:endpoint/default"]).secrets,
        }
    finally:
        store.close()


def track_concurrency(gateway, aws: dict) -> None:
    """A scaling policy on `default` (1 to 1 instance: it never scales), so the autoscaler reads the store."""
    scaling = boto3.client(
        "application-autoscaling", endpoint_url=gateway.base_url, region_name="us-east-1",
        aws_access_key_id=aws["access_key_id"], aws_secret_access_key=aws["secret_access_key"],
        config=Config(retries={"max_attempts": 1}),
    )
    scaling.register_scalable_target(**TARGET, MinCapacity=1, MaxCapacity=1)
    scaling.put_scaling_policy(
        **TARGET, PolicyName="concurrency", PolicyType="TargetTrackingScaling",
        TargetTrackingScalingPolicyConfiguration={
            "TargetValue": 100.0, "PredefinedMetricSpecification": {"PredefinedMetricType": "SageMakerVariantConcurrentRequestsPerModelHighResolution"},
        },
    )


def answer_later(gateway, answers: dict[str, int], name: str, method: str, path: str, headers: dict | None = None,
                 body: bytes = b"{}"):
    """A thread making one request (one that reads the store) and keeping its status in `answers` under `name`."""

    def call() -> None:
        with gateway.http(timeout=60) as http:
            answers[name] = http.request(method, path, content=body, headers=headers or {}).status_code

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    return thread


def test_a_locked_store_does_not_stall_invocations(postgres, tmp_path):
    database, url = new_database(postgres)
    model = tmp_path / "echo"
    (model / "code").mkdir(parents=True)
    (model / "code" / "inference.py").write_text(textwrap.dedent(ECHO))
    keys = make_keys(tmp_path / "gateway" / "data", url)
    gateway = start_gateway(tmp_path / "gateway", args=["--model", str(model)], env={
        "SERVELET_AUTH": "true", "SERVELET_DATABASE_URL": url,
        "SERVELET_AUTOSCALE_INTERVAL": "0.5", "SERVELET_SERVERLESS_IDLE_SECONDS": "4",  # both loops tick every second
    })
    admin = {"x-api-key": keys["admin"]["key"]}
    try:
        track_concurrency(gateway, keys["aws"])
        lock = psycopg.connect(postgres.url(database).replace("+psycopg", ""))
        with gateway.http(timeout=30) as http, lock:
            invoke = lambda: http.post("/endpoints/default/invocations", content=b'{"x": 1}', headers=admin | JSON)
            assert invoke().status_code == 200  # the admin key is cached for CACHE_SECONDS: its calls read no store
            cached_at = time.monotonic()
            lock.execute(f"LOCK TABLE {LOCKED_TABLES} IN ACCESS EXCLUSIVE MODE")
            locked_at = time.monotonic()
            answers: dict[str, int] = {}
            readers = [
                answer_later(gateway, answers, "health", "GET", "/health"),
                answer_later(gateway, answers, "unknown key", "POST", "/endpoints/default/invocations",
                             {"x-api-key": "svl-nobody"} | JSON),
                answer_later(gateway, answers, "limited key, async job", "GET", "/async-invocations/nope",
                             {"x-api-key": keys["limited"]["key"]}),
                answer_later(gateway, answers, "unknown endpoint", "POST", "/endpoints/nowhere/invocations", admin | JSON),
                answer_later(gateway, answers, "DescribeEndpoint", "POST", "/", admin | DESCRIBE_ENDPOINT, b'{"EndpointName": "default"}'),
            ]
            slowest, invoked = 0.0, 0
            # Until the hold ends, or (on a loaded machine) before the key's cache entry could run out: a key
            # looked up again would wait for the lock, rightly, and the lock waits for this loop.
            while time.monotonic() - locked_at < HOLD_S and time.monotonic() - cached_at < CACHE_SECONDS - 1:
                began = time.monotonic()
                assert invoke().status_code == 200
                slowest = max(slowest, time.monotonic() - began)
                invoked += 1
                time.sleep(0.05)
            assert invoked >= 5, f"only {invoked} invocations while the store was locked"
            assert not answers, f"answered while the store was locked (no store read?): {answers}"
            lock.rollback()  # the lock goes
            for reader in readers:
                reader.join(timeout=30)
        print(f"slowest invocation while the store was locked for {HOLD_S:g} s: {slowest * 1000:.0f} ms")
        assert slowest < SLOWEST_INVOCATION_S, f"an invocation took {slowest:.2f} s while the store was locked"
        assert answers.pop("health") == answers.pop("DescribeEndpoint") == 200
        assert len(answers) == 3 and all(400 <= status < 500 for status in answers.values()), answers  # refused
    finally:
        stop_process(gateway.process)
