"""Async inference, the queue itself: invocations accepted per second, the 202's latency, and jobs through the queue.

Why: an async endpoint is only as good as its queue: every `InvokeEndpointAsync` is a row written to the store before
the 202 goes out, so the store (SQLite by default, PostgreSQL by SERVELET_DATABASE_URL) sets how many jobs a gateway
takes in and how long a client waits for its 202 (issue 15: >= 1,000 jobs/s through the queue, enqueue p99 <= 10 ms).

Per store: one `servelet serve --instances 0` (its own run and data folders) with one async endpoint of a trivial
handler model (`transform_fn` echoes the body: the model costs nothing, the queue is what is measured), outputs to a
`file://` folder. N invocations with small inline bodies are POSTed to `/endpoints/NAME/async-invocations` (what
botocore's `invoke_endpoint_async` sends) for D seconds by K connections of `wrk` (a C load generator: a Python
client at these rates takes a core of the two from the gateway; without wrk installed, httpx.AsyncClient does it,
and says so). Measured:
- accepted/s: the 202s / D; the 202 round trip's p50 and p99 (wrk's, with K requests always in flight: mostly time
  queued behind the others);
- through the queue: the jobs accepted / the time from the first request to the last output file (end to end);
- at a steady rate: R jobs/s offered for D seconds by S connections (each waits S/R s between its requests, wrk's
  `delay()`), while the gateway runs them: the 202's p50 and p99, and how far the outputs lag behind at the end (a
  queue that keeps up has written them all within a second). A p99 is a latency at a load: at saturation it is
  the time queued behind everyone else, so the latency target is judged here;
- the enqueue: the gateway's own `servelet_async_enqueue_seconds` histogram (the time the route waits for its job
  to be stored, what the 202 means), read from /metrics, for the saturating run and for the steady one: the share
  within 10 ms and the p99's bucket;
- where the time goes: the same POST to an endpoint that does not exist (answered 400 before the store is touched:
  the HTTP stack's own ceiling on this machine), and `JobQueue.enqueue` called in this process on a fresh
  database of the same kind (the store's own ceiling, no HTTP).
PostgreSQL is a private server started here (as tests/postgres.py starts one, but with fsync on: the queue is
durable), or skipped with the reason printed when none is installed.

    python bench/async_queue.py [--seconds 10] [--clients 32] [--steady-rate 500] [--steady-clients 8]
                                [--stores sqlite,postgres] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import statistics
import sys
import tempfile
import textwrap
import time
import uuid
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import httpx
from botocore.exceptions import WaiterError

import engine as engine_bench  # bench/engine.py: free ports, server processes, markdown tables
from cold_start import Gateway
from machine import describe as describe_machine
from machine import machine
from servelet.control.async_queue import Job, JobQueue, JobStatus
from servelet.control.store import Store

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import postgres as test_postgres  # noqa: E402  tests/postgres.py: finds the installed server, runs a private one

ENDPOINT = "echo"
PER_INSTANCE = 32  # MaxConcurrentInvocationsPerInstance
STORES = ("sqlite", "postgres")
ACCEPTED_TARGET = 1_000.0  # issue 15: jobs/s through the queue on the default SQLite store...
ENQUEUE_P99_TARGET_MS = 10.0  # ...and the enqueue's p99
BODY = b'{"inputs": "hello"}'
WRK = shutil.which("wrk")
WRK_SCRIPT = f"""wrk.method = "POST"
wrk.body = '{BODY.decode()}'
wrk.headers["X-Amzn-SageMaker-Content-Type"] = "application/json"
"""
IN_SERVICE_WAIT = {"Delay": 1, "MaxAttempts": 120}
DRAIN_SECONDS = 300.0  # bound on waiting for every output
ENQUEUE_ALONE = 5_000  # JobQueue.enqueue calls in process
ECHO = '''
def model_fn(model_dir):
    return None

def transform_fn(model, body, content_type, accept):
    return body, content_type
'''


# -- the handler model, the gateway and its async endpoint (bench/async_crash.py uses these too) -------------------


def handler_model(folder: Path, script: str) -> Path:
    """A SageMaker model folder whose `code/inference.py` is `script`: a handler model, no weights."""
    code = folder / "code"
    code.mkdir(parents=True)
    (code / "inference.py").write_text(textwrap.dedent(script))
    return folder


def serve_command(port: int) -> list[str]:
    return [str(Path(sys.executable).with_name("servelet")), "serve", "--port", str(port), "--instances", "0"]


def gateway_env(folder: Path, database_url: str | None, **settings: str) -> dict[str, str]:
    """The gateway's environment: the run folder `folder`, the data folder in it, the store at `database_url`
    (None: SQLite in the data folder), and any other SERVELET_ settings."""
    env = os.environ | {"SERVELET_RUN_DIR": str(folder), "SERVELET_DATA_DIR": str(folder / "data")}
    env.pop("SERVELET_DATABASE_URL", None)
    if database_url:
        env["SERVELET_DATABASE_URL"] = database_url
    return env | {f"SERVELET_{name.upper()}": value for name, value in settings.items()}


@contextmanager
def gateway(folder: Path, database_url: str | None) -> Iterator[Gateway]:
    """`servelet serve --instances 0` on the store at `database_url`, its log in `folder`/gateway.log."""
    folder.mkdir(parents=True)
    port = engine_bench.free_port()
    log_path = folder / "gateway.log"
    env = gateway_env(folder, database_url)
    with log_path.open("w+b") as log, engine_bench.running(serve_command(port), env=env, stdout=log,
                                                           stderr=log) as process:
        engine_bench.wait_until_healthy(process, f"http://127.0.0.1:{port}/health", log)
        yield Gateway(f"http://127.0.0.1:{port}", log_path)


def create_async_endpoint(gw: Gateway, name: str, model: Path, outputs: Path, per_instance: int) -> None:
    """An async endpoint of the handler model, one instance, its outputs in `outputs`; waited for InService."""
    sagemaker = gw.client("sagemaker")
    sagemaker.create_model(ModelName=name, PrimaryContainer={"ModelDataUrl": str(model)},
                           ExecutionRoleArn="arn:aws:iam::1:role/x")
    sagemaker.create_endpoint_config(
        EndpointConfigName=name,
        ProductionVariants=[{"VariantName": "AllTraffic", "ModelName": name, "InitialInstanceCount": 1}],
        AsyncInferenceConfig={"OutputConfig": {"S3OutputPath": f"file://{outputs}"},
                              "ClientConfig": {"MaxConcurrentInvocationsPerInstance": per_instance}},
    )
    sagemaker.create_endpoint(EndpointName=name, EndpointConfigName=name)
    try:
        sagemaker.get_waiter("endpoint_in_service").wait(EndpointName=name, WaiterConfig=IN_SERVICE_WAIT)
    except WaiterError:
        reason = sagemaker.describe_endpoint(EndpointName=name).get("FailureReason", "no reason given")
        raise RuntimeError(f"endpoint {name} did not come into service: {reason} (log: {gw.log_path})") from None


def async_headers(inference_id: str) -> dict[str, str]:
    """The headers botocore's invoke_endpoint_async sends with an inline body and an InferenceId."""
    return {"X-Amzn-SageMaker-Content-Type": "application/json", "X-Amzn-SageMaker-Inference-Id": inference_id}


