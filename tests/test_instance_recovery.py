"""Instances that die are replaced: in-flight requests fail fast (never hang), later requests are served again,
and a restarted gateway brings its stored endpoints back."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import threading
from pathlib import Path

import httpx
from conftest import start_gateway, stop_process, wait_for

LONG = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 400, "ignore_eos": True}}
SHORT = {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 4}}


def instance_pids(gateway_pid: int) -> list[int]:
    """The `servelet container` processes the gateway started."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat[1]) == gateway_pid and b"container" in args:
            pids.append(int(proc.name))
    return pids



def running(pid: int) -> bool:
    """Whether the process still runs (an exited child that nobody reaped yet does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def ready(http: httpx.Client) -> bool:
    return http.get("/health").json()["endpoints"]["default"]["ready"]


def stream_events(http: httpx.Client, body: dict, first: threading.Event | None = None) -> list[dict]:
    """A TGI stream's events, read to its end; `first` is set once the first event arrived."""
    events = []
    with http.stream("POST", "/generate_stream", json=body) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
                if first is not None:
                    first.set()
    return events


def test_a_killed_instance_fails_only_its_in_flight_requests_and_is_replaced(tmp_path):
    gateway = start_gateway(tmp_path)
    try:
        [pid] = instance_pids(gateway.process.pid)
        with gateway.http(timeout=120) as http, concurrent.futures.ThreadPoolExecutor(4) as pool:
            in_flight = [pool.submit(http.post, "/invocations", json=LONG) for _ in range(2)]
            first_token = threading.Event()
            streaming = pool.submit(stream_events, http, LONG, first_token)  # on the instance's stream channel
            assert first_token.wait(60), "the stream produced no token"  # all three are generating (a busy machine
            # may take seconds to prefill them)
            os.kill(pid, signal.SIGKILL)
            answers = [f.result(timeout=60) for f in in_flight]  # they fail: they do not hang
            assert all(a.status_code == 424 for a in answers), [a.text for a in answers]
            assert all(a.headers["x-amzn-errortype"] == "ModelError" for a in answers)
            events = streaming.result(timeout=60)  # the stream ends with TGI's error event
            assert "token" in events[0] and "error" in events[-1] and "mid-stream" in events[-1]["error"]
            replaced = lambda: instance_pids(gateway.process.pid) not in ([], [pid]) and ready(http)  # noqa: E731
            assert wait_for(replaced, 120), gateway.log()[-3000:]
            # Its stream had tokens: it served, so its death does not count toward failing the endpoint.
            assert "killed by SIGKILL (Killed) after serving requests" in gateway.log(), gateway.log()[-3000:]
            answer = http.post("/invocations", json=SHORT)
            assert answer.status_code == 200 and answer.json()["generated_text"]
            events = stream_events(http, SHORT)  # a channel to the new instance
            assert len(events) == 4 and events[-1]["generated_text"]
    finally:
        stop_process(gateway.process)


def test_a_restarted_gateway_brings_its_endpoints_back(tmp_path):
    """The endpoint `default` is in the store: a gateway started with no endpoint of its own restores it."""
    first = start_gateway(tmp_path)
    with first.http(timeout=60) as http:
        before = http.post("/invocations", json=SHORT).json()
    [pid] = instance_pids(first.process.pid)
    stop_process(first.process)
    assert wait_for(lambda: not running(pid), 30), "the instance outlived its gateway"

    second = start_gateway(tmp_path, args=["--instances", "0"])
    try:
        with second.http(timeout=60) as http:
            assert http.get("/").json()["endpoints"] == ["default"]
            assert http.post("/invocations", json=SHORT).json() == before
    finally:
        stop_process(second.process)
