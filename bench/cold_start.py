"""Serverless endpoints: time from zero instances to the first streamed token, and a memory sweep like a Lambda table.

Why: users choose serverless so that idle costs nothing, and then pay a cold start on the next request; they compare
memory sizes by prompt tokens/s, generated tokens/s and GB-seconds billed (issue 14).

1. Start to first token, cold vs snapshot: one `servelet serve` per start kind, side by side, each with no
   `default` endpoint, a short idle timeout and one serverless endpoint of the default model at the same
   MemorySizeInMB (so their instances get the same SERVELET_THREADS). The `cold` gateway runs with
   SERVELET_SNAPSHOTS=false, the `snapshot` one with snapshots on (instances forked from the model's template,
   which its endpoint's creation prepared). Kinds take turns run by run, the order alternating, so that the
   machine's drift hits both alike. Each run waits (bounded) until no gateway holds an instance, so the one
   measured has the cores to itself, then streams one request with boto3's `invoke_endpoint_with_response_stream`
   (SageMaker's runtime API through the gateway) and times it to its first token. The gateway's log gives the
   kind the instance really started as (a snapshot gateway falls back cold when its template is not ready: such
   a run is reported and left out of its kind's figures) and splits the start: request in -> instance process
   started -> model loaded (the instance's own line) -> the gateway sees it ready -> first token. Medians, p90,
   min/max per kind, the ratio cold/snapshot and the issue's targets (snapshot <= 0.25 s, >= 8x faster) follow.
2. Memory sweep: one serverless endpoint per MemorySizeInMB (sizes the create-time check refuses are skipped and
   named), one warm-up request, then one fixed request (fixed prompt, 128 new tokens, greedy, EOS ignored, LMI
   `details`): the threads its instance got, its two token rates, and the GB-seconds the cost meter billed for it
   (`servelet_billed_gb_seconds_total` in /metrics before and after). It runs on the snapshot gateway (the
   default settings) when there is one.

    python bench/cold_start.py [--runs 10] [--kinds cold,snapshot] [--memory 2048,3072,4096,5120,6144] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Iterator

import boto3
import httpx
from botocore.config import Config
from botocore.exceptions import ClientError

import engine as engine_bench  # bench/engine.py: free ports, server processes, token clocks, markdown tables
from machine import describe as describe_machine
from machine import machine
from servelet.settings import DEFAULT_MODEL_URI
from servelet.sizing import serverless_threads

IDLE_SECONDS = 2
ZERO_WAIT_S = 60.0  # bound on waiting for a variant to scale to zero
IN_SERVICE_WAIT = {"Delay": 1, "MaxAttempts": 120}
START_MEMORY_MB = 2048  # both kinds: the same MemorySizeInMB, so the same SERVELET_THREADS
SWEEP_MEMORY_MB = [2048, 3072, 4096, 5120, 6144]
NEW_TOKENS = 128
COLD_PROMPT = "The capital of France is"
SWEEP_PROMPT = engine_bench.PROMPTS[0]
KINDS = ("cold", "snapshot")
SNAPSHOTS_SETTING = {"cold": "false", "snapshot": "true"}  # each kind's gateway: its SERVELET_SNAPSHOTS
SNAPSHOT_TARGET_S = 0.25  # issue 14: a snapshot start to the first token in at most this...
SPEEDUP_TARGET = 8.0  # ...and at least this many times faster than a cold one (medians)


# -- the gateway and its clients ---------------------------------------------------------------------------------


@dataclass
class Gateway:
    base_url: str
    log_path: Path

    def client(self, service: str, **config):
        """A boto3 client on the gateway (any credentials), retries off so that what the gateway says is seen."""
        options = Config(retries={"total_max_attempts": 1}, read_timeout=300, **config)
        return boto3.client(service, endpoint_url=self.base_url, region_name="us-east-1", aws_access_key_id="x",
                            aws_secret_access_key="x", config=options)

    def variant(self, endpoint: str) -> dict:
        health = httpx.get(f"{self.base_url}/health", timeout=10).json()
        return health["endpoints"][endpoint]["variants"]["AllTraffic"]

    def instances(self) -> int:
        """Instances of every endpoint: a start or a sweep point waits for zero so that it has the cores to itself."""
        endpoints = httpx.get(f"{self.base_url}/health", timeout=10).json()["endpoints"].values()
        return sum(v["instances"] for e in endpoints for v in e["variants"].values())

    def billed_gb_seconds(self, endpoint: str) -> float:
        metrics = httpx.get(f"{self.base_url}/metrics", timeout=10).text
        pattern = rf'^servelet_billed_gb_seconds_total\{{[^}}]*endpoint="{re.escape(endpoint)}"[^}}]*\}} (\S+)$'
        return sum(float(m.group(1)) for m in re.finditer(pattern, metrics, re.MULTILINE))

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def log_since(self, offset: int) -> str:
        with self.log_path.open("rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")


@contextmanager
def gateway(folder: Path, snapshots: str) -> Iterator[Gateway]:
    """`servelet serve` with no `default` endpoint (the serverless ones get the cores), its own run and data
    folders, a short idle timeout and SERVELET_SNAPSHOTS=`snapshots`; its log goes to a file the start kind and
    split are read from."""
    folder.mkdir()
    port = engine_bench.free_port()
    log_path = folder / "gateway.log"
    command = [str(Path(sys.executable).with_name("servelet")), "serve", "--port", str(port), "--instances", "0"]
    env = os.environ | {"SERVELET_RUN_DIR": str(folder), "SERVELET_DATA_DIR": str(folder / "data"),
                        "SERVELET_SERVERLESS_IDLE_SECONDS": str(IDLE_SECONDS), "SERVELET_SNAPSHOTS": snapshots}
    with log_path.open("w+b") as log, engine_bench.running(command, env=env, stdout=log, stderr=log) as process:
        engine_bench.wait_until_healthy(process, f"http://127.0.0.1:{port}/health", log)
        yield Gateway(f"http://127.0.0.1:{port}", log_path)


@contextmanager
def gateways(folder: Path, kinds: list[str]) -> Iterator[dict[str, Gateway]]:
    """A gateway per start kind, side by side for the whole benchmark, so that runs of the kinds can alternate."""
    with ExitStack() as stack:
        yield {kind: stack.enter_context(gateway(folder / kind, SNAPSHOTS_SETTING[kind])) for kind in kinds}


def wait_for_no_instance(gws: list[Gateway]) -> None:
    """Every gateway at zero instances: the start or sweep point measured next has the cores to itself."""
    wait_until(lambda: sum(gw.instances() for gw in gws) == 0, ZERO_WAIT_S, "every variant at zero instances")


def create_serverless(gw: Gateway, name: str, memory_mb: int) -> str | None:
    """A serverless endpoint of the default model, InService; None (with the reason printed) if it is refused."""
    sagemaker = gw.client("sagemaker")
    sagemaker.create_model(ModelName=name, PrimaryContainer={"ModelDataUrl": DEFAULT_MODEL_URI})
    try:
        sagemaker.create_endpoint_config(EndpointConfigName=name, ProductionVariants=[{
            "VariantName": "AllTraffic", "ModelName": name,
            "ServerlessConfig": {"MemorySizeInMB": memory_mb, "MaxConcurrency": 5},
        }])
    except ClientError as refused:
        print(f"  MemorySizeInMB {memory_mb} refused at create: {refused.response['Error']['Message']}", flush=True)
        return None
    sagemaker.create_endpoint(EndpointName=name, EndpointConfigName=name)
    sagemaker.get_waiter("endpoint_in_service").wait(EndpointName=name, WaiterConfig=IN_SERVICE_WAIT)
    return name


def wait_until(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not reached within {seconds:g} s")
        time.sleep(0.1)


# -- 1. from zero instances to the first streamed token ----------------------------------------------------------


@dataclass
class Start:
    kind: str  # the kind asked for: the gateway it ran on
    first_token_s: float
    started_as: str | None  # the kind the gateway's log says the instance started as (None: no start line)
    # From the gateway's log, seconds after the request was sent (None where a line is missing).
    split: dict[str, float | None] = field(default_factory=dict)

    @property
    def as_asked(self) -> bool:
        return self.started_as == self.kind


START_KIND = re.compile(r"instance \S+ started \((\w+) start, pid")
LOG_STEPS = {
    "start requested": re.compile(r"has no instance: starting one for a request"),
    "process started": START_KIND,
    "model loaded": re.compile(r"loaded by the \S+ runtime; instance ready"),  # the instance's own line
    "instance ready": re.compile(r"instance \S+ ready:"),
}
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def log_split(text: str, sent_at: float) -> dict[str, float | None]:
    """Seconds from sending the request to each step's first log line (the log's clock is the local wall clock)."""
    split: dict[str, float | None] = dict.fromkeys(LOG_STEPS)
    for line in text.splitlines():
        stamp = LOG_TIME.match(line)
        for step, pattern in LOG_STEPS.items():
            if stamp and split[step] is None and pattern.search(line):
                at = datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                split[step] = round(at - sent_at, 3)
    return split


def stream_to_first_token(gw: Gateway, endpoint: str) -> tuple[float, float]:
    """Stream one request with boto3; the wall-clock time it was sent and the seconds to its first token."""
    runtime = gw.client("sagemaker-runtime")
    body = json.dumps({"inputs": COLD_PROMPT, "parameters": {"max_new_tokens": 8}, "stream": True})
    sent_at, clock = time.time(), engine_bench.TokenClock()
    answer = runtime.invoke_endpoint_with_response_stream(EndpointName=endpoint, Body=body,
                                                          ContentType="application/json")
    pending = b""
    for event in answer["Body"]:
        pending += event.get("PayloadPart", {}).get("Bytes", b"")
        *lines, pending = pending.split(b"\n")
        for line in lines:
            clock.count(engine_bench.servelet_tokens_after(line.decode().strip(), clock.tokens))
    timing = clock.timing(f"{endpoint} stream")
    return sent_at, timing.first_token - timing.submitted


def start_from_zero(kind: str, gws: dict[str, Gateway], endpoint: str) -> Start:
    """One start of `kind` on its gateway, once no gateway holds an instance; its kind and split from the log."""
    wait_for_no_instance(list(gws.values()))
    gw = gws[kind]
    offset = gw.log_size()
    sent_at, first_token_s = stream_to_first_token(gw, endpoint)
    log_text = gw.log_since(offset)
    started = START_KIND.search(log_text)
    return Start(kind, first_token_s, started and started.group(1), log_split(log_text, sent_at))


def start_endpoint(gw: Gateway, kind: str) -> str:
    """The serverless endpoint a kind's starts go to; creating it prepares a snapshot gateway's template."""
    endpoint = create_serverless(gw, f"start-{kind}", START_MEMORY_MB)
    if endpoint is None:
        raise RuntimeError(f"the {kind} gateway refused a serverless endpoint of {START_MEMORY_MB} MB")
    return endpoint


def turn_order(kinds: list[str], run: int) -> list[str]:
    """The kinds in the order run `run` takes them: alternating, so that neither always goes first."""
    return kinds if run % 2 else kinds[::-1]


def starts(gws: dict[str, Gateway], runs: int, kinds: list[str]) -> list[Start]:
    """`runs` starts of each kind, interleaved (run 1 of every kind, then run 2...), one gateway per kind."""
    endpoints = {kind: start_endpoint(gws[kind], kind) for kind in kinds}
    results = []
    for run in range(1, runs + 1):
        for kind in turn_order(kinds, run):
            start = start_from_zero(kind, gws, endpoints[kind])
            results.append(start)
            print_start(run, start)
    return results


def print_start(run: int, start: Start) -> None:
    steps = "  ".join(f"{step} {at:.2f} s" for step, at in start.split.items() if at is not None)
    mismatch = "" if start.as_asked else (f"   STARTED AS {start.started_as or 'unknown (no start line)'}, "
                                          f"NOT {start.kind}: left out of the {start.kind} figures")
    print(f"  run {run:2d} {start.kind:<8} first token {start.first_token_s:6.2f} s   ({steps}){mismatch}",
          flush=True)


def as_asked(results: list[Start], kind: str) -> list[Start]:
    """The starts of `kind` that really started as `kind`: a fallback must not blur its kind's figures."""
    return [s for s in results if s.kind == kind and s.as_asked]


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10, method="inclusive")[-1] if len(values) > 1 else values[0]


