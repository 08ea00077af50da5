"""CreateEndpoint answers `Creating` at once: the model's download and the instance's start happen in the background,
so a large remote model holds up neither the control API nor the data plane, nor (after a restart) the other
endpoints. An endpoint deleted while it is still `Creating` leaves nothing running behind.

The model (the default GGUF) comes over HTTP from a server the test runs on 127.0.0.1, whose downloads trickle out
until the test opens the file's gate: a download in progress for as long as the test needs, without timing.
"""

from __future__ import annotations

import json
import mmap
import re
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from conftest import boto, create_async_endpoint, start_gateway, stop_process, wait_for

TRICKLE_BYTES = 64 * 1024  # what a download still gated receives, every GATE_POLL_S (a read timeout never fires)
GATE_POLL_S = 0.2
BODY = json.dumps({"inputs": "The capital of France is", "parameters": {"max_new_tokens": 2}})
FIRST = "/first/model.gguf"  # the endpoint `fetched-in-background`, also after the restart
DELETED = "/deleted/model.gguf"
FETCHED, DELETED_ENDPOINT = "fetched-in-background", "deleted-while-creating"
ASYNC, ASYNC_ENDPOINT = "/async/model.gguf", "async-restored"


class GatedFiles(ThreadingHTTPServer):
    """One file under any path, in byte ranges; the downloads of a path trickle until its gate is set."""

    daemon_threads = True

    def __init__(self, path: Path):
        super().__init__(("127.0.0.1", 0), GatedHandler)
        self._file = open(path, "rb")
        self.data = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        self.gates: dict[str, threading.Event] = {}
        self.parts_begun: Counter = Counter()  # by path: ranged GETs of the file's bytes (not the size probe)
        self.parts_done: Counter = Counter()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def gate(self, path: str) -> threading.Event:
        return self.gates.setdefault(path, threading.Event())

    def close(self) -> None:
        for gate in self.gates.values():
            gate.set()
        self.shutdown()
        self.server_close()
        self.data.close()
        self._file.close()


class GatedHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        data, size = self.server.data, len(self.server.data)
        wanted = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range") or "")
        start, end = (int(wanted[1]), min(int(wanted[2]), size - 1)) if wanted else (0, size - 1)
        self.send_response(206 if wanted else 200)
        if wanted:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("ETag", '"gated-v1"')
        self.end_headers()
        probe = end == 0
        gate = self.server.gate(self.path)
        if not probe:
            self.server.parts_begun[self.path] += 1
        try:
            while start <= end:
                step = end + 1 - start if gate.is_set() or probe else TRICKLE_BYTES
                self.wfile.write(data[start : min(start + step, end + 1)])
                start += step
                if start <= end and not gate.is_set():
                    gate.wait(GATE_POLL_S)
        except (OSError, ValueError):  # the client left (or the module's server closed the file under it)
            return
        if not probe:
            self.server.parts_done[self.path] += 1

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def files(model_path):
    server = GatedFiles(model_path)
    yield server
    server.close()


@pytest.fixture(scope="module")
def running(tmp_path_factory, model_path):
    """The module's gateway, in a dict: the last test restarts it on the same folder."""
    folder = tmp_path_factory.mktemp("gateway")
    holder = {"gateway": start_gateway(folder), "folder": folder}
    yield holder
    stop_process(holder["gateway"].process)


@pytest.fixture(scope="module")
def sagemaker(running):
    # One attempt and a bounded read: a CreateEndpoint that waited for the download would fail, not hang.
    return boto("sagemaker", running["gateway"].base_url, retries={"total_max_attempts": 1}, read_timeout=30)


def create(sagemaker, name: str, uri: str) -> None:
    sagemaker.create_model(ModelName=name, PrimaryContainer={"ModelDataUrl": uri})
    sagemaker.create_endpoint_config(
        EndpointConfigName=name,
        ProductionVariants=[{"VariantName": "AllTraffic", "ModelName": name, "InitialInstanceCount": 1}],
    )
    sagemaker.create_endpoint(EndpointName=name, EndpointConfigName=name)


def invoke(gateway, endpoint: str) -> int:
    with gateway.http(timeout=60) as http:
        return http.post(f"/endpoints/{endpoint}/invocations", content=BODY,
                         headers={"content-type": "application/json"}).status_code


def ready(gateway, endpoint: str) -> bool:
    with gateway.http(timeout=10) as http:
        return http.get("/health").json()["endpoints"].get(endpoint, {}).get("ready", False)


