"""One instance: a `servelet container` subprocess serving the hosting contract on a Unix socket."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import sys
import time
from pathlib import Path

from ..instance.client import InstanceClient

log = logging.getLogger("servelet.control")

HEALTH_POLL_SECONDS = 1.0


def _die_with_parent() -> None:
    """Runs in the child before exec: if the gateway dies (even by SIGKILL), its instances get SIGTERM."""
    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: instances outlive a killed gateway


class InstanceFailed(RuntimeError):
    """The instance process exited or never became ready."""


class Instance:
    """A worker process; the gateway reaches it only through `client` (never by importing the model)."""

    def __init__(self, name: str, model_uri: str, socket_path: Path, env: dict[str, str] | None = None):
        self.name = name
        self.model_uri = model_uri
        self.socket_path = socket_path
        self.env = env or {}
        self.client = InstanceClient(f"unix:{socket_path}", timeout=None)
        self.process: asyncio.subprocess.Process | None = None
        self.ready = False
        self.facts: dict = {}  # GET /model: name, context_length, chat_template, ...
        self.occupancy: dict = {}  # the last /ping: running, waiting, ...
        self.failure: str | None = None
        self.ever_ready = False
        self.stopping = False

    async def start(self) -> None:
        """Start the process (again, for a replacement: with a fresh client, old connections died with it)."""
        if self.process is not None:
            await self.client.aclose()
            self.client = InstanceClient(f"unix:{self.socket_path}", timeout=None)
            self.failure = None
        if self.socket_path.exists():
            self.socket_path.unlink()
        args = [sys.executable, "-m", "servelet.cli", "container", "--model", self.model_uri, "--socket", str(self.socket_path)]
        self.process = await asyncio.create_subprocess_exec(*args, env=os.environ | self.env, preexec_fn=_die_with_parent)
        log.info("instance %s started (pid %d) for %s", self.name, self.process.pid, self.model_uri)

    async def wait_ready(self, timeout: float) -> None:
        """Poll /ping until 200; raise InstanceFailed if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.returncode is not None:
                self.failure = f"instance {self.name} exited with status {self.process.returncode} while loading"
                raise InstanceFailed(self.failure)
            if self.socket_path.exists() and await self.client.ping():
                self.facts = (await self.client.model_facts()) or {}
                self.ready = self.ever_ready = True
                log.info("instance %s ready: %s", self.name, self.facts.get("name"))
                return
            await asyncio.sleep(0.2)
        self.failure = f"instance {self.name} was not ready after {timeout:.0f} s"
        raise InstanceFailed(self.failure)

    async def watch(self) -> None:
        """Keep `occupancy` fresh for metrics and notice an exit (replacing it is the control plane's job)."""
        while self.process is not None and self.process.returncode is None and not self.stopping:
            status = await self.client.ping_status()
            self.ready = status is not None
            self.occupancy = status or {}
            await asyncio.sleep(HEALTH_POLL_SECONDS)
        self.ready = False
        if self.process is not None and not self.stopping:  # a stop we asked for is no failure
            self.failure = f"instance {self.name} exited with status {self.process.returncode}"
            log.error(self.failure)

    async def stop(self, grace: float = 10.0) -> None:
        self.ready = False
        self.stopping = True
        await self.client.aclose()
        if self.process is None or self.process.returncode is not None:
            return
        self.process.terminate()
        try:
            await asyncio.wait_for(self.process.wait(), grace)
        except asyncio.TimeoutError:
            self.process.kill()
            await self.process.wait()