def outputs_written(folder: Path) -> int:
    """Output files in the folder (the atomic writes' hidden `.partial` files are not outputs)."""
    try:
        return sum(1 for entry in os.scandir(folder) if entry.name.endswith(".out") and not entry.name.startswith("."))
    except FileNotFoundError:
        return 0


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[98] if len(values) > 1 else values[0]


# -- PostgreSQL ------------------------------------------------------------------------------------------------


class DurableCluster(test_postgres.PostgresCluster):
    """tests/postgres.py's private server, but with fsync on: a benchmark of a durable queue must pay for it."""

    def start(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--locale=C", "-E", "UTF8")
        options = f"-k {self.base} -p {self.port} -c listen_addresses='' -c max_connections=200"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start")


def postgres_problem() -> str | None:
    """Why no PostgreSQL server can be started here, or None."""
    if test_postgres._postgres_bin() is None:
        return test_postgres.INSTALL_HINT
    if os.geteuid() == 0 and (shutil.which("runuser") is None or not test_postgres._has_user("postgres")):
        return f"{test_postgres.INSTALL_HINT}: running as root needs the `postgres` user and `runuser`"
    return None


@contextmanager
def postgres_cluster() -> Iterator[DurableCluster]:
    cluster = DurableCluster(test_postgres._postgres_bin())
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


# -- the load --------------------------------------------------------------------------------------------------


@dataclass
class Load:
    requests: int
    clients: int
    wall_s: float
    per_s: float
    p50_ms: float
    p99_ms: float
    statuses: dict[str, int]


def load(url: str, seconds: float, clients: int, expect: int, delay_ms: float | None = None) -> Load:
    """POSTs of BODY to `url` for `seconds` by `clients` connections kept busy (each waiting `delay_ms` between its
    requests, when given): by wrk where installed."""
    if WRK is None:
        return load_by_httpx(url, int(seconds * 300), clients, expect, delay_ms)
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write(WRK_SCRIPT + (f"function delay() return {delay_ms:.3f} end\n" if delay_ms else ""))
        script.flush()
        report = subprocess.run([WRK, "-t1", f"-c{clients}", f"-d{seconds:g}s", "--latency", "-s", script.name, url],
                                capture_output=True, text=True, check=True).stdout
    return parse_wrk(report, clients, expect)


def parse_wrk(report: str, clients: int, expect: int) -> Load:
    """wrk's summary: requests, wall time, latency percentiles, and how many answers were not 2xx."""
    count, wall = re.search(r"(\d+) requests in (\S+),", report).groups()
    requests, wall_s = int(count), _ms(wall) / 1000
    latency = {q: _ms(value) for q, value in re.findall(r"^\s+(50|99)%\s+(\S+)$", report, re.MULTILINE)}
    refused = int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", report)) else 0
    statuses = {"2xx": requests - refused} | ({"not 2xx": refused} if refused else {})
    if (expect < 300) != (refused == 0) or (expect >= 300 and refused != requests):
        print(f"  wrk: {statuses} (expected only {expect})\n{report}", flush=True)
    return Load(requests, clients, wall_s, requests / wall_s, latency["50"], latency["99"], statuses)


def _ms(value: str) -> float:
    """wrk's durations: 850.00us, 12.5ms, 1.02s, 1.00m."""
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value).groups()
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}[unit]