def kind_summary(results: list[Start], kind: str) -> dict:
    """First-token median, p90, min and max of the starts of `kind` that started as asked, and the median split."""
    kept = as_asked(results, kind)
    times = [s.first_token_s for s in kept]
    steps = {step: [s.split[step] for s in kept if s.split.get(step) is not None] for step in LOG_STEPS}
    figures = {"median_s": statistics.median(times), "p90_s": p90(times), "min_s": min(times),
               "max_s": max(times)} if times else dict.fromkeys(("median_s", "p90_s", "min_s", "max_s"))
    return {"runs": len(times), "started_otherwise": sum(s.kind == kind for s in results) - len(times), **figures,
            "split_median_s": {step: statistics.median(v) if v else None for step, v in steps.items()}}


def summary(results: list[Start], kinds: list[str]) -> dict:
    """Per kind figures, the ratio of the medians cold/snapshot, and whether the issue's targets hold."""
    per_kind = {kind: kind_summary(results, kind) for kind in kinds}
    cold, snapshot = (per_kind.get(k, {}).get("median_s") for k in ("cold", "snapshot"))
    ratio = cold / snapshot if cold and snapshot else None
    targets = {
        f"snapshot <= {SNAPSHOT_TARGET_S:g} s": snapshot <= SNAPSHOT_TARGET_S if snapshot is not None else None,
        f"cold/snapshot >= {SPEEDUP_TARGET:g}x": ratio >= SPEEDUP_TARGET if ratio is not None else None,
    }
    return {"kinds": per_kind, "cold_over_snapshot": ratio, "targets": targets}


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def start_table(figures: dict) -> str:
    rows = [[kind, str(k["runs"]), str(k["started_otherwise"]), seconds(k["median_s"]), seconds(k["p90_s"]),
             seconds(k["min_s"]), seconds(k["max_s"]), *(seconds(v) for v in k["split_median_s"].values())]
            for kind, k in figures["kinds"].items()]
    header = ["start", "runs", "started otherwise (left out)", "first token median (s)", "p90 (s)", "min (s)",
              "max (s)", *(f"{step} median (s)" for step in LOG_STEPS)]
    return engine_bench.markdown(header, rows)


