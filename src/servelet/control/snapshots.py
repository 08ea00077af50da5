"""Snapshot starts, the gateway's side: a template process per model (instance/template.py), from which instances
are forked instead of started cold.

A template starts lazily: when a serverless variant is deployed, or when a variant is scaled to zero (its next
start is then a snapshot start). Templates are counted in memory and evicted, least recently used first, when they
hold more than SERVELET_SNAPSHOT_MEMORY_MB together or the machine has less than SERVELET_SNAPSHOT_MIN_AVAILABLE_MB
available; a template whose model no variant wants any more is stopped. Whenever no template is ready (evicted,
killed, still starting, or a model that cannot be prepared without threads) an instance starts cold: a snapshot is
an optimisation, never a condition of serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..instance.template import NOT_SNAPSHOTTABLE_EXIT
from .instances import RELAY_CHUNK_BYTES, die_with_parent, resident_mb
from .loop import ControlLoop

if TYPE_CHECKING:
    from ..artifacts import Materialized
    from .instances import Instance

log = logging.getLogger("servelet.snapshots")

PER_INSTANCE_ENV = ("SERVELET_THREADS",)  # what instances of one template differ in; the rest keys the template
STATUS_LOST = 255  # a forked instance's exit status once its template is gone: nobody can read it any more
FORK_REPLY_TIMEOUT_S = 5.0
TEMPLATE_POLL_S = 0.02
EVICT_INTERVAL_S = 2.0
MAX_TEMPLATE_DEATHS = 3
# A fork copies the page tables of the template's private memory (the repacked weights, the KV cells): with 4 KB
# pages it took 17.7 ms for the default model; with glibc's malloc asking for transparent huge pages, 1.3 ms
# (bench/snapshot_parts.py).
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"


def template_key(model_uri: str, env: dict[str, str]) -> str:
    """Instances of one model with the same settings (their threads aside) share a template."""
    shared = sorted((k, v) for k, v in env.items() if k not in PER_INSTANCE_ENV)
    return json.dumps([model_uri, shared])


class ForkedProcess:
    """An instance forked by a template, with the face of asyncio's Process that `Instance` uses.

    Its parent is the template, so the gateway cannot wait for it: the template reports its wait status on the
    connection that asked for it. Signals go through a pidfd, never to a pid that may have been reused."""

    def __init__(self, pid: int, reports: asyncio.StreamReader, connection: asyncio.StreamWriter,
                 stdout: asyncio.StreamReader):
        self.pid = pid
        self.stdout = stdout
        self.returncode: int | None = None
        self._exited = asyncio.Event()
        try:
            self._pidfd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:
            self._pidfd = None  # already gone: its status is on its way
        self._watcher = asyncio.create_task(self._watch(reports, connection))

    async def _watch(self, reports: asyncio.StreamReader, connection: asyncio.StreamWriter) -> None:
        try:
            line = await reports.readline()
        except (OSError, asyncio.LimitOverrunError, ValueError):
            line = b""
        connection.close()
        if line:
            code = os.waitstatus_to_exitcode(json.loads(line)["status"])  # -N for signal N, as asyncio's
        else:  # the template ended first: the instance runs on, and its end shows on its pidfd
            await self._until_pidfd_readable()
            code = STATUS_LOST
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        self.returncode = code
        self._exited.set()

    async def _until_pidfd_readable(self) -> None:
        if self._pidfd is None:
            return
        loop = asyncio.get_running_loop()
        ended = loop.create_future()
        loop.add_reader(self._pidfd, lambda: ended.done() or ended.set_result(None))
        try:
            await ended
        finally:
            loop.remove_reader(self._pidfd)

    async def wait(self) -> int:
        await self._exited.wait()
        return self.returncode

    def send_signal(self, number: int) -> None:
        if self.returncode is None and self._pidfd is not None:
            try:
                signal.pidfd_send_signal(self._pidfd, number)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Template:
    """One template process, and the forks asked of it."""

    def __init__(self, key: str, model_uri: str, env: dict[str, str], model_file: Materialized | None, socket_path: Path):
        self.key = key
        self.model_uri = model_uri
        self.env = env
        self.model_file = model_file
        self.socket_path = socket_path
        self.process: asyncio.subprocess.Process | None = None
        self.ready = False
        self.refused = False  # the model cannot be prepared without threads: its instances always start cold
        self.started = time.monotonic()
        self.last_used = time.monotonic()
        self.forks = 0

    async def start(self, timeout: float) -> bool:
        """Start the process and wait until it takes fork requests (True), exits or runs out of time (False)."""
        self.socket_path.unlink(missing_ok=True)
        shared = self.model_file if self.model_file is not None and self.model_file.fds else None
        model = shared.path if shared else self.model_uri
        env = os.environ | self.env | {"OPENBLAS_NUM_THREADS": "1", "SERVELET_THREADS": "1"}  # one thread until forked
        env["SERVELET_MODEL"] = model  # not on the command line: a URI may carry a token (redaction.py)
        env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), HUGE_PAGES_TUNABLE]))
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "servelet.cli", "template", "--socket", str(self.socket_path),
            env=env, preexec_fn=die_with_parent, pass_fds=shared.fds if shared else (),
        )  # its log goes straight to the gateway's: it serves no request, so nothing of it is kept to explain one
        log.info("snapshot template for %s starting (pid %d)", self.model_uri, self.process.pid)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.returncode is not None:
                self.refused = self.process.returncode == NOT_SNAPSHOTTABLE_EXIT
                log.warning("snapshot template for %s exited (status %d): its instances start cold",
                            self.model_uri, self.process.returncode)
                return False
            if self.socket_path.exists():
                self.ready = True
                self.started = time.monotonic()
                return True
            await asyncio.sleep(TEMPLATE_POLL_S)
        log.warning("snapshot template for %s was not ready after %.0f s: its instances start cold", self.model_uri, timeout)
        await self.stop()
        return False

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def memory_mb(self) -> float:
        """Its resident memory (not its instances'): most of it is shared with them, page for page."""
        return resident_mb(self.process.pid, descendants=False) if self.alive else 0.0

    async def fork(self, instance: Instance) -> ForkedProcess:
        """Ask for one instance; raises OSError (or TimeoutError) when the template does not answer."""
        log_path = instance.socket_path.with_suffix(".log")
        log_path.unlink(missing_ok=True)
        os.mkfifo(log_path, 0o600)
        output = os.open(log_path, os.O_RDONLY | os.O_NONBLOCK)  # open before the template opens its end
        try:
            reports, connection = await asyncio.open_unix_connection(str(self.socket_path))
            request = {
                "name": instance.name, "socket": str(instance.socket_path), "log": str(log_path),
                "env": {k: v for k, v in instance.env.items() if k in PER_INSTANCE_ENV} | {"SERVELET_INSTANCE_NAME": instance.name},
                "gateway_pid": os.getpid(),
            }
            connection.write(json.dumps(request).encode() + b"\n")
            await connection.drain()
            reply = await asyncio.wait_for(reports.readline(), FORK_REPLY_TIMEOUT_S)
            if not reply:
                connection.close()
                raise OSError("the template closed the connection without forking")
            stdout = asyncio.StreamReader(limit=RELAY_CHUNK_BYTES)
            loop = asyncio.get_running_loop()
            await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdout), os.fdopen(output, "rb", 0))
        except BaseException:
            os.close(output)
            raise
        finally:
            log_path.unlink(missing_ok=True)  # both ends are open by now (or never will be)
        self.forks += 1
        self.last_used = time.monotonic()
        return ForkedProcess(json.loads(reply)["pid"], reports, connection, stdout)

    async def stop(self) -> None:
        """End the template; instances forked from it run on."""
        self.ready = False
        if self.alive:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except asyncio.TimeoutError:
                self.process.kill()
                await self.process.wait()
        self.socket_path.unlink(missing_ok=True)