async def post_all(url: str, count: int, clients: int, body: bytes, expect: int,
                   delay_ms: float | None = None) -> tuple[float, list[float], dict]:
    """`count` POSTs of `body` to `url` by `clients` concurrent clients: the wall time, each request's seconds, and
    the answers' status codes counted (any status but `expect` is named in the table)."""
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    left = iter(range(count))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(http: httpx.AsyncClient) -> None:
        for _ in left:
            began = time.perf_counter()
            answer = await http.post(url, content=body, headers=async_headers(str(uuid.uuid4())))
            latencies.append(time.perf_counter() - began)
            statuses[str(answer.status_code)] = statuses.get(str(answer.status_code), 0) + 1
            if delay_ms:
                await asyncio.sleep(delay_ms / 1000)

    async with httpx.AsyncClient(limits=limits, timeout=60) as http:
        began = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - began
    if set(statuses) != {str(expect)}:
        print(f"  answers to {url}: {statuses} (expected only {expect})", flush=True)
    return wall, latencies, statuses


def load_by_httpx(url: str, count: int, clients: int, expect: int, delay_ms: float | None = None) -> Load:
    wall, latencies, statuses = asyncio.run(post_all(url, count, clients, BODY, expect, delay_ms))
    ms = [s * 1000 for s in latencies]
    return Load(count, clients, wall, count / wall, statistics.median(ms), p99(ms), statuses)


