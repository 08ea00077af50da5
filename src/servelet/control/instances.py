"""One instance: a `servelet container` subprocess serving the hosting contract on a Unix socket."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..instance.client import InstanceClient
from .health import HealthCheck

if TYPE_CHECKING:
    from ..artifacts import Materialized
    from .snapshots import Snapshots

log = logging.getLogger("servelet.control")

HEALTH_POLL_SECONDS = 1.0
# Readiness is polled every 5 ms for the first second (a snapshot start is ready in a few tens of milliseconds),
# then less and less often, down to every 0.2 s (a cold start takes seconds).
FAST_READY_POLL_S, FAST_READY_POLLS_FOR_S, SLOWEST_READY_POLL_S = 0.005, 1.0, 0.2
SNAPSHOT, COLD = "snapshot", "cold"  # how an instance started: forked from its model's template, or a new process
LOG_TAIL_LINES = 40  # kept per instance, to say why it failed
MAX_KEPT_LINE_CHARS = 2000
RELAY_CHUNK_BYTES = 64 * 1024


def die_with_parent() -> None:
    """Runs in the child before exec: if the gateway dies (even by SIGKILL), its instances get SIGTERM."""
    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: instances outlive a killed gateway


def signal_name(number: int) -> str:
    """"SIGSEGV" for 11; "signal 99" for a number Python has no name for."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def signal_meaning(number: int) -> str:
    """The C library's words for a signal ("Segmentation fault"), or its name."""
    try:
        return signal.strsignal(number) or signal_name(number)
    except ValueError:
        return signal_name(number)


def resident_mb(pid: int, descendants: bool = True) -> float:
    """Resident memory of a process and its descendants, in MB, from /proc (0 where it cannot be read): what a
    serverless instance is held to (the model's mapped weights count, as they do in Lambda's figure)."""
    page, total, pending = os.sysconf("SC_PAGE_SIZE"), 0, [pid]
    while pending:
        current = pending.pop()
        try:
            total += int(Path(f"/proc/{current}/statm").read_text().split()[1]) * page
            if not descendants:
                break
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(child) for child in (task / "children").read_text().split()]
        except (OSError, ValueError, IndexError):
            continue  # it exited meanwhile, or this is no Linux
    return total / (1024 * 1024)


@dataclass(frozen=True)
class StartRecord:
    """One instance start: its kind (SNAPSHOT or COLD) and its init duration (start asked -> instance ready)."""

    kind: str
    seconds: float
    at: float  # epoch seconds


class InstanceFailed(RuntimeError):
    """The instance process exited or never became ready."""