def instance_processes(endpoint: str) -> list[int]:
    """Pids of this user's processes serving an instance of `endpoint` (their environment names it)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            environ = (entry / "environ").read_bytes()
        except (OSError, ValueError):
            continue  # not a process, gone, or not ours
        if f"SERVELET_INSTANCE_NAME={endpoint}/".encode() in environ:
            found.append(int(entry.name))
    return found


def test_create_endpoint_answers_creating_before_its_model_is_fetched(running, files, sagemaker):
    gateway = running["gateway"]
    create(sagemaker, FETCHED, files.url(FIRST))  # answers: with the download still under way
    try:
        assert sagemaker.describe_endpoint(EndpointName=FETCHED)["EndpointStatus"] == "Creating"
        assert wait_for(lambda: files.parts_begun[FIRST] > 0, 30), "the download never began"
        # The download goes on; the gateway serves its other endpoint, and the control API answers.
        assert invoke(gateway, "default") == 200
        with gateway.http(timeout=10) as http:
            assert http.get("/ping").status_code == 200
        listed = sagemaker.list_endpoints(NameContains=FETCHED)["Endpoints"]
        assert [(e["EndpointName"], e["EndpointStatus"]) for e in listed] == [(FETCHED, "Creating")]
        assert files.parts_done[FIRST] == 0 and not ready(gateway, FETCHED)
        assert invoke(gateway, FETCHED) == 503  # no instance yet, as while a model loads: retry later
    finally:
        files.gate(FIRST).set()
    sagemaker.get_waiter("endpoint_in_service").wait(EndpointName=FETCHED, WaiterConfig={"Delay": 1, "MaxAttempts": 180})
    assert invoke(gateway, FETCHED) == 200


def test_an_endpoint_deleted_while_creating_leaves_no_instance(running, files, sagemaker, model_path):
    gateway = running["gateway"]
    create(sagemaker, DELETED_ENDPOINT, files.url(DELETED))
    try:
        assert wait_for(lambda: files.parts_begun[DELETED] > 0, 30), "the download never began"
        sagemaker.delete_endpoint(EndpointName=DELETED_ENDPOINT)
        with pytest.raises(ClientError, match="Could not find endpoint"):
            sagemaker.describe_endpoint(EndpointName=DELETED_ENDPOINT)
    finally:
        files.gate(DELETED).set()  # the download's thread, which the deletion cannot stop, finishes for nobody
    assert wait_for(lambda: files.parts_done[DELETED] == files.parts_begun[DELETED], 60)
    assert DELETED_ENDPOINT not in [e["EndpointName"] for e in sagemaker.list_endpoints()["Endpoints"]]
    assert instance_processes(DELETED_ENDPOINT) == []
    # The name is free again, and nothing left of the cancelled start gets in the way of the new one.
    sagemaker.delete_endpoint_config(EndpointConfigName=DELETED_ENDPOINT)
    sagemaker.delete_model(ModelName=DELETED_ENDPOINT)
    create(sagemaker, DELETED_ENDPOINT, str(model_path))
    sagemaker.get_waiter("endpoint_in_service").wait(EndpointName=DELETED_ENDPOINT, WaiterConfig={"Delay": 1, "MaxAttempts": 180})
    assert invoke(gateway, DELETED_ENDPOINT) == 200 and len(instance_processes(DELETED_ENDPOINT)) == 1
    sagemaker.delete_endpoint(EndpointName=DELETED_ENDPOINT)
    assert instance_processes(DELETED_ENDPOINT) == []


def test_a_restart_serves_each_endpoint_without_waiting_for_the_others_downloads(running, files, sagemaker, tmp_path):
    """Last in the module: it restarts the gateway. The endpoints of the first test and an async one download their
    models again (gated); `default` serves meanwhile, and the async endpoint takes jobs, run once its model is in."""
    files.gate(ASYNC).set()
    create_async_endpoint(sagemaker, ASYNC_ENDPOINT, files.url(ASYNC), f"file://{tmp_path}/out")
    stop_process(running["gateway"].process)
    files.gate(FIRST).clear()
    files.gate(ASYNC).clear()
    began = files.parts_begun[FIRST]
    running["gateway"] = gateway = start_gateway(running["folder"], ready="default")
    try:
        assert wait_for(lambda: files.parts_begun[FIRST] > began, 30), "the restore never fetched the model again"
        assert invoke(gateway, "default") == 200
        assert not ready(gateway, FETCHED) and invoke(gateway, FETCHED) == 503
        with gateway.http(timeout=30) as http:
            queued = http.post(f"/endpoints/{ASYNC_ENDPOINT}/async-invocations", content=BODY,
                               headers={"X-Amzn-SageMaker-Content-Type": "application/json"})
        assert queued.status_code == 202, queued.text
        assert not ready(gateway, ASYNC_ENDPOINT)
    finally:
        files.gate(FIRST).set()
        files.gate(ASYNC).set()
    assert wait_for(lambda: ready(gateway, FETCHED), 120), gateway.log()[-3000:]
    assert invoke(gateway, FETCHED) == 200
    output = tmp_path / "out" / f"{queued.json()['InferenceId']}.out"
    assert wait_for(output.exists, 120), gateway.log()[-3000:]
    assert "generated_text" in output.read_text()