@dataclass
class Enqueues:
    """The gateway's servelet_async_enqueue_seconds histogram, over a run."""

    count: int
    within_10_ms: float  # share
    p99_bucket_ms: float | None  # the upper bound of the bucket that holds the p99 (None: past the last bucket)


def enqueue_histogram(base_url: str) -> dict[float, float]:
    """Cumulative counts by bucket bound (seconds) of the endpoint's enqueue histogram."""
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    found = {}
    for bound, value in re.findall(r'servelet_async_enqueue_seconds_bucket\{endpoint="' + ENDPOINT + r'",le="([^"]+)"\} (\S+)', text):
        found[float(bound)] = float(value)
    return found


def enqueues_between(before: dict[float, float], after: dict[float, float]) -> Enqueues:
    counts = {bound: after[bound] - before.get(bound, 0.0) for bound in sorted(after)}
    total = counts.get(float("inf"), 0.0)
    if not total:
        return Enqueues(0, 0.0, None)
    p99_bound = next((bound for bound, n in counts.items() if n >= 0.99 * total), float("inf"))
    return Enqueues(int(total), counts.get(0.01, 0.0) / total, None if p99_bound == float("inf") else p99_bound * 1000)


def drain_seconds(outputs: Path, count: int, began: float) -> float | None:
    """Seconds from `began` (perf_counter) until `count` outputs exist; None when they do not within the bound."""
    deadline = time.monotonic() + DRAIN_SECONDS
    while outputs_written(outputs) < count:
        if time.monotonic() > deadline:
            return None
        time.sleep(0.02)
    return time.perf_counter() - began


def enqueue_in_process(url: str, count: int) -> Load:
    """`JobQueue.enqueue` called `count` times here, one after another, on a fresh database: the store's ceiling."""
    store = Store(url)
    queue, latencies = JobQueue(store), []
    began = time.perf_counter()
    for _ in range(count):
        job = Job(inference_id=str(uuid.uuid4()), endpoint=ENDPOINT, status=JobStatus.PENDING.value,
                  created=time.time(), expires=time.time() + 3600, invocation_timeout=900,
                  inline_body=b'{"inputs": "hello"}', content_type="application/json", output_location="file:///tmp/unused.out")
        start = time.perf_counter()
        queue.enqueue(job)
        latencies.append((time.perf_counter() - start) * 1000)
    wall = time.perf_counter() - began
    store.close()
    return Load(count, 1, wall, count / wall, statistics.median(latencies), p99(latencies), {})


# -- one store ---------------------------------------------------------------------------------------------------


@dataclass
class StoreRun:
    store: str
    accepted: Load  # K connections kept busy for D seconds
    enqueues: Enqueues  # the gateway's own enqueue times, during `accepted`
    completed_per_s: float | None  # accepted / first request -> last output; None: not all within DRAIN_SECONDS
    steady: Load  # R jobs/s offered by S connections
    steady_enqueues: Enqueues  # the gateway's own enqueue times, during `steady`
    steady_lag_s: float | None  # from the end of the steady load to its last output; None: not within DRAIN_SECONDS
    http_ceiling: Load  # the same POST to an endpoint that does not exist: 400 before the store is touched
    store_ceiling: Load  # JobQueue.enqueue in this process, no HTTP


