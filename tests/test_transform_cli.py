"""`servelet transform` as a user drives it: a real `servelet` process running a batch transform job on a real
gateway over file:// inputs, then listing, describing and stopping jobs."""

from __future__ import annotations

import json
import os
import subprocess

import httpx
import pytest
from conftest import SERVELET, start_gateway, stop_process, wait_for

from servelet.settings import DEFAULT_MODEL_URI

PROMPTS = ["The capital of France is", "Water boils at", "The largest planet is", "One plus one is"]


def servelet(*args: str, url: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the `servelet` executable as a user would; wide columns so tables never wrap a name."""
    env = os.environ | {"COLUMNS": "200", "SERVELET_URL": url}
    return subprocess.run([SERVELET, *args], env=env, input="", capture_output=True, text=True, timeout=timeout)


def requests_file(path, count: int) -> None:
    """`count` LMI requests, one JSON line each, two new tokens apiece (the runtime's application/jsonlines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (json.dumps({"inputs": PROMPTS[n % len(PROMPTS)], "parameters": {"max_new_tokens": 2}}) for n in range(count))
    path.write_text("".join(line + "\n" for line in lines))


def control(gateway, operation: str, **body) -> dict:
    answer = httpx.post(gateway.base_url, json=body, headers={"X-Amz-Target": f"SageMaker.{operation}"}, timeout=30)
    assert answer.is_success, answer.text
    return answer.json()


def described(gateway, name: str) -> dict:
    result = servelet("transform", "describe", name, "--json", url=gateway.base_url)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, model_path):
    running = start_gateway(tmp_path_factory.mktemp("transform-cli"), env={"SERVELET_INSTANCES": "0"}, ready=None)
    control(running, "CreateModel", ModelName="gemma", PrimaryContainer={"ModelDataUrl": DEFAULT_MODEL_URI})
    yield running
    stop_process(running.process)


def test_a_job_runs_to_completion_with_one_output_line_per_input_line(gateway, tmp_path):
    requests_file(tmp_path / "in" / "a.jsonl", 4)
    requests_file(tmp_path / "in" / "more" / "b.jsonl", 2)
    ran = servelet("transform", DEFAULT_MODEL_URI, str(tmp_path / "in"), str(tmp_path / "out"), "--name", "lines",
                   url=gateway.base_url)
    assert ran.returncode == 0, ran.stderr
    assert "Status:  Completed: 6 records done, 0 failed, 2/2 files" in ran.stdout, ran.stdout
    assert f"Outputs: file://{tmp_path / 'out'}" in ran.stdout
    for name, count in (("a.jsonl.out", 4), ("more/b.jsonl.out", 2)):  # each keeps its input's relative key
        answers = [json.loads(line) for line in (tmp_path / "out" / name).read_text().splitlines()]
        assert len(answers) == count and all(answer["generated_text"] for answer in answers), answers
    # The URI made a model named as the job, as `servelet deploy` makes one for an endpoint.
    assert control(gateway, "DescribeModel", ModelName="lines")["PrimaryContainer"]["ModelDataUrl"] == DEFAULT_MODEL_URI

    listed = servelet("transform", "list", url=gateway.base_url)
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if " lines " in line)
    assert "Completed" in row and "6 records done, 0 failed, 2/2 files" in row, listed.stdout
    assert " lines " in servelet("transform", "list", "--status", "Completed", url=gateway.base_url).stdout
    assert " lines " not in servelet("transform", "list", "--status", "Failed", url=gateway.base_url).stdout

    raw = described(gateway, "lines")
    assert raw["TransformJobStatus"] == "Completed" and raw["ModelName"] == "lines"
    assert raw["Progress"] | {"RecordFailures": []} == {
        "RecordsDone": 6, "RecordsFailed": 0, "FilesDone": 2, "FilesTotal": 2, "RecordFailures": []}
    assert raw["TransformInput"]["DataSource"]["S3DataSource"]["S3Uri"] == f"file://{tmp_path / 'in'}/"


def test_a_refused_job_prints_the_gateways_message_and_leaves_no_model_behind(gateway, tmp_path):
    requests_file(tmp_path / "in" / "a.jsonl", 1)
    ran = servelet("transform", DEFAULT_MODEL_URI, str(tmp_path / "in"), str(tmp_path / "out"), "--name", "bogus",
                   "--strategy", "Bogus", url=gateway.base_url)
    assert ran.returncode != 0, ran.stdout
    assert "BatchStrategy: 'Bogus' is not one of SingleRecord, MultiRecord" in ran.stderr, ran.stderr
    assert "Traceback" not in ran.stderr + ran.stdout
    assert "bogus" not in [m["ModelName"] for m in control(gateway, "ListModels")["Models"]]
    missing = servelet("transform", "nowhere", str(tmp_path / "in"), str(tmp_path / "out"), url=gateway.base_url)
    assert missing.returncode != 0 and "no model named 'nowhere'" in missing.stderr, missing.stderr
    unknown = servelet("transform", "describe", "nowhere", url=gateway.base_url)
    assert unknown.returncode != 0 and "Could not find requested job with name nowhere" in unknown.stderr


def test_a_job_started_without_waiting_is_stopped_by_name(gateway, tmp_path):
    requests_file(tmp_path / "in" / "big.jsonl", 400)
    started = servelet("transform", "gemma", str(tmp_path / "in"), str(tmp_path / "out"), "--name", "big",
                       "--strategy", "SingleRecord", "--no-wait", url=gateway.base_url)
    assert started.returncode == 0, started.stderr
    assert "transform job big is InProgress" in started.stdout and "servelet transform stop big" in started.stdout
    assert wait_for(lambda: described(gateway, "big")["Progress"]["RecordsDone"] >= 2, 120, poll=0.5)

    stopped = servelet("transform", "stop", "big", url=gateway.base_url)
    assert stopped.returncode == 0, stopped.stderr
    assert "transform job big is Stopped" in stopped.stdout
    raw = described(gateway, "big")
    assert raw["TransformJobStatus"] == "Stopped" and 2 <= raw["Progress"]["RecordsDone"] < 400, raw
    shown = servelet("transform", "describe", "big", url=gateway.base_url)
    assert "Status:  Stopped" in shown.stdout and "/.servelet-parts/big/" in shown.stdout, shown.stdout
    again = servelet("transform", "stop", "big", url=gateway.base_url)
    assert again.returncode != 0 and "only a job InProgress can be stopped" in again.stderr, again.stderr
