"""A multi-model endpoint: one prefix of model.tar.gz archives, each named per request by boto3's TargetModel.

The memory budget holds two of the models: cycling through more evicts, answers stay right, and the loads,
evictions, hits and misses show in the gateway's Prometheus metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import tarfile
import threading
import textwrap
from pathlib import Path

import pytest
from conftest import boto, start_gateway, stop_process, wait_for
from prometheus_client.parser import text_string_to_metric_families

PADDING = 20_000  # bytes of "weights" per model: the budget below holds two models, not three
BUDGET = 50_000
SLOW_LOAD_SECONDS = 1.0
CYCLED = ["model-a", "model-b", "model-c", "model-d"]

# Each model answers its own name (read from its folder by model_fn) with the input it was given.
SCRIPT = '''
import json, os, time

def model_fn(model_dir):
    with open(os.path.join(model_dir, "model.json")) as f:
        params = json.load(f)
    time.sleep(params["load_seconds"])
    return params["name"]

def transform_fn(model, body, content_type, accept):
    return json.dumps({"model": model, "input": json.loads(body)}), "application/json"
'''


def pack(prefix: Path, name: str, padding: int = PADDING, load_seconds: float = 0.0) -> None:
    """`prefix/NAME.tar.gz` in SageMaker's layout: model files at the top, the handler under code/."""
    members = {
        "model.json": json.dumps({"name": name, "load_seconds": load_seconds}).encode(),
        "weights.bin": bytes(padding),
        "code/inference.py": textwrap.dedent(SCRIPT).encode(),
    }
    with tarfile.open(prefix / f"{name}.tar.gz", "w:gz") as archive:
        for member, data in members.items():
            info = tarfile.TarInfo(member)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi-model")
    prefix = root / "models"
    prefix.mkdir()
    for name in CYCLED:
        pack(prefix, name)
    pack(prefix, "model-slow", load_seconds=SLOW_LOAD_SECONDS)
    pack(prefix, "model-huge", padding=BUDGET + 1)
    running = start_gateway(root, env={"SERVELET_CACHE_DIR": str(root / "cache")}, args=["--instances", "0"], ready=None)
    sagemaker = boto("sagemaker", running.base_url)
    container = {"ModelDataUrl": str(prefix), "Mode": "MultiModel", "Environment": {"SERVELET_MODEL_CACHE_BYTES": str(BUDGET)}}
    sagemaker.create_model(ModelName="many", PrimaryContainer=container, ExecutionRoleArn="arn:aws:iam::1:role/x")
    variant = {"VariantName": "AllTraffic", "ModelName": "many", "InitialInstanceCount": 1, "InstanceType": "ml.m5.large"}
    sagemaker.create_endpoint_config(EndpointConfigName="many", ProductionVariants=[variant])
    sagemaker.create_endpoint(EndpointName="many", EndpointConfigName="many")
    sagemaker.get_waiter("endpoint_in_service").wait(EndpointName="many", WaiterConfig={"Delay": 1, "MaxAttempts": 120})
    yield running
    stop_process(running.process)


@pytest.fixture(scope="module")
def runtime(gateway):
    return boto("sagemaker-runtime", gateway.base_url, retries={"max_attempts": 1}, max_pool_connections=16)


class Requests:
    """The requests that reached the model cache (a hit or a miss each), to know when the metrics have them all."""

    def __init__(self) -> None:
        self.sent = 0
        self.lock = threading.Lock()

    def ask(self, runtime, target: str, value) -> dict:
        with self.lock:
            self.sent += 1
        answer = runtime.invoke_endpoint(
            EndpointName="many", TargetModel=f"{target}.tar.gz", Body=json.dumps(value), ContentType="application/json"
        )
        return json.loads(answer["Body"].read())


@pytest.fixture(scope="module")
def requests() -> Requests:
    return Requests()


def cache_metrics(gateway) -> dict[str, float]:
    """The endpoint's model-cache figures from /metrics: loads, evictions, hits, misses, models_loaded."""
    with gateway.http(timeout=10) as http:
        text = http.get("/metrics").text
    figures = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("endpoint") == "many" and sample.name.startswith(("servelet_model_", "servelet_models_")):
                name = sample.name.removeprefix("servelet_").removesuffix("_total")
                figures[name] = figures.get(name, 0) + sample.value
    return figures