def run_store(kind: str, folder: Path, urls: tuple[str | None, str], seconds: float, clients: int,
              steady_rate: float, steady_clients: int) -> StoreRun:
    """The whole measurement on one store: `urls` = (the gateway's database URL, a fresh one for the in-process run)."""
    model = handler_model(folder / "model", ECHO)
    outputs = folder / "out"
    with gateway(folder / "gateway", urls[0]) as gw:
        create_async_endpoint(gw, ENDPOINT, model, outputs, PER_INSTANCE)
        invoke = f"{gw.base_url}/endpoints/{ENDPOINT}/async-invocations"
        warm = load(invoke, 1, clients, 202).requests
        if drain_seconds(outputs, warm, time.perf_counter()) is None:
            raise RuntimeError(f"{kind}: the warm-up's {warm} jobs did not complete within {DRAIN_SECONDS:g} s")
        ceiling = load(f"{gw.base_url}/endpoints/no-such-endpoint/async-invocations", seconds, clients, 400)
        histogram = enqueue_histogram(gw.base_url)
        began = time.perf_counter()
        accepted = load(invoke, seconds, clients, 202)
        through = drain_seconds(outputs, warm + accepted.requests, began)
        before_steady = enqueue_histogram(gw.base_url)
        enqueues = enqueues_between(histogram, before_steady)
        steady = load(invoke, seconds, steady_clients, 202, delay_ms=1000 * steady_clients / steady_rate)
        steady_lag = drain_seconds(outputs, warm + accepted.requests + steady.requests, time.perf_counter())
        steady_enqueues = enqueues_between(before_steady, enqueue_histogram(gw.base_url))
    store_ceiling = enqueue_in_process(urls[1], ENQUEUE_ALONE)
    result = StoreRun(kind, accepted, enqueues, accepted.requests / through if through else None, steady,
                      steady_enqueues, steady_lag, ceiling, store_ceiling)
    print(f"  {kind}: accepted {accepted.per_s:.0f}/s (202 p50 {accepted.p50_ms:.1f} ms, p99 {accepted.p99_ms:.1f} ms), "
          f"through the queue {'-' if through is None else f'{result.completed_per_s:.0f}/s'}; at {steady.per_s:.0f}/s "
          f"steady: 202 p99 {steady.p99_ms:.1f} ms, enqueue within 10 ms {steady_enqueues.within_10_ms:.1%}, outputs "
          f"{'-' if steady_lag is None else f'{steady_lag:.2f} s'} behind; HTTP ceiling {ceiling.per_s:.0f}/s, "
          f"store alone {store_ceiling.per_s:.0f}/s", flush=True)
    return result


def sqlite_urls(folder: Path) -> tuple[None, str]:
    return None, Store.default_url(folder / "in-process")


@contextmanager
def store_urls(kind: str, folder: Path, stack: ExitStack) -> Iterator[tuple[str | None, str] | None]:
    """The two database URLs of a store kind (gateway, in-process run); None (reason printed) when it cannot run."""
    if kind == "sqlite":
        yield sqlite_urls(folder)
        return
    problem = postgres_problem()
    if problem:
        print(f"  postgres: skipped: {problem}", flush=True)
        yield None
        return
    cluster = stack.enter_context(postgres_cluster())
    yield test_postgres.new_database(cluster)[1], test_postgres.new_database(cluster)[1]


# -- the report ----------------------------------------------------------------------------------------------------


def met(ok: bool | None) -> str:
    return "not measured" if ok is None else "met" if ok else "NOT met"


def results_table(runs: list[StoreRun]) -> str:
    rows = []
    for r in runs:
        a, e, steady, se = r.accepted, r.enqueues, r.steady, r.steady_enqueues
        through = "-" if r.completed_per_s is None else f"{r.completed_per_s:.0f}"
        lag = "-" if r.steady_lag_s is None else f"{r.steady_lag_s:.2f}"
        rows.append([r.store, str(a.requests), str(a.clients), f"{a.per_s:.0f}", f"{a.p50_ms:.1f}", f"{a.p99_ms:.1f}",
                     f"{e.within_10_ms:.1%}", _bucket(e), through,
                     f"{steady.per_s:.0f} ({steady.clients})", f"{steady.p50_ms:.1f}", f"{steady.p99_ms:.1f}",
                     f"{se.within_10_ms:.1%}", _bucket(se), lag,
                     f"{r.http_ceiling.per_s:.0f}", f"{r.store_ceiling.per_s:.0f}", f"{r.store_ceiling.p99_ms:.2f}"])
    header = ["store", "jobs", "connections", "accepted/s", "202 p50 (ms)", "202 p99 (ms)", "enqueues within 10 ms",
              "enqueue p99 (ms, bucket)", "completed/s end to end", "steady jobs/s (connections)", "steady 202 p50 (ms)",
              "steady 202 p99 (ms)", "steady enqueues within 10 ms", "steady enqueue p99 (ms, bucket)",
              "steady outputs behind at the end (s)", "HTTP ceiling req/s (400, no store)", "enqueue alone/s (no HTTP)",
              "enqueue alone p99 (ms)"]
    return engine_bench.markdown(header, rows)


