"""`servelet invoke --async` and `servelet jobs` as a user drives them: real `servelet` processes, a real gateway
with an async endpoint of the real default model, outputs under file:// in the test's folder."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import SERVELET, boto, create_async_endpoint, start_gateway, stop_process, wait_for

from servelet.settings import DEFAULT_MODEL_URI

PROMPT = {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 2}}
INLINE_LIMIT = 128_000


@dataclass
class Gateway:
    url: str
    folder: Path  # the gateway's run folder: its store is under data/, outputs under out/


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, model_path):
    folder = tmp_path_factory.mktemp("async-cli")
    running = start_gateway(folder, env={"SERVELET_INSTANCES": "0"}, ready=None)
    create_async_endpoint(boto("sagemaker", running.base_url), "answering", DEFAULT_MODEL_URI, f"file://{folder}/out")
    yield Gateway(running.base_url, folder)
    stop_process(running.process)


def servelet(gateway: Gateway, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """The `servelet` executable against the gateway and its store, with wide columns so tables never wrap an id."""
    env = os.environ | {"COLUMNS": "250", "SERVELET_URL": gateway.url, "SERVELET_DATA_DIR": str(gateway.folder / "data")}
    return subprocess.run([SERVELET, *args], env=env, input="", capture_output=True, text=True, timeout=timeout)


def refused(result: subprocess.CompletedProcess, message: str, code: int = 2) -> None:
    assert result.returncode == code, result.stdout + result.stderr
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def write_json(path: Path, body: dict, padding: int = 0) -> Path:
    """The body as JSON, then `padding` spaces: still valid JSON, only bigger."""
    path.write_bytes(json.dumps(body).encode() + b" " * padding)
    return path


def test_invoke_async_wait_prints_the_generated_answer(gateway, tmp_path):
    prompt = write_json(tmp_path / "prompt.json", PROMPT)
    result = servelet(gateway, "invoke", "answering", "--async", str(prompt), "--wait")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["generated_text"]
    assert "InferenceId:" in result.stderr  # stdout is the output alone


def test_invoke_async_says_where_the_answer_will_be(gateway, tmp_path):
    prompt = write_json(tmp_path / "prompt.json", PROMPT)
    worded = servelet(gateway, "invoke", "answering", "--async", str(prompt), "--inference-id", "worded-1")
    assert worded.returncode == 0, worded.stderr
    output = f"file://{gateway.folder}/out/worded-1.out"
    assert "InferenceId:     worded-1" in worded.stdout and f"OutputLocation:  {output}" in worded.stdout

    as_json = servelet(gateway, "invoke", "answering", "--async", str(prompt), "--json", "--ttl", "600", "--timeout", "60")
    assert as_json.returncode == 0, as_json.stderr
    accepted = json.loads(as_json.stdout)
    assert accepted["OutputLocation"] == f"file://{gateway.folder}/out/{accepted['InferenceId']}.out"
    for uri in (output, accepted["OutputLocation"]):
        path = Path(uri.removeprefix("file://"))
        assert wait_for(path.exists, 120), uri
        assert json.loads(path.read_text())["generated_text"]


def test_a_file_over_the_inline_limit_needs_an_input_location(gateway, tmp_path):
    big = write_json(tmp_path / "big.json", PROMPT, padding=130_000)
    result = servelet(gateway, "invoke", "answering", "--async", str(big))
    refused(result, f"{big} has {big.stat().st_size:,} bytes, more than the 128,000 an async request may carry: "
                    "give --input-location")


def test_a_big_file_is_uploaded_to_its_input_location_and_answered(gateway, tmp_path):
    big = write_json(tmp_path / "big.json", PROMPT, padding=130_000)
    assert big.stat().st_size > INLINE_LIMIT
    uploaded = gateway.folder / "in" / "big.json"
    result = servelet(gateway, "invoke", "answering", "--async", str(big), "--input-location", f"file://{uploaded}",
                      "--wait", "--wait-timeout", "180")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["generated_text"]
    assert uploaded.read_bytes() == big.read_bytes()


def test_nothing_is_uploaded_for_an_endpoint_that_does_not_exist(gateway, tmp_path):
    prompt = write_json(tmp_path / "prompt.json", PROMPT)
    target = tmp_path / "never" / "prompt.json"
    result = servelet(gateway, "invoke", "nowhere", "--async", str(prompt), "--input-location", f"file://{target}")
    refused(result, "no endpoint named 'nowhere'", code=1)
    assert not target.exists()


def test_a_job_the_model_refuses_exits_1_with_its_reason(gateway, tmp_path):
    no_inputs = write_json(tmp_path / "bad.json", {"parameters": {"max_new_tokens": 2}})
    result = servelet(gateway, "invoke", "answering", "--async", str(no_inputs), "--wait", "--inference-id", "refused-1")
    refused(result, "async invocation refused-1 Failed: ", code=1)


def test_async_options_need_async(gateway):
    refused(servelet(gateway, "invoke", "answering", "hello", "--wait", "--ttl", "60"), "--wait, --ttl: only with --async FILE")


def test_jobs_lists_shows_and_filters_the_jobs(gateway, tmp_path):
    prompt = write_json(tmp_path / "prompt.json", PROMPT)
    done = servelet(gateway, "invoke", "answering", "--async", str(prompt), "--wait", "--inference-id", "listed-1")
    assert done.returncode == 0, done.stderr

    table = servelet(gateway, "jobs", "--endpoint", "answering")
    assert table.returncode == 0, table.stderr
    [row] = [line for line in table.stdout.splitlines() if "listed-1" in line]
    assert "Completed" in row and f"{gateway.folder}/out/listed-1.out" in row

    listed = servelet(gateway, "jobs", "--endpoint", "answering", "--status", "completed", "--json")
    assert listed.returncode == 0, listed.stderr
    jobs = [json.loads(line) for line in listed.stdout.splitlines()]
    assert "listed-1" in [job["InferenceId"] for job in jobs]
    assert {job["Status"] for job in jobs} == {"Completed"} and {job["EndpointName"] for job in jobs} == {"answering"}
    created = [job["CreationTime"] for job in jobs]
    assert created == sorted(created, reverse=True)  # newest first

    shown = servelet(gateway, "jobs", "show", "listed-1", "--json")
    assert shown.returncode == 0, shown.stderr
    job = json.loads(shown.stdout)
    assert job["Status"] == "Completed" and job["Attempts"] == 1 and job["ContentType"] == "application/json"
    assert job["InlineInputBytes"] == prompt.stat().st_size
    worded = servelet(gateway, "jobs", "show", "listed-1")
    assert worded.returncode == 0 and "Status:" in worded.stdout and "EndTime:" in worded.stdout

    assert servelet(gateway, "jobs", "--endpoint", "nowhere").stdout.startswith("no async invocations like that")


def test_jobs_refuses_what_names_no_job(gateway):
    refused(servelet(gateway, "jobs", "--status", "Done"),
            "--status 'Done' is not a job status: give one of Pending, InProgress, Completed, Failed, Expired")
    refused(servelet(gateway, "jobs", "show", "no-such-job"), "no async invocation has InferenceId 'no-such-job'", code=1)