def verdict(figures: dict) -> str:
    """The ratio and each target: met, NOT met, or not measured (a kind not run, or none of its runs as asked)."""
    ratio = figures["cold_over_snapshot"]
    lines = [f"cold/snapshot (medians): {'-' if ratio is None else f'{ratio:.1f}x'}"]
    for target, met in figures["targets"].items():
        lines.append(f"target {target}: {'not measured' if met is None else 'met' if met else 'NOT met'}")
    return "\n".join(lines)


# -- 2. memory sweep -------------------------------------------------------------------------------------------


@dataclass
class SweepPoint:
    memory_mb: int
    threads: int
    prompt_tokens: int
    generated_tokens: int
    prompt_tokens_per_s: float
    generated_tokens_per_s: float
    billed_gb_s: float
    request_s: float


def fixed_request(gw: Gateway, endpoint: str) -> tuple[dict, float]:
    """The sweep's request, not streamed, with LMI `details`; its details and its seconds seen by the client."""
    body = json.dumps({"inputs": SWEEP_PROMPT,
                       "parameters": {"max_new_tokens": NEW_TOKENS, "ignore_eos": True, "details": True}})
    began = time.perf_counter()
    answer = gw.client("sagemaker-runtime").invoke_endpoint(EndpointName=endpoint, Body=body,
                                                            ContentType="application/json")
    result = json.loads(answer["Body"].read())
    return (result[0] if isinstance(result, list) else result)["details"], time.perf_counter() - began