class Instance:
    """A worker process; the gateway reaches it only through `client` (never by importing the model)."""

    def __init__(
        self, name: str, model_uri: str, socket_path: Path, env: dict[str, str] | None = None,
        model_file: Materialized | None = None, stream_channel: bool = True, memory_limit_mb: float | None = None,
        snapshots: Snapshots | None = None,
    ):
        self.name = name
        self.model_uri = model_uri
        self.model_file = model_file  # the model in the gateway's memory, which the process inherits
        self.socket_path = socket_path
        self.env = env or {}
        self.stream_channel = stream_channel
        self.client = self._new_client()
        self.process: asyncio.subprocess.Process | None = None
        self.ready = False
        self.facts: dict = {}  # GET /model: name, context_length, chat_template, ...
        self.occupancy: dict = {}  # the last /ping: running, waiting, ...
        self.failure: str | None = None  # why it last exited or did not start
        self.given_up: str | None = None  # why the fleet stopped restarting it (the endpoint fails with it)
        self.ever_ready = False
        self.served = False  # this process answered a request successfully: a crash after that is no broken build
        self.stopping = False
        self.memory_limit_mb = memory_limit_mb  # a serverless variant's MemorySizeInMB: over it, the process is stopped
        self.start_timeout: float | None = None  # its variant's ContainerStartupHealthCheckTimeoutInSeconds
        self.over_memory: str | None = None  # why it was stopped for its memory (what its requests are answered)
        self.health = HealthCheck()  # when a ready instance counts as hung or broken (the fleet sets its own)
        self.unresponsive: str | None = None  # why it was stopped for failing its health check
        self.log_tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        self._relay: asyncio.Task | None = None
        self.snapshots = snapshots  # where a snapshot start forks it from (None: always cold)
        self.start_kind = COLD
        self._start_began = 0.0
        self.last_start: StartRecord | None = None

    async def start(self) -> None:
        """Start the process (again, for a replacement: with a fresh client, old connections died with it)."""
        if self.process is not None:
            await self.client.aclose()
            self.client = self._new_client()
            self.failure = None
        self.served = False
        self.over_memory = self.unresponsive = None
        if self.socket_path.exists():
            self.socket_path.unlink()
        self._start_began = time.monotonic()
        forked = await self.snapshots.fork(self) if self.snapshots is not None else None
        if forked is not None:
            self.process, self.start_kind = forked, SNAPSHOT
        else:
            self.process, self.start_kind = await self._spawn(), COLD
        self.log_tail.clear()
        self._relay = asyncio.create_task(self._relay_output(self.process.stdout))
        log.info("instance %s started (%s start, pid %d) for %s", self.name, self.start_kind, self.process.pid,
                 self.model_uri)

    async def _spawn(self) -> asyncio.subprocess.Process:
        """A cold start: a new `servelet container` process, which imports and loads everything itself."""
        shared = self.model_file if self.model_file is not None and self.model_file.fds else None
        model = shared.path if shared else self.model_uri  # /proc/self/fd/N: the inherited file, same number
        args = [sys.executable, "-m", "servelet.cli", "container", "--socket", str(self.socket_path)]
        # The model in the environment, not on the command line: a URI may carry a token (redaction.py).
        env = os.environ | self.env | {"SERVELET_MODEL": model, "SERVELET_INSTANCE_NAME": self.name}
        return await asyncio.create_subprocess_exec(
            *args, env=env, preexec_fn=die_with_parent,
            pass_fds=shared.fds if shared else (), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )

    def _new_client(self) -> InstanceClient:
        return InstanceClient(f"unix:{self.socket_path}", timeout=None, stream_channel=self.stream_channel)

    async def wait_ready(self, timeout: float) -> None:
        """Poll /ping until 200; raise InstanceFailed if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        poll = FAST_READY_POLL_S
        while time.monotonic() < deadline:
            if self.process is not None and self.process.returncode is not None:
                self.failure = f"instance {self.name} {self.exit_description()} while loading its model"
                if self.exit_signal is None and (why := await self._last_error()):
                    self.failure += f": {why}"
                raise InstanceFailed(self.failure)
            if self.socket_path.exists() and await self.client.ping():
                self.facts = (await self.client.model_facts()) or {}
                self.ready = self.ever_ready = True
                self.last_start = StartRecord(self.start_kind, time.monotonic() - self._start_began, time.time())
                log.info("instance %s ready: %s (%s start, init %.3f s)", self.name, self.facts.get("name"),
                         self.start_kind, self.last_start.seconds)
                return
            await asyncio.sleep(poll)
            if time.monotonic() - self._start_began > FAST_READY_POLLS_FOR_S:
                poll = min(poll * 1.5, SLOWEST_READY_POLL_S)
        self.failure = f"instance {self.name} was not ready after {timeout:.0f} s"
        raise InstanceFailed(self.failure)

    async def _relay_output(self, output: asyncio.StreamReader) -> None:
        """Pass the instance's log on to the gateway's stderr, keeping its last lines to explain a failure.

        Read in chunks, not lines: a line longer than the reader's limit must not stop the draining, or the
        instance would block on its next log line."""
        pending = b""
        while chunk := await output.read(RELAY_CHUNK_BYTES):
            try:
                sys.stderr.write(chunk.decode(errors="replace"))
                sys.stderr.flush()
            except (OSError, ValueError):
                pass  # our stderr is gone: keep draining all the same
            *lines, pending = (pending + chunk).split(b"\n")
            pending = pending[-RELAY_CHUNK_BYTES:]
            self.log_tail.extend(line.decode(errors="replace").rstrip()[:MAX_KEPT_LINE_CHARS] for line in lines)

    async def _last_error(self) -> str | None:
        """The instance's last ERROR log line (the reason it gives), else its last line."""
        if self._relay is not None:
            await asyncio.wait({self._relay}, timeout=2.0)  # the rest of its output, now that it has exited
        lines = [line for line in self.log_tail if line.strip()]
        errors = [line for line in lines if " ERROR " in line]
        last = (errors or lines or [None])[-1]
        return last.split(": ", 1)[-1] if last and " ERROR " in last else last

    async def watch(self) -> None:
        """Keep `occupancy` fresh for metrics and notice an exit, or a process that fails its health check so many
        times in a row that it is stopped (replacing it is the fleet's job)."""
        misses = 0
        while self.process is not None and self.process.returncode is None and not self.stopping:
            status, problem = await self.client.health(self.health.timeout)
            self.ready = status is not None
            self.occupancy = status or {}
            misses = 0 if status is not None else misses + 1
            if self.health.given_up(misses) and self.process.returncode is None and not self.stopping:
                await self._stop_unresponsive(problem or "no answer")
                break
            await asyncio.sleep(HEALTH_POLL_SECONDS)
            # Read with the health poll: a few small /proc files a second, at most a second late.
            if (self.memory_limit_mb and not self.stopping and self.process.returncode is None
                    and (used := resident_mb(self.process.pid)) > self.memory_limit_mb):
                await self._stop_over_memory(used)
                break
        self.ready = False
        if self.process is not None and not self.stopping:  # a stop we asked for is no failure
            self.failure = self.over_memory or self.unresponsive or f"instance {self.name} {self.exit_description()}"

    async def _stop_unresponsive(self, problem: str) -> None:
        """Kill the process (SIGKILL: a stopped or stuck one heeds nothing else); the fleet starts a new one."""
        self.ready = False
        self.unresponsive = self.health.reason(self.name, problem)
        log.warning("%s", self.unresponsive)
        self.process.kill()
        await self.process.wait()

    async def _stop_over_memory(self, used: float) -> None:
        """Kill the process: the router answers its requests with `over_memory`, the fleet starts a new one."""
        self.ready = False
        self.over_memory = (
            f"instance {self.name} went over its MemorySizeInMB: it used {used:,.0f} MB of {self.memory_limit_mb:,.0f} MB "
            "and was stopped; the endpoint starts a new instance. Choose a larger MemorySizeInMB, or give the model "
            "a smaller SERVELET_MAX_BATCH_SIZE or SERVELET_MAX_MODEL_LEN"
        )
        log.warning("%s", self.over_memory)
        self.process.kill()
        await self.process.wait()

    @property
    def exit_signal(self) -> str | None:
        """The signal that ended the process ("SIGSEGV"), or None while it runs or when it exited by itself."""
        code = self.process.returncode if self.process is not None else None
        return signal_name(-code) if code is not None and code < 0 else None  # asyncio: -N means killed by signal N

    def exit_description(self) -> str:
        code = self.process.returncode if self.process is not None else None
        if self.exit_signal is not None:
            return f"was killed by {self.exit_signal} ({signal_meaning(-code)})"
        return f"exited with exit status {code}"

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
