"""Shared fixtures: the real default model, and real `servelet container` processes on free ports."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from servelet.artifacts import resolve_model
from servelet.engine.errors import REBUILD_WITHOUT_AMX
from servelet.settings import DEFAULT_MODEL_URI

# Private servers for the tests that need real ones: PostgreSQL (`postgres`) and moto S3 (`s3_server`, `s3_env`).
pytest_plugins = ["postgres", "s3"]

SERVELET = str(Path(sys.executable).with_name("servelet"))
START_TIMEOUT = 180.0


@pytest.fixture(scope="session")
def llama_cpp_runs() -> None:
    """A few tokens of the default model in a subprocess, once, before any test loads llama.cpp in this process.

    A llama.cpp build that does not fit this CPU dies by a signal at its first decode; in-process that would kill
    pytest with no summary. Here it fails every test that needs the model, with the signal, the build and the fix."""
    result = subprocess.run(
        [sys.executable, "-m", "servelet.engine.selftest"], capture_output=True, text=True, timeout=START_TIMEOUT
    )
    if result.returncode != 0:
        pytest.fail(selftest_failure(result), pytrace=False)


def selftest_failure(result: subprocess.CompletedProcess) -> str:
    died = f"died by {signal.Signals(-result.returncode).name}" if result.returncode < 0 else f"exited with {result.returncode}"
    system_info = result.stderr.strip().splitlines()[:1] or ["(none printed)"]
    return (
        f"llama.cpp cannot run here: a tiny decode of the default model {died}.\n"
        f"build: {system_info[0]}\n"
        f"fix: rebuild llama.cpp without AMX with `{REBUILD_WITHOUT_AMX}` "
        f"(or `rm -rf .venv && make install` if this environment came from another machine)\n"
        f"output:\n{(result.stdout + result.stderr).strip()[-3000:]}"
    )


@pytest.fixture(scope="session")
def model_path(llama_cpp_runs) -> Path:
    return resolve_model(DEFAULT_MODEL_URI)


def wait_for(condition, seconds: float, poll: float = 0.1) -> bool:
    """Poll `condition` until it holds (True) or `seconds` pass (False): bounded, never a bare sleep."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(poll)
    return bool(condition())