@dataclass(frozen=True)
class TemplateSpec:
    """What a template is made of: a model, and the settings its instances share."""

    model_uri: str
    env: dict[str, str]
    model_file: Materialized | None = None  # the model in the gateway's memory, which the template inherits

    @property
    def key(self) -> str:
        return template_key(self.model_uri, self.env)


class Snapshots(ControlLoop):
    """The fleet's templates, by model and settings: started lazily, forked from, restarted, evicted."""

    doing = "checking snapshot templates"
    interval = EVICT_INTERVAL_S

    def __init__(self, run_dir: Path, memory_budget_mb: float, min_available_mb: float, start_timeout: float):
        self.run_dir = run_dir
        self.memory_budget_mb = memory_budget_mb
        self.min_available_mb = min_available_mb
        self.start_timeout = start_timeout
        self.templates: dict[str, Template] = {}
        self._starting: dict[str, asyncio.Task] = {}
        self._ended: Counter[str] = Counter()  # by key: templates that died; past MAX_TEMPLATE_DEATHS, no more
        self._sizes: dict[str, float] = {}  # by key: the memory its last template held (MB), to know if one fits
        self._serial = 0
        # The templates some variant wants, by key: the fleet's answer, read by each pass.
        self.wanted: Callable[[], dict[str, TemplateSpec]] = dict

    async def prepare(self, spec: TemplateSpec, wait: bool) -> None:
        """Make sure a template for `spec` exists or is starting; `wait`: until it is ready (or failed)."""
        key = spec.key
        template = self.templates.get(key)
        if key not in self._starting and (template is None or not (template.refused or template.alive)):
            if self._ended[key] >= MAX_TEMPLATE_DEATHS:
                return  # it keeps dying: cold starts only
            self._serial += 1
            template = Template(key, spec.model_uri, spec.env, spec.model_file, self.run_dir / f"template-{self._serial}.sock")
            self.templates[key] = template
            task = asyncio.create_task(template.start(self.start_timeout))
            self._starting[key] = task
            task.add_done_callback(lambda _: self._starting.pop(key, None))
        if wait and key in self._starting:
            await asyncio.shield(self._starting[key])

    async def fork(self, instance: Instance) -> ForkedProcess | None:
        """An instance forked from its model's ready template, or None: start it cold."""
        template = self.templates.get(template_key(instance.model_uri, instance.env))
        if template is None or not template.ready:
            return None
        if not template.alive:
            log.warning("snapshot template for %s has ended (%s): instance %s starts cold", template.model_uri,
                        _how_it_ended(template), instance.name)
            return None
        try:
            return await template.fork(instance)
        except (OSError, asyncio.TimeoutError, ValueError) as exc:
            log.warning("snapshot template for %s could not fork instance %s (%s): it starts cold",
                        template.model_uri, instance.name, exc)
            return None

    def memory_mb(self) -> float:
        return sum(t.memory_mb() for t in self.templates.values())

    def ready_keys(self) -> set[str]:
        return {k for k, t in self.templates.items() if t.ready and t.alive}

    async def tick(self) -> None:
        """Stop templates no variant wants, replace those that died, then evict the least recently used ones while
        memory is short."""
        wanted = self.wanted()
        for key, template in list(self.templates.items()):
            if key in self._starting:
                continue
            if key not in wanted:
                await self._remove(template, "no variant uses its model any more")
            elif not template.alive and not template.refused:  # killed, or it failed to start
                self._ended[key] += 1
                log.warning("snapshot template for %s ended (%s); %s", template.model_uri, _how_it_ended(template),
                            "starting another" if self._ended[key] < MAX_TEMPLATE_DEATHS else
                            f"it ended {MAX_TEMPLATE_DEATHS} times: its instances start cold from now on")
                self.templates.pop(key)
        for template in self.templates.values():
            if template.alive and template.ready:
                self._sizes[template.key] = template.memory_mb()
        for key, spec in wanted.items():
            if key not in self.templates and self._memory_short(self._sizes.get(key, 0.0)) is None:
                await self.prepare(spec, wait=False)  # a first one, or one that ended or was evicted and fits now
        await self._evict()

    def _memory_short(self, adding_mb: float = 0.0) -> str | None:
        """Why the templates (with one of `adding_mb` more) do not fit in memory now, or None."""
        held, available = self.memory_mb() + adding_mb, available_mb()
        if held > self.memory_budget_mb:
            return f"templates would hold {held:,.0f} MB, over SERVELET_SNAPSHOT_MEMORY_MB={self.memory_budget_mb:,.0f}"
        if available is not None and available - adding_mb < self.min_available_mb:
            return (f"{available:,.0f} MB of memory is available, under "
                    f"SERVELET_SNAPSHOT_MIN_AVAILABLE_MB={self.min_available_mb:,.0f}")
        return None

    async def _evict(self) -> None:
        while (why := self._memory_short()) is not None:
            live = sorted((t for t in self.templates.values() if t.alive and t.ready), key=lambda t: t.last_used)
            if not live:
                return
            await self._remove(live[0], f"evicted, as {why}; its model's instances start cold until memory allows "
                               "another")

    async def _remove(self, template: Template, why: str) -> None:
        log.info("snapshot template for %s (%.0f MB) stopped: %s", template.model_uri, template.memory_mb(), why)
        self.templates.pop(template.key, None)
        await template.stop()

    async def close(self) -> None:
        await super().close()
        for task in list(self._starting.values()):
            task.cancel()
        await asyncio.gather(*(t.stop() for t in self.templates.values()), return_exceptions=True)
        self.templates.clear()


def _how_it_ended(template: Template) -> str:
    code = template.process.returncode if template.process is not None else None
    return f"killed by signal {-code}" if code is not None and code < 0 else f"exit status {code}"


def available_mb() -> float | None:
    """MemAvailable from /proc/meminfo, in MB (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