def _bucket(enqueues: Enqueues) -> str:
    return "> 1 s" if enqueues.p99_bucket_ms is None else f"<= {enqueues.p99_bucket_ms:g}"


def targets(run: StoreRun) -> dict[str, bool | None]:
    through, steady_p99 = run.completed_per_s, run.steady_enqueues.p99_bucket_ms
    at = f"at {run.steady.per_s:.0f} jobs/s steady"
    return {f"accepted >= {ACCEPTED_TARGET:,.0f}/s": run.accepted.per_s >= ACCEPTED_TARGET,
            f"through the queue >= {ACCEPTED_TARGET:,.0f} jobs/s": through and through >= ACCEPTED_TARGET,
            f"enqueue p99 <= {ENQUEUE_P99_TARGET_MS:g} ms {at} (the gateway's histogram)":
                steady_p99 is not None and steady_p99 <= ENQUEUE_P99_TARGET_MS,
            f"202 round trip p99 <= {ENQUEUE_P99_TARGET_MS:g} ms {at}": run.steady.p99_ms <= ENQUEUE_P99_TARGET_MS}


def verdict(runs: list[StoreRun]) -> str:
    return "\n".join(f"{r.store}: target {target}: {met(ok)}" for r in runs for target, ok in targets(r).items())


# -- the run ---------------------------------------------------------------------------------------------------------


def write_json(path: Path, report: dict) -> None:
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {path}")


def parse_options(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds of load per store (D)")
    parser.add_argument("--clients", type=int, default=32, help="connections kept busy (K)")
    parser.add_argument("--steady-rate", type=float, default=500.0, help="jobs/s offered in the steady run (R)")
    parser.add_argument("--steady-clients", type=int, default=8, help="connections of the steady run (S)")
    parser.add_argument("--stores", type=store_list, default=list(STORES), help=", ".join(STORES))
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    return parser.parse_args(argv)


def store_list(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names or set(names) - set(STORES) or len(set(names)) < len(names):
        raise argparse.ArgumentTypeError(f"choose from {', '.join(STORES)}, each once")
    return names


def main(argv: list[str] | None = None) -> None:
    options = parse_options(argv)
    signal.signal(signal.SIGTERM, engine_bench.exit_on_sigterm)
    client = (f"wrk {subprocess.run([WRK, '-v'], capture_output=True, text=True).stdout.split()[1]}" if WRK else
              "httpx.AsyncClient (wrk is not installed: apt-get install wrk)")
    setup = {"seconds": options.seconds, "clients": options.clients, "steady_rate": options.steady_rate,
             "steady_clients": options.steady_clients,
             "per_instance": PER_INSTANCE, "machine": machine(), "client": client + ", raw POSTs as botocore's "
             "invoke_endpoint_async, server-made InferenceIds", "model": "handler model, transform_fn echoes the body"}
    print(describe_machine(setup["machine"]))
    print(f"\n{options.seconds:g} s of async invocations per store by {options.clients} connections, then "
          f"{options.seconds:g} s at {options.steady_rate:g}/s by {options.steady_clients} ({setup['client']}); "
          f"{setup['model']}; "
          f"MaxConcurrentInvocationsPerInstance {PER_INSTANCE}", flush=True)
    runs = []
    with tempfile.TemporaryDirectory(prefix="servelet-async-queue-") as folder, ExitStack() as stack:
        for kind in options.stores:
            with store_urls(kind, Path(folder) / kind, stack) as urls:
                if urls is not None:
                    runs.append(run_store(kind, Path(folder) / kind, urls, options.seconds, options.clients,
                                          options.steady_rate, options.steady_clients))
    print("\n" + results_table(runs) + "\n\n" + verdict(runs))
    if options.json:
        write_json(options.json, {"setup": setup, "runs": [asdict(r) | {"targets": targets(r)} for r in runs]})


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted; the servers started here were stopped")