def sweep(gws: dict[str, Gateway], sizes: list[int]) -> list[SweepPoint]:
    gw = gws.get("snapshot") or next(iter(gws.values()))  # the default settings where they run
    points = []
    for memory_mb in sizes:
        wait_for_no_instance(list(gws.values()))
        endpoint = create_serverless(gw, f"memory-{memory_mb}", memory_mb)
        if endpoint is None:
            continue
        fixed_request(gw, endpoint)  # warm-up: starts the instance
        before = gw.billed_gb_seconds(endpoint)
        details, request_s = fixed_request(gw, endpoint)
        point = SweepPoint(memory_mb, serverless_threads(memory_mb, os.cpu_count() or 1), details["prompt_tokens"],
                           details["generated_tokens"], details["prompt_tokens_per_second"],
                           details["generated_tokens_per_second"], gw.billed_gb_seconds(endpoint) - before, request_s)
        points.append(point)
        print(f"  {memory_mb} MB: {point.threads} thread(s), prompt {point.prompt_tokens_per_s:.1f} tok/s, "
              f"generated {point.generated_tokens_per_s:.1f} tok/s, billed {point.billed_gb_s:.3f} GB-s "
              f"(request {request_s:.2f} s at the client)", flush=True)
        gw.client("sagemaker").delete_endpoint(EndpointName=endpoint)  # its instance gives the cores back
    return points