def boto(service: str, base_url: str, **config):
    """A boto3 client of `service` on a gateway, with any credentials (botocore `Config` options as keywords)."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        service, endpoint_url=base_url, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x",
        config=Config(**config),
    )


def create_async_endpoint(sagemaker, name: str, model_uri: str, output: str) -> None:
    """An endpoint of one instance of the model, its AsyncInferenceConfig writing to `output`; waited for InService."""
    sagemaker.create_model(ModelName=name, PrimaryContainer={"ModelDataUrl": model_uri})
    sagemaker.create_endpoint_config(
        EndpointConfigName=name,
        ProductionVariants=[{"VariantName": "AllTraffic", "ModelName": name, "InitialInstanceCount": 1}],
        AsyncInferenceConfig={"OutputConfig": {"S3OutputPath": output}},
    )
    sagemaker.create_endpoint(EndpointName=name, EndpointConfigName=name)
    sagemaker.get_waiter("endpoint_in_service").wait(EndpointName=name, WaiterConfig={"Delay": 1, "MaxAttempts": 180})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningInstance:
    """A `servelet container` subprocess; `base_url` works for httpx, `address` for InstanceClient."""

    def __init__(self, process: subprocess.Popen, address: str, log_path: Path):
        self.process = process
        self.address = address
        self.log_path = log_path

    @property
    def base_url(self) -> str:
        return self.address

    def http(self, **kwargs) -> httpx.Client:
        if self.address.startswith("unix:"):
            transport = httpx.HTTPTransport(uds=self.address.removeprefix("unix:"))
            return httpx.Client(transport=transport, base_url="http://instance", **kwargs)
        return httpx.Client(base_url=self.address, **kwargs)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_instance(
    tmp_path: Path, env: dict[str, str] | None = None, unix_socket: bool = False, timeout: float = START_TIMEOUT
) -> RunningInstance:
    log_path = tmp_path / "instance.log"
    args = [SERVELET, "container"]
    if unix_socket:
        sock = tmp_path / "instance.sock"
        args += ["--socket", str(sock)]
        address = f"unix:{sock}"
    else:
        port = free_port()
        args += ["--port", str(port)]
        address = f"http://127.0.0.1:{port}"
    full_env = os.environ | {"SERVELET_THREADS": "2"} | (env or {})
    process = subprocess.Popen(args, env=full_env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
    instance = RunningInstance(process, address, log_path)
    deadline = time.monotonic() + timeout
    with instance.http(timeout=5) as http:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"instance exited with {process.returncode}:\n{instance.log()}")
            try:
                if http.get("/ping").status_code == 200:
                    return instance
            except httpx.TransportError:
                pass
            time.sleep(0.2)
    stop_instance(instance)
    raise RuntimeError(f"instance not ready after {timeout}s:\n{instance.log()}")


def stop_instance(instance: RunningInstance) -> None:
    stop_process(instance.process, grace=20)


@pytest.fixture(scope="module")
def container(tmp_path_factory, model_path):
    """One instance with default settings, shared by a test module."""
    instance = start_instance(tmp_path_factory.mktemp("container"))
    yield instance
    stop_instance(instance)


class RunningGateway:
    """A `servelet serve` subprocess on a free port with the endpoint `default` deployed."""

    def __init__(self, process: subprocess.Popen, port: int, log_path: Path):
        self.process = process
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.log_path = log_path

    def http(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, **kwargs)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_gateway(
    tmp_path: Path, env: dict[str, str] | None = None, args: list[str] | None = None, ready: str | None = "default"
) -> RunningGateway:
    """Start `servelet serve` and wait until /health says the endpoint `ready` is ready and InService (None: the
    gateway answers). Its record turns InService a moment after its instance is ready (a task of the control plane)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = tmp_path / "gateway.log"
    own_folders = {"SERVELET_RUN_DIR": str(tmp_path), "SERVELET_DATA_DIR": str(tmp_path / "data")}
    full_env = os.environ | {"SERVELET_THREADS": "2"} | own_folders | (env or {})
    process = subprocess.Popen(
        [SERVELET, "serve", "--port", str(port), *(args or [])],
        env=full_env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT,
    )
    gateway = RunningGateway(process, port, log_path)
    deadline = time.monotonic() + START_TIMEOUT
    with gateway.http(timeout=5) as http:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"gateway exited with {process.returncode}:\n{gateway.log()}")
            try:
                health = http.get("/health").json()
                shown = health["endpoints"][ready] if ready is not None else {}
                if ready is None or (shown["ready"] and shown.get("status", "InService") == "InService"):
                    return gateway
            except (httpx.TransportError, KeyError):
                pass
            time.sleep(0.2)
    stop_process(process)
    raise RuntimeError(f"gateway not ready after {START_TIMEOUT}s:\n{gateway.log()}")


def create_key(data_dir: Path, name: str, *flags: str) -> dict:
    """`servelet keys create NAME --scope ... [--aws] --json` on a gateway's store (its SERVELET_DATA_DIR), as a user
    makes a key: before the gateway starts, or while it runs."""
    env = os.environ | {"SERVELET_DATA_DIR": str(data_dir)}
    done = subprocess.run([SERVELET, "keys", "create", name, *flags, "--json"], env=env, capture_output=True,
                          text=True, timeout=120, check=True)
    return json.loads(done.stdout)


def stop_process(process: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM, then SIGKILL if it is still there after `grace` seconds."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class Load:
    """Threads each calling `call` in a loop until stopped (bounded whatever happens): every answer, every failure."""

    def __init__(self, call, threads: int, seconds: float):
        self.call, self.seconds = call, seconds
        self.served: list = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._workers = [threading.Thread(target=self._loop, daemon=True) for _ in range(threads)]

    def _loop(self) -> None:
        deadline = time.monotonic() + self.seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                self.served.append(self.call())
            except Exception as exc:  # noqa: BLE001 - every failure is counted
                self.failures.append(repr(exc))

    def __enter__(self) -> "Load":
        for worker in self._workers:
            worker.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(timeout=120)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, model_path):
    """One `servelet serve` shared by a test module (the model loads once per module)."""
    running = start_gateway(tmp_path_factory.mktemp("gateway"))
    yield running
    stop_process(running.process)


ECHO_HANDLER = '''
def model_fn(model_dir):
    return None

def transform_fn(model, body, content_type, accept):
    return body, content_type
'''


def echo_model(folder: Path) -> str:
    """A handler model (`code/inference.py`) answering each body as it came: no weights, quick to start."""
    (folder / "code").mkdir(parents=True, exist_ok=True)
    (folder / "code" / "inference.py").write_text(ECHO_HANDLER)
    return str(folder)
