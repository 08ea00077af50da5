"""The `servelet` command line as a user drives it: deploy, list, invoke, describe, delete, and `serve --config`,
each a real `servelet` process talking to a real gateway."""

from __future__ import annotations

import json
import os
import re
import subprocess
import textwrap
from pathlib import Path

import httpx
import pytest
from conftest import SERVELET, START_TIMEOUT, free_port, stop_process, wait_for

from servelet.config import ConfigError, apply_config, load_config
from servelet.control.endpoints import Fleet
from servelet.control.plane import ControlPlane
from servelet.control.store import Store
from servelet.settings import DEFAULT_MODEL_URI

PROMPT = "The capital of France is"


class Gateway:
    """`servelet serve` with its own data folder, and no endpoint `default` unless asked for."""

    def __init__(self, tmp_path: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp_path / "gateway.log"
        env = os.environ | {"SERVELET_THREADS": "2", "SERVELET_RUN_DIR": str(tmp_path), "SERVELET_DATA_DIR": str(tmp_path / "data")}
        self.process = subprocess.Popen(
            [SERVELET, "serve", "--port", str(self.port), *args],
            env=env, stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT,
        )

    def health(self) -> dict | None:
        if self.process.poll() is not None:
            raise RuntimeError(f"gateway exited with {self.process.returncode}:\n{self.log_path.read_text()}")
        try:
            return httpx.get(f"{self.url}/health", timeout=5).json()
        except httpx.TransportError:
            return None

    def wait_until(self, ready: callable) -> None:
        assert wait_for(lambda: (h := self.health()) is not None and ready(h), START_TIMEOUT, poll=0.2), self.log_path.read_text()

    def stop(self) -> None:
        stop_process(self.process)


def servelet(*args: str, url: str | None = None, stdin: str | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run the `servelet` executable as a user would; wide columns so tables never wrap a name."""
    env = os.environ | {"COLUMNS": "160"} | ({"SERVELET_URL": url} if url else {})
    return subprocess.run(
        [SERVELET, *args], env=env, input=stdin if stdin is not None else "", capture_output=True, text=True, timeout=timeout
    )


def refused(result: subprocess.CompletedProcess, message: str) -> None:
    """A failed command: non-zero exit, the message on stderr, no traceback."""
    assert result.returncode != 0, result.stdout
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr + result.stdout


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, model_path):
    running = Gateway(tmp_path_factory.mktemp("cli"), "--instances", "0")
    running.wait_until(lambda health: health["status"] == "ok")
    yield running
    running.stop()


# -- the user's story ---------------------------------------------------------------------------------------------
def test_deploy_list_invoke_describe_and_delete(gateway):
    deployed = servelet("deploy", DEFAULT_MODEL_URI, "--name", "chat", url=gateway.url)
    assert deployed.returncode == 0, deployed.stderr
    assert "endpoint chat is InService" in deployed.stdout

    listed = servelet("endpoints", "list", url=gateway.url)
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if " chat " in line)
    assert "InService" in row and "AllTraffic: weight 1, 1/1 instances" in row

    # The prompt three ways: an argument, stdin (as `echo ... |` gives it), a JSON body; greedy, so all agree.
    by_argument = servelet("invoke", "chat", PROMPT, "--max-new-tokens", "6", url=gateway.url)
    assert by_argument.returncode == 0, by_argument.stderr
    text = json.loads(by_argument.stdout)["generated_text"]
    assert text.strip()
    by_stdin = servelet("invoke", "chat", "-", "--max-new-tokens", "6", url=gateway.url, stdin=PROMPT + "\n")
    assert json.loads(by_stdin.stdout)["generated_text"] == text
    body = json.dumps({"inputs": PROMPT, "parameters": {"max_new_tokens": 6}})
    streamed = servelet("invoke", "chat", body, "--stream", url=gateway.url)
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == text + "\n"

    described = servelet("endpoints", "describe", "chat", url=gateway.url)
    assert described.returncode == 0, described.stderr
    assert "Status:   InService" in described.stdout
    assert f"AllTraffic: model chat ({DEFAULT_MODEL_URI})" in described.stdout
    assert "instances 1 ready of 1" in described.stdout
    assert re.search(r"last starts: cold \d+\.\d{3} s \(\d{4}-\d\d-\d\d ", described.stdout), described.stdout
    raw = json.loads(servelet("endpoints", "describe", "chat", "--json", url=gateway.url).stdout)
    assert raw["EndpointStatus"] == "InService" and raw["ProductionVariants"][0]["CurrentInstanceCount"] == 1
    assert raw["ProductionVariants"][0]["LastInstanceStarts"][0]["Kind"] == "cold"

    deleted = servelet("endpoints", "delete", "chat", url=gateway.url)
    assert deleted.returncode == 0, deleted.stderr
    assert deleted.stdout.splitlines() == ["deleted endpoint chat", "deleted endpoint config chat", "deleted model chat"]
    assert "chat" not in servelet("endpoints", "list", url=gateway.url).stdout
    models = httpx.post(gateway.url, json={}, headers={"X-Amz-Target": "SageMaker.ListModels"}).json()["Models"]
    assert "chat" not in [m["ModelName"] for m in models]


def test_a_model_that_cannot_load_fails_the_deploy_with_the_reason(gateway, tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a model")
    failed = servelet("deploy", str(broken), "--name", "broken", url=gateway.url)
    refused(failed, "endpoint 'broken' failed: ")
    # The reason is the instance's own: llama.cpp could not load that file.
    assert "could not load the model" in failed.stderr and "broken.gguf" in failed.stderr
    assert "Failed" in servelet("endpoints", "list", url=gateway.url).stdout
    assert "Failure:" in servelet("endpoints", "describe", "broken", url=gateway.url).stdout
    assert servelet("endpoints", "delete", "broken", url=gateway.url).returncode == 0


# -- what goes wrong, said in one line ---------------------------------------------------------------------------
def test_errors_exit_non_zero_with_the_servers_message(gateway):
    refused(servelet("invoke", "nowhere", "hello", url=gateway.url), "Endpoint nowhere of account local not found")
    refused(servelet("endpoints", "describe", "nowhere", url=gateway.url), "no endpoint named 'nowhere'")
    refused(servelet("endpoints", "delete", "nowhere", url=gateway.url), "no endpoint named 'nowhere'")
    refused(servelet("deploy", "ftp://example.com/model.gguf", "--name", "ftp", url=gateway.url), "the scheme is not supported")
    refused(servelet("deploy", DEFAULT_MODEL_URI, "--name", "not_valid", url=gateway.url), "is not a valid name")
    # The model is made before the config is refused; it does not stay behind, so a corrected retry works.
    refused(servelet("deploy", DEFAULT_MODEL_URI, "--name", "many", "--instances", "65", url=gateway.url),
            "InitialInstanceCount: Input should be less than or equal to 64")
    models = httpx.post(gateway.url, json={}, headers={"X-Amz-Target": "SageMaker.ListModels"}).json()["Models"]
    assert "many" not in [m["ModelName"] for m in models]


def test_deploying_a_name_that_exists_says_so(gateway):
    assert servelet("deploy", DEFAULT_MODEL_URI, "--name", "twice", "--no-wait", url=gateway.url).returncode == 0
    refused(servelet("deploy", DEFAULT_MODEL_URI, "--name", "twice", url=gateway.url), "endpoint 'twice' already exists")
    assert servelet("endpoints", "delete", "twice", url=gateway.url).returncode == 0


def test_a_request_the_model_refuses_prints_its_message(gateway):
    assert servelet("deploy", DEFAULT_MODEL_URI, "--name", "strict", url=gateway.url).returncode == 0
    bad = json.dumps({"inputs": "x", "parameters": {"max_new_tokens": -1}})
    refused(servelet("invoke", "strict", bad, url=gateway.url), "parameters.max_new_tokens")
    refused(servelet("invoke", "strict", bad, "--stream", url=gateway.url), "parameters.max_new_tokens")
    assert servelet("endpoints", "delete", "strict", url=gateway.url).returncode == 0


def test_no_gateway_is_one_clear_line():
    url = f"http://127.0.0.1:{free_port()}"
    for command in (["endpoints", "list"], ["invoke", "chat", "hello"], ["deploy", DEFAULT_MODEL_URI, "--name", "x"]):
        result = servelet(*command, url=url)
        refused(result, f"gateway not running at {url}")
        assert len(result.stderr.strip().splitlines()) == 1


# -- servelet serve --config FILE ------------------------------------------------------------------------------
TWO_ENDPOINTS = f"""
models:
  - name: gemma
    uri: {DEFAULT_MODEL_URI}
    environment: {{OPTION_MAX_ROLLING_BATCH_SIZE: 4}}
endpoints:
  - name: chat
    variants:
      - {{name: blue, model: gemma, instances: 1, weight: 1}}
  - name: summarize
    variants:
      - name: main
        model: gemma
        autoscaling: {{min_instances: 1, max_instances: 2, target_concurrent_requests_per_instance: 4}}
    async_inference: {{output_path: /tmp/servelet-async}}
"""


def test_serve_config_brings_up_every_endpoint_it_declares(tmp_path, model_path):
    config = tmp_path / "servelet.yaml"
    config.write_text(TWO_ENDPOINTS)
    running = Gateway(tmp_path, "--config", str(config))
    try:
        running.wait_until(lambda h: {"chat", "summarize"} <= set(h["endpoints"]) and all(
            e["ready"] for e in h["endpoints"].values()))
        assert "default" not in running.health()["endpoints"]  # the file says what to deploy
        listed = servelet("endpoints", "list", url=running.url).stdout
        assert [line for line in listed.splitlines() if "InService" in line and (" chat " in line or " summarize " in line)]
        assert len([line for line in listed.splitlines() if "InService" in line]) == 2
        answer = servelet("invoke", "summarize", PROMPT, "--max-new-tokens", "3", url=running.url)
        assert answer.returncode == 0 and json.loads(answer.stdout)["generated_text"], answer.stderr
    finally:
        running.stop()


def test_a_config_error_names_its_place_in_the_file(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(textwrap.dedent("""
        models:
          - {name: gemma, uri: ftp://example.com/m.gguf}
        endpoints:
          - name: chat
            variants:
              - {name: blue, model: x, instanse: 2}
    """))
    result = servelet("serve", "--port", str(free_port()), "--config", str(config), timeout=30)
    assert result.returncode == 2
    assert f"{config}: invalid config:" in result.stderr
    assert "models[0].uri: 'ftp://example.com/m.gguf': the scheme is not supported" in result.stderr
    assert "endpoints[0].variants[0].instanse: unknown key" in result.stderr

    config.write_text("models:\n  - {name: gemma, uri: a.gguf}\nendpoints:\n  - name: chat\n    variants:\n      - {name: blue, model: x}\n")
    result = servelet("serve", "--port", str(free_port()), "--config", str(config), timeout=30)
    assert result.returncode == 2
    assert "endpoints[0].variants[0].model: unknown model 'x' (declared: gemma)" in result.stderr

    config.write_text("endpoints: [\n")
    result = servelet("serve", "--port", str(free_port()), "--config", str(config), timeout=30)
    assert result.returncode == 2 and f"{config}:2:1: not valid YAML" in result.stderr


def test_config_validation_refuses_what_cannot_work(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(textwrap.dedent("""
        models:
          - {name: m, uri: a.gguf, runtime: tensorflow}
          - {name: m, uri: b.gguf}
        endpoints:
          - name: e
            variants:
              - {name: a, model: m, weight: 0}
              - {name: a, model: m, weight: 0, instances: 65}
              - name: b
                model: m
                instances: 5
                autoscaling: {max_instances: 2, target_concurrent_requests_per_instance: 4}
    """))
    with pytest.raises(ConfigError) as raised:
        load_config(config)
    message = str(raised.value)
    assert "models[0].runtime: runtime 'tensorflow' is not available" in message
    assert "endpoints[0].variants[1].instances: Input should be less than or equal to 64" in message
    assert "endpoints[0].variants[2]: instances (5) must lie within autoscaling's min_instances..max_instances (1..2)" in message


# -- applying a config at start: create what is missing, keep what is unchanged, re-create what changed ----------
def declare(tmp_path: Path, text: str):
    path = tmp_path / "servelet.yaml"
    path.write_text(text)
    return load_config(path)


ZERO_INSTANCES = """
models:
  - {{name: m, uri: {uri}}}
endpoints:
  - name: one
    variants: [{{name: a, model: m, instances: 0}}]
  - name: two
    variants: [{{name: a, model: m, instances: 0, weight: {weight}}}]
"""


async def test_apply_config_creates_keeps_and_re_creates(tmp_path):
    """Variants of 0 instances, so that the real store and plane do the work without loading a model."""
    store = Store(Store.default_url(tmp_path))
    fleet = Fleet(tmp_path / "run")
    plane = ControlPlane(store, fleet, start_timeout=10)
    try:
        first = declare(tmp_path, ZERO_INSTANCES.format(uri="a.gguf", weight=1))
        assert await apply_config(plane, first) == {"one": "created", "two": "created"}
        assert await apply_config(plane, first) == {"one": "kept", "two": "kept"}

        reweighted = declare(tmp_path, ZERO_INSTANCES.format(uri="a.gguf", weight=3))
        assert await apply_config(plane, reweighted) == {"one": "kept", "two": "re-created"}
        assert (await plane.describe_endpoint_config("two")).production_variants[0].initial_variant_weight == 3

        moved = declare(tmp_path, ZERO_INSTANCES.format(uri="b.gguf", weight=3))
        assert await apply_config(plane, moved) == {"one": "re-created", "two": "re-created"}
        assert (await plane.describe_model("m")).uri == "b.gguf"
    finally:
        await plane.close()
        await fleet.close()
        store.close()
