"""Snapshot starts: serverless instances forked from a template process of their model, through a real gateway,
boto3 and the real default model.

Forked instances are unique (their samples differ), answer greedy requests as a cold instance does, and a template
that is killed or evicted leaves the endpoint serving from cold starts. Every start says its kind and init duration
in the log, the metrics and DescribeEndpoint."""

from __future__ import annotations

import json
import os
import re
import signal

import httpx
import pytest
from conftest import boto, start_gateway, stop_process, wait_for

from servelet.settings import DEFAULT_MODEL_URI

IDLE_SECONDS = 1
WAIT = {"Delay": 1, "MaxAttempts": 180}
PROMPTS = ["The capital of France is", "Water boils at", "The largest planet in the solar system is"]
SAMPLED = {"inputs": "Write a short poem about the sea.", "parameters": {"max_new_tokens": 24, "do_sample": True, "temperature": 1.5}}
STARTED = re.compile(r"instance (\S+) started \((snapshot|cold) start, pid (\d+)\)")
TEMPLATE = re.compile(r"snapshot template for \S+ starting \(pid (\d+)\)")


def gateway_with(tmp_path_factory, name: str, **env: str):
    env = {"SERVELET_INSTANCES": "0", "SERVELET_SERVERLESS_IDLE_SECONDS": str(IDLE_SECONDS)} | env
    run_dir = tmp_path_factory.mktemp(f"{name}-run")
    return start_gateway(tmp_path_factory.mktemp(name), env=env | {"SERVELET_RUN_DIR": str(run_dir)}, ready=None), run_dir


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, model_path):
    running, running.run_dir = gateway_with(tmp_path_factory, "snapshots")
    yield running
    stop_process(running.process)


def create(gateway, name: str, serverless: dict | None = None, env: dict | None = None) -> str:
    sagemaker = boto("sagemaker", gateway.base_url)
    container = {"ModelDataUrl": DEFAULT_MODEL_URI} | ({"Environment": env} if env else {})
    sagemaker.create_model(ModelName=name, PrimaryContainer=container)
    variant = {"VariantName": "AllTraffic", "ModelName": name}
    variant |= {"ServerlessConfig": serverless} if serverless else {"InitialInstanceCount": 1}
    sagemaker.create_endpoint_config(EndpointConfigName=name, ProductionVariants=[variant])
    sagemaker.create_endpoint(EndpointName=name, EndpointConfigName=name)
    sagemaker.get_waiter("endpoint_in_service").wait(EndpointName=name, WaiterConfig=WAIT)
    return name


def invoke(gateway, endpoint: str, body: dict) -> str:
    runtime = boto("sagemaker-runtime", gateway.base_url, retries={"total_max_attempts": 1}, read_timeout=120)
    answer = runtime.invoke_endpoint(EndpointName=endpoint, Body=json.dumps(body), ContentType="application/json")
    return json.loads(answer["Body"].read())["generated_text"]


def greedy(prompt: str) -> dict:
    return {"inputs": prompt, "parameters": {"max_new_tokens": 32, "do_sample": False}}


def instances(gateway, endpoint: str) -> int:
    return gateway.http(timeout=10).get("/health").json()["endpoints"][endpoint]["variants"]["AllTraffic"]["instances"]


def starts(gateway, endpoint: str) -> list[tuple[str, str, int]]:
    """(instance, kind, pid) of each start of the endpoint's instances, from the gateway's log."""
    return [(m[1], m[2], int(m[3])) for m in STARTED.finditer(gateway.log()) if m[1].startswith(f"{endpoint}/")]


def parent_of(pid: int) -> int:
    return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])


@pytest.fixture(scope="module")
def pair(gateway):
    """Two instances from the start (ProvisionedConcurrency 2), both forked from one template."""
    return create(gateway, "pair", {"MemorySizeInMB": 2048, "MaxConcurrency": 4, "ProvisionedConcurrency": 2})


@pytest.fixture(scope="module")
def quiet(gateway):
    """None kept warm: every request after the idle timeout starts an instance."""
    return create(gateway, "quiet", {"MemorySizeInMB": 2048, "MaxConcurrency": 2})


@pytest.fixture(scope="module")
def cold(gateway):
    """An ordinary endpoint with the serverless variants' one thread. Any instance whose model and settings have a
    template forks from it; a queue bound of its own (which changes no answer) keeps this one cold."""
    return create(gateway, "cold", env={"SERVELET_THREADS": "1", "SERVELET_MAX_WAITING": "64"})