def settled(gateway, requests: Requests) -> dict[str, float]:
    """The figures once the instance's last health poll counts every request sent."""
    figures: dict[str, float] = {}

    def all_counted() -> bool:
        figures.update(cache_metrics(gateway))
        return figures.get("model_hits", 0) + figures.get("model_misses", 0) == requests.sent

    assert wait_for(all_counted, 15), f"{requests.sent} requests sent, metrics say {figures}"
    return figures


def test_more_models_than_the_budget_holds_are_evicted_and_answers_stay_right(gateway, runtime, requests):
    before = settled(gateway, requests)
    for round_ in range(2):
        for n, name in enumerate(CYCLED):
            assert requests.ask(runtime, name, [round_, n]) == {"model": name, "input": [round_, n]}
    for name in reversed(CYCLED[-2:]):  # the two most recent stay loaded: hits
        assert requests.ask(runtime, name, "again") == {"model": name, "input": "again"}

    after = settled(gateway, requests)
    delta = {key: after[key] - before.get(key, 0) for key in ("model_loads", "model_evictions", "model_hits", "model_misses")}
    # Least recently used with room for two: cycling through four misses every time.
    requested = 2 * len(CYCLED)
    assert delta == {"model_loads": requested, "model_evictions": requested - 2, "model_hits": 2, "model_misses": requested}
    assert after["models_loaded"] == 2
    assert after["model_load_seconds"] > 0


