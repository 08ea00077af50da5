"""Serverless endpoints: time from zero instances to the first streamed token, and a memory sweep like a Lambda table.

Why: users choose serverless so that idle costs nothing, and then pay a cold start on the next request; they compare
memory sizes by prompt tokens/s, generated tokens/s and GB-seconds billed (issue 14).

1. Start to first token: `servelet serve` with no `default` endpoint and a short idle timeout, one serverless
   endpoint of the default model. Each run waits (bounded) until the variant holds no instance, then streams one
   request with boto3's `invoke_endpoint_with_response_stream` (SageMaker's runtime API through the gateway) and
   times it to its first token. The gateway's log splits each start: request in -> instance process started ->
   model loaded (the instance's own line) -> the gateway sees it ready -> first token. Start kinds are run
   interleaved, run by run; only `cold` exists today.
2. Memory sweep: one serverless endpoint per MemorySizeInMB (sizes the create-time check refuses are skipped and
   named), one warm-up request, then one fixed request (fixed prompt, 128 new tokens, greedy, EOS ignored, LMI
   `details`): the threads its instance got, its two token rates, and the GB-seconds the cost meter billed for it
   (`servelet_billed_gb_seconds_total` in /metrics before and after).

    python bench/cold_start.py [--runs 10] [--kinds cold] [--memory 2048,3072,4096,5120,6144] [--json PATH]
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
from contextlib import contextmanager
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
COLD_MEMORY_MB = 2048
SWEEP_MEMORY_MB = [2048, 3072, 4096, 5120, 6144]
NEW_TOKENS = 128
COLD_PROMPT = "The capital of France is"
SWEEP_PROMPT = engine_bench.PROMPTS[0]
# Start kinds measured; a `snapshot` kind (instances forked from a template) is to be added once it exists.
KINDS = ("cold",)
NOT_YET = "snapshot starts (forked from a template) do not exist yet in servelet: only cold starts are measured"


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
        """Instances of every endpoint: a sweep point waits for zero so that it has the cores to itself."""
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
def gateway(folder: Path) -> Iterator[Gateway]:
    """`servelet serve` with no `default` endpoint (the serverless ones get the cores), its own run and data
    folders, and a short idle timeout; its log goes to a file the start split is read from."""
    port = engine_bench.free_port()
    log_path = folder / "gateway.log"
    command = [str(Path(sys.executable).with_name("servelet")), "serve", "--port", str(port), "--instances", "0"]
    env = os.environ | {"SERVELET_RUN_DIR": str(folder), "SERVELET_DATA_DIR": str(folder / "data"),
                        "SERVELET_SERVERLESS_IDLE_SECONDS": str(IDLE_SECONDS)}
    with log_path.open("w+b") as log, engine_bench.running(command, env=env, stdout=log, stderr=log) as process:
        engine_bench.wait_until_healthy(process, f"http://127.0.0.1:{port}/health", log)
        yield Gateway(f"http://127.0.0.1:{port}", log_path)


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
    kind: str
    first_token_s: float
    # From the gateway's log, seconds after the request was sent (None where a line is missing).
    split: dict[str, float | None] = field(default_factory=dict)


LOG_STEPS = {
    "start requested": re.compile(r"has no instance: starting one for a request"),
    "process started": re.compile(r"instance \S+ started \(pid"),
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


def cold_start(gw: Gateway, endpoint: str) -> Start:
    wait_until(lambda: gw.variant(endpoint)["instances"] == 0, ZERO_WAIT_S, f"{endpoint} at zero instances")
    offset = gw.log_size()
    sent_at, first_token_s = stream_to_first_token(gw, endpoint)
    return Start("cold", first_token_s, log_split(gw.log_since(offset), sent_at))


STARTS = {"cold": cold_start}  # kind -> one start from zero; `snapshot` joins here


def starts(gw: Gateway, runs: int, kinds: list[str]) -> list[Start]:
    """`runs` starts of each kind, interleaved (run 1 of every kind, then run 2...), one endpoint per kind."""
    endpoints = {kind: create_serverless(gw, f"start-{kind}", COLD_MEMORY_MB) for kind in kinds}
    results = []
    for run in range(1, runs + 1):
        for kind in kinds:
            start = STARTS[kind](gw, endpoints[kind])
            results.append(start)
            steps = "  ".join(f"{step} {at:.2f} s" for step, at in start.split.items() if at is not None)
            print(f"  run {run:2d} {kind:<8} first token {start.first_token_s:6.2f} s   ({steps})", flush=True)
    return results


def start_table(results: list[Start], kinds: list[str]) -> str:
    rows = []
    for kind in kinds:
        times = [s.first_token_s for s in results if s.kind == kind]
        steps = {step: [s.split[step] for s in results if s.kind == kind and s.split.get(step) is not None]
                 for step in LOG_STEPS}
        rows.append([kind, str(len(times)), f"{statistics.median(times):.2f}", f"{min(times):.2f}",
                     f"{max(times):.2f}",
                     *(f"{statistics.median(v):.2f}" if v else "-" for v in steps.values())])
    header = ["start", "runs", "first token median (s)", "min (s)", "max (s)",
              *(f"{step} median (s)" for step in LOG_STEPS)]
    return engine_bench.markdown(header, rows)


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


def sweep(gw: Gateway, sizes: list[int]) -> list[SweepPoint]:
    points = []
    for memory_mb in sizes:
        wait_until(lambda: gw.instances() == 0, ZERO_WAIT_S, "every variant at zero instances")
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


def write_json(path: Path, setup: dict, results: list[Start], points: list[SweepPoint]) -> None:
    report = {"setup": setup, "starts": [asdict(s) for s in results], "sweep": [asdict(p) for p in points]}
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {path}")


def parse_options(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="starts from zero per kind")
    parser.add_argument("--kinds", type=kind_list, default=list(KINDS), help=", ".join(STARTS))
    parser.add_argument("--memory", type=engine_bench.int_list, default=SWEEP_MEMORY_MB,
                        help="MemorySizeInMB values of the sweep, e.g. 2048,4096")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    return parser.parse_args(argv)


def kind_list(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names or set(names) - set(STARTS):
        raise argparse.ArgumentTypeError(f"choose from {', '.join(STARTS)} ({NOT_YET})")
    return names


def main(argv: list[str] | None = None) -> None:
    options = parse_options(argv)
    signal.signal(signal.SIGTERM, engine_bench.exit_on_sigterm)
    setup = {"model": DEFAULT_MODEL_URI, "idle_seconds": IDLE_SECONDS, "cold_memory_mb": COLD_MEMORY_MB,
             "runs": options.runs, "kinds": options.kinds, "new_tokens": NEW_TOKENS, "machine": machine(),
             "stream": "boto3 invoke_endpoint_with_response_stream (SageMaker runtime API through the gateway)"}
    print(describe_machine(setup["machine"]))
    print(f"note: {NOT_YET}")
    with tempfile.TemporaryDirectory(prefix="servelet-cold-start-") as folder, gateway(Path(folder)) as gw:
        print(f"\n1. zero instances -> first streamed token ({setup['stream']}); serverless {COLD_MEMORY_MB} MB, "
              f"idle timeout {IDLE_SECONDS} s, {options.runs} run(s) per kind", flush=True)
        results = starts(gw, options.runs, options.kinds)
        print("\n" + start_table(results, options.kinds))
        print(f"\n2. memory sweep: one request of {NEW_TOKENS} new tokens, greedy, EOS ignored, warm", flush=True)
        points = sweep(gw, options.memory)
        print("\n" + sweep_table(points))
    if options.json:
        write_json(options.json, setup, results, points)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted; the gateway started here was stopped")
