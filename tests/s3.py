"""A private S3 for the tests: moto's server as a subprocess on 127.0.0.1 (the real boto3 code path, over a socket).

`s3_server` (session): `endpoint_url`, `client()` (boto3, dummy credentials), `env` (for subprocesses),
`new_bucket()`, and `requests(method, path)` (the requests the server has logged: what a cache test counts).
`s3_env` (per test): the same settings in this process's environment, for code that builds its own boto3 client.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import pytest
from conftest import stop_process

START_SECONDS = 60
# werkzeug's access log: 127.0.0.1 - - [date] "GET /bucket/key HTTP/1.1" 206 -
LOGGED_REQUEST = re.compile(r'"([A-Z]+) (\S+) HTTP/[\d.]+" (\d+)')
COLOUR = re.compile(r"\x1b\[[0-9;]*m")  # werkzeug colours some lines, even in a file


class S3Server:
    def __init__(self):
        self.port = _free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        fd, log_path = tempfile.mkstemp(prefix="servelet-moto-", suffix=".log")
        os.close(fd)  # the server writes the log through its own descriptor
        self.log_path = Path(log_path)
        self.env = {
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        with open(self.log_path, "wb") as log:  # the child keeps its copy; ours is closed
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto's server exited with {self.process.returncode}:\n{self.log()}")
            try:
                httpx.get(self.endpoint_url, timeout=2)
                return
            except httpx.TransportError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"moto's server did not answer in {START_SECONDS}s:\n{self.log()}")

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, grace=10)
        self.log_path.unlink(missing_ok=True)

    def client(self, **config):
        """A boto3 S3 client on this server (botocore `Config` options as keywords)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
            aws_access_key_id="testing", aws_secret_access_key="testing", config=Config(**config),
        )

    def new_bucket(self) -> str:
        """A new, empty bucket: each test gets its own."""
        name = f"test-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name

    def requests(self, method: str | None = None, path: str | None = None) -> list[tuple[str, str, int]]:
        """(method, path, status) of each request the server has answered, filtered by method and path."""
        found = [(m, p, int(s)) for m, p, s in LOGGED_REQUEST.findall(COLOUR.sub("", self.log()))]
        return [r for r in found if (method is None or r[0] == method) and (path is None or r[1].split("?")[0] == path)]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """The session's moto S3 server."""
    server = S3Server()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """This test's process talks to the moto server through the standard AWS settings."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return s3_server