def test_instances_forked_from_one_template_sample_differently(gateway, pair):
    forked = starts(gateway, pair)
    assert [kind for _, kind, _ in forked] == ["snapshot", "snapshot"], forked
    template = int(TEMPLATE.findall(gateway.log())[0])
    assert {parent_of(pid) for _, _, pid in forked} == {template}  # both children of the template, not of the gateway

    samples = []
    for number in (0, 1):  # each instance asked directly, on its own socket
        socket = gateway.run_dir / f"{pair}-AllTraffic-{number}.sock"
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(socket)), base_url="http://instance", timeout=120) as client:
            samples.append(client.post("/invocations", json=SAMPLED).json()["generated_text"])
    assert samples[0] != samples[1], samples


def test_a_forked_instance_answers_greedy_requests_as_a_cold_one_does(gateway, quiet, cold):
    assert [kind for _, kind, _ in starts(gateway, cold)] == ["cold"]
    assert starts(gateway, quiet)[-1][1] == "snapshot"
    for prompt in PROMPTS:
        assert invoke(gateway, quiet, greedy(prompt)) == invoke(gateway, cold, greedy(prompt)), prompt


def test_each_start_says_its_kind_and_init_duration_in_the_log_metrics_and_describe(gateway, quiet):
    assert wait_for(lambda: instances(gateway, quiet) == 0, 30 * IDLE_SECONDS)
    assert invoke(gateway, quiet, greedy(PROMPTS[0]))
    assert starts(gateway, quiet)[-1][1] == "snapshot"
    assert re.search(r"instance quiet/AllTraffic/\d+ ready: .* \(snapshot start, init \d+\.\d+ s\)", gateway.log())

    metrics = gateway.http(timeout=10).get("/metrics").text
    labels = 'endpoint="quiet",kind="snapshot",variant="AllTraffic"'
    assert re.search(r"servelet_instance_starts_total\{" + labels + r"\} [2-9]", metrics), metrics
    assert re.search(r"servelet_instance_init_seconds_count\{" + labels + r"\} [2-9]", metrics)

    # botocore drops members its model lacks, so servelet's extension is read from the raw answer.
    raw = gateway.http(timeout=10).post(
        "/", headers={"X-Amz-Target": "SageMaker.DescribeEndpoint", "Content-Type": "application/x-amz-json-1.1"},
        content=json.dumps({"EndpointName": quiet}),
    ).json()
    last = raw["ProductionVariants"][0]["LastInstanceStarts"]
    assert last[-1]["Kind"] == "snapshot" and 0 < last[-1]["InitDurationInSeconds"] < 30


def test_a_killed_template_leaves_the_endpoint_serving_from_cold_starts(gateway, quiet):
    assert wait_for(lambda: instances(gateway, quiet) == 0, 30 * IDLE_SECONDS)
    template = int(TEMPLATE.findall(gateway.log())[-1])
    os.kill(template, signal.SIGKILL)

    assert invoke(gateway, quiet, greedy(PROMPTS[1]))
    assert starts(gateway, quiet)[-1][1] == "cold"
    # A new template replaces it; the next start from zero forks from that one.
    assert wait_for(lambda: len(re.findall(r"template of \S+ ready in", gateway.log())) >= 2, 60)
    assert wait_for(lambda: instances(gateway, quiet) == 0, 30 * IDLE_SECONDS)
    assert invoke(gateway, quiet, greedy(PROMPTS[2]))
    assert starts(gateway, quiet)[-1][1] == "snapshot"


@pytest.fixture(scope="module")
def tight(tmp_path_factory, model_path):
    """A gateway whose templates may hold 1 MB: each is evicted once it has served its endpoint's creation."""
    running, running.run_dir = gateway_with(tmp_path_factory, "tight", SERVELET_SNAPSHOT_MEMORY_MB="1")
    yield running
    stop_process(running.process)


def test_an_evicted_template_leaves_the_endpoint_serving_from_cold_starts(tight):
    name = create(tight, "evicted", {"MemorySizeInMB": 2048, "MaxConcurrency": 2})
    assert wait_for(lambda: "evicted, as templates would hold" in tight.log(), 30), tight.log()[-3000:]
    assert wait_for(lambda: instances(tight, name) == 0, 30 * IDLE_SECONDS)
    assert invoke(tight, name, greedy(PROMPTS[0]))
    assert [kind for _, kind, _ in starts(tight, name)] == ["snapshot", "cold"]


def test_forked_instances_and_templates_end_with_a_killed_gateway(tight):
    """Their parent is the template, not the gateway: they watch the gateway themselves."""
    name = create(tight, "orphans", {"MemorySizeInMB": 2048, "MaxConcurrency": 2, "ProvisionedConcurrency": 1})
    forked = [pid for _, kind, pid in starts(tight, name) if kind == "snapshot"]
    templates = [int(pid) for pid in TEMPLATE.findall(tight.log())]
    assert forked
    tight.process.kill()
    tight.process.wait()
    assert wait_for(lambda: not any(os.path.exists(f"/proc/{pid}") and _alive(pid) for pid in forked + templates), 30)


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