def sweep_table(points: list[SweepPoint]) -> str:
    rows = [[str(p.memory_mb), str(p.threads), f"{p.prompt_tokens_per_s:.1f}", f"{p.generated_tokens_per_s:.1f}",
             f"{p.billed_gb_s:.3f}", f"{p.request_s:.2f}"] for p in points]
    header = ["MemorySizeInMB", "threads", "prompt tokens/s", "generated tokens/s", "billed GB-s",
              "request at client (s)"]
    return engine_bench.markdown(header, rows)


# -- the run ----------------------------------------------------------------------------------------------------


def write_json(path: Path, setup: dict, results: list[Start], figures: dict, points: list[SweepPoint]) -> None:
    report = {"setup": setup, "starts": [asdict(s) for s in results], "start_summary": figures,
              "sweep": [asdict(p) for p in points]}
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {path}")


def parse_options(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="starts from zero per kind")
    parser.add_argument("--kinds", type=kind_list, default=list(KINDS), help=", ".join(KINDS))
    parser.add_argument("--memory", type=engine_bench.int_list, default=SWEEP_MEMORY_MB,
                        help="MemorySizeInMB values of the sweep, e.g. 2048,4096")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    return parser.parse_args(argv)


def kind_list(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names or set(names) - set(KINDS) or len(set(names)) < len(names):
        raise argparse.ArgumentTypeError(f"choose from {', '.join(KINDS)}, each once")
    return names


def main(argv: list[str] | None = None) -> None:
    options = parse_options(argv)
    signal.signal(signal.SIGTERM, engine_bench.exit_on_sigterm)
    threads = serverless_threads(START_MEMORY_MB, os.cpu_count() or 1)
    setup = {"model": DEFAULT_MODEL_URI, "idle_seconds": IDLE_SECONDS, "start_memory_mb": START_MEMORY_MB,
             "start_threads": threads, "runs": options.runs, "kinds": options.kinds, "new_tokens": NEW_TOKENS,
             "gateways": {kind: f"SERVELET_SNAPSHOTS={SNAPSHOTS_SETTING[kind]}" for kind in options.kinds},
             "machine": machine(),
             "stream": "boto3 invoke_endpoint_with_response_stream (SageMaker runtime API through the gateway)"}
    print(describe_machine(setup["machine"]))
    with tempfile.TemporaryDirectory(prefix="servelet-cold-start-") as folder, \
            gateways(Path(folder), options.kinds) as gws:
        print(f"\n1. zero instances -> first streamed token ({setup['stream']}); one gateway per kind "
              f"({', '.join(f'{k}: {v}' for k, v in setup['gateways'].items())}), serverless {START_MEMORY_MB} MB "
              f"({threads} thread(s)), idle timeout {IDLE_SECONDS} s, {options.runs} run(s) per kind, interleaved",
              flush=True)
        results = starts(gws, options.runs, options.kinds)
        figures = summary(results, options.kinds)
        print("\n" + start_table(figures) + "\n\n" + verdict(figures))
        print(f"\n2. memory sweep: one request of {NEW_TOKENS} new tokens, greedy, EOS ignored, warm", flush=True)
        points = sweep(gws, options.memory)
        print("\n" + sweep_table(points))
    if options.json:
        write_json(options.json, setup, results, figures, points)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted; the gateway started here was stopped")