def test_concurrent_first_requests_load_a_model_once(gateway, runtime, requests):
    before = settled(gateway, requests)
    start = threading.Barrier(10)
    answers: list[dict] = []

    def first_request(n: int) -> None:
        start.wait(timeout=30)
        answers.append(requests.ask(runtime, "model-slow", n))

    threads = [threading.Thread(target=first_request, args=(n,)) for n in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(answers, key=lambda a: a["input"]) == [{"model": "model-slow", "input": n} for n in range(10)]

    after = settled(gateway, requests)
    assert after["model_loads"] - before["model_loads"] == 1
    assert after["model_misses"] - before["model_misses"] == 10  # all ten came while it loaded
    assert after["model_load_seconds"] - before["model_load_seconds"] >= SLOW_LOAD_SECONDS


@pytest.mark.parametrize("target", ["../models/model-a.tar.gz", "/etc/passwd", "model-a/../../secret", ".", "./"])
def test_a_target_outside_the_prefix_is_refused(runtime, target):
    with pytest.raises(runtime.exceptions.ValidationError) as raised:
        runtime.invoke_endpoint(EndpointName="many", TargetModel=target, Body="[]", ContentType="application/json")
    assert "name a model under the prefix" in raised.value.response["Error"]["Message"]


def test_a_missing_target_model_says_so(runtime, requests):
    with pytest.raises(runtime.exceptions.ValidationError) as raised:
        requests.ask(runtime, "model-z", [])
    assert "target model 'model-z.tar.gz' not found" in raised.value.response["Error"]["Message"]


def test_no_target_model_names_the_header(runtime):
    with pytest.raises(runtime.exceptions.ValidationError) as raised:
        runtime.invoke_endpoint(EndpointName="many", Body="[]", ContentType="application/json")
    assert "X-Amzn-SageMaker-Target-Model" in raised.value.response["Error"]["Message"]


def test_a_model_larger_than_the_whole_budget_is_a_model_error_saying_so(runtime, requests):
    with pytest.raises(runtime.exceptions.ModelError) as raised:
        requests.ask(runtime, "model-huge", [])
    message = raised.value.response["OriginalMessage"]
    assert "model-huge.tar.gz" in message and f"SERVELET_MODEL_CACHE_BYTES={BUDGET}" in message


# -- in the instance: a model evicted while a request uses it closes only when that request ends -------------------
HELD = '''
import json, os, time

def model_fn(model_dir):
    return model_dir

def transform_fn(model_dir, body, content_type, accept):
    deadline = time.monotonic() + 30
    while not os.path.exists(os.path.join(model_dir, "release")) and time.monotonic() < deadline:
        time.sleep(0.01)
    return json.dumps({"model": os.path.basename(model_dir)}), "application/json"
'''


async def test_a_model_in_use_is_evicted_but_closed_only_after_its_request(tmp_path):
    from servelet.runtimes import Call
    from servelet.runtimes.multimodel import MultiModelRuntime
    from servelet.settings import InstanceSettings

    for name in ("held", "other-1", "other-2"):
        (tmp_path / name / "code").mkdir(parents=True)
        (tmp_path / name / "code" / "inference.py").write_text(textwrap.dedent(HELD))
        (tmp_path / name / "weights.bin").write_bytes(bytes(PADDING))
    (tmp_path / "other-1" / "release").touch()
    (tmp_path / "other-2" / "release").touch()
    cache = MultiModelRuntime(InstanceSettings(model=str(tmp_path), multi_model=True, model_cache_bytes=BUDGET))

    def call(target: str) -> Call:
        return Call(body=b"{}", target_model=target)

    held_answer = asyncio.create_task(cache.invoke(call("held")))
    assert await until(lambda: "held" in cache.loaded and cache.loaded["held"].users == 1)
    held = cache.loaded["held"]
    closed: list[str] = []
    held.runtime.close = lambda: closed.append("held")

    for other in ("other-1", "other-2"):  # two more: the budget holds two, so `held` is evicted
        assert json.loads((await cache.invoke(call(other))).body) == {"model": other}
    assert held.evicted and "held" not in cache.loaded and closed == []

    (tmp_path / "held" / "release").touch()
    assert json.loads((await held_answer).body) == {"model": "held"}
    assert await until(lambda: closed == ["held"])
    cache.close()


async def until(condition, seconds: float = 10.0) -> bool:
    """Poll `condition` on the event loop until it holds or `seconds` pass."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def test_a_stream_whose_client_left_before_its_first_chunk_still_releases_its_model():
    """The body's generator never starts, so only the response itself can release the model."""
    from starlette.responses import StreamingResponse

    from servelet.runtimes.multimodel import ReleasingStream

    async def never_started():
        yield b"never sent"

    released = []
    stream = ReleasingStream(StreamingResponse(never_started(), media_type="application/jsonlines"), lambda: released.append(1))

    async def receive():
        return {"type": "http.disconnect"}

    async def send(message):
        raise OSError("the client is gone")

    with contextlib.suppress(Exception):  # whether Starlette raises the failed send or swallows it
        await stream({"type": "http", "asgi": {"spec_version": "2.3"}}, receive, send)
    assert released == [1] and stream.headers["content-type"] == "application/jsonlines"


def test_the_openai_model_field_names_a_target_model_as_endpoint_slash_target(gateway, model_path, tmp_path):
    """`model="llms/gemma.gguf"`: the endpoint llms, its target model gemma.gguf (a GGUF, on llama.cpp)."""
    import openai

    prefix = tmp_path / "llms"
    prefix.mkdir()
    (prefix / "gemma.gguf").symlink_to(model_path)
    sagemaker = boto("sagemaker", gateway.base_url)
    sagemaker.create_model(ModelName="llms", PrimaryContainer={"ModelDataUrl": str(prefix), "Mode": "MultiModel"})
    sagemaker.create_endpoint_config(
        EndpointConfigName="llms", ProductionVariants=[{"VariantName": "AllTraffic", "ModelName": "llms", "InitialInstanceCount": 1}]
    )
    sagemaker.create_endpoint(EndpointName="llms", EndpointConfigName="llms")
    sagemaker.get_waiter("endpoint_in_service").wait(EndpointName="llms", WaiterConfig={"Delay": 1, "MaxAttempts": 120})
    client = openai.OpenAI(base_url=gateway.base_url + "/v1", api_key="any", max_retries=0)

    chat = client.chat.completions.create(
        model="llms/gemma.gguf", temperature=0, max_tokens=24, messages=[{"role": "user", "content": "What is the capital of France?"}]
    )
    assert "Paris" in chat.choices[0].message.content and chat.model == "llms/gemma.gguf"
    completion = client.completions.create(model="llms/gemma.gguf", prompt="The capital of France is", max_tokens=8, temperature=0)
    assert completion.choices[0].text.strip()
    streamed = client.completions.create(
        model="llms/gemma.gguf", prompt="The capital of France is", max_tokens=8, temperature=0, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == completion.choices[0].text
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nowhere/gemma.gguf", prompt="hi", max_tokens=2)
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="llms/absent.gguf", prompt="hi", max_tokens=2)
    assert "target model 'absent.gguf' not found" in str(missing.value)
