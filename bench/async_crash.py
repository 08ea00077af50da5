"""Async inference, crash safety in numbers: random `kill -9`s of the gateway during a run of async jobs.

Why: the queue promises that an accepted job (its 202 received) is never lost and its output never written twice,
whatever moment the gateway dies at (issue 15: 20 kills during 2,000 jobs, both counts 0).

One `servelet serve --instances 0` on a data folder (SQLite store), SERVELET_ASYNC_LEASE_SECONDS=2 so that the leases
of a killed gateway run out fast, one async endpoint of a handler model whose `transform_fn` appends the job's id (the
body carries it) to a runs file with O_APPEND, one line per model run, sleeps --job-ms and echoes the body; outputs go
to a `file://` folder. Client threads submit the jobs with raw httpx POSTs (as botocore's invoke_endpoint_async), each
with its own X-Amzn-SageMaker-Inference-Id: a submission that fails because the gateway is down (or dies mid-request)
is sent again with the SAME InferenceId, so it is the same job, until its 202 comes. Meanwhile the gateway is killed
(SIGKILL) at random moments (seeded) and started again on the same data folder and port. Afterwards, until every
accepted job has its output (bounded), then counted:
- lost: jobs accepted (202) whose output never appeared (their status is named);
- written twice: jobs the gateways' logs say were completed (`async job ID completed`) more than once, all logs
  together (a write is followed by that line unless the gateway died in between: the next attempt then finds the
  output and completes the job without running the model or writing again);
- model re-runs: jobs whose model ran more than once (allowed: a job whose gateway died mid-run is run again).

    python bench/async_crash.py [--jobs 2000] [--kills 20] [--seed 15] [--job-ms 20] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

import engine as engine_bench  # bench/engine.py: free ports, server processes, markdown tables
from async_queue import (async_headers, create_async_endpoint, gateway_env, handler_model, outputs_written,
                         serve_command, write_json)
from cold_start import Gateway
from machine import describe as describe_machine
from machine import machine

ENDPOINT = "crashy"
PER_INSTANCE = 8  # MaxConcurrentInvocationsPerInstance
LEASE_SECONDS = "2"
CLIENTS = 4
KILL_AFTER_S = (0.3, 3.0)  # each kill: this long (uniform, seeded) after the gateway answers /health
DRAIN_SECONDS = 600.0  # bound on waiting for every accepted job's output after the last kill
RETRY_S = 0.2  # a client's pause before resending a submission the gateway did not answer
GIVE_UP_S = 120.0  # a submission refused this long is given up (counted as never accepted, named by its answer)
RECORDING = '''
import json, os, time

RUNS = {runs!r}

def model_fn(model_dir):
    return None

def transform_fn(model, body, content_type, accept):
    fd = os.open(RUNS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.loads(body)["id"] + "\\n").encode())
    finally:
        os.close(fd)
    time.sleep({seconds!r})
    return body, content_type
'''
COMPLETED = re.compile(r"async job (\S+) completed: ")


# -- the gateway, killed and started again ---------------------------------------------------------------------


class Restartable:
    """`servelet serve` on one data folder and port, started again after each kill; one log file per start."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.port = engine_bench.free_port()
        self.env = gateway_env(folder, None, async_lease_seconds=LEASE_SECONDS)
        self.logs: list[Path] = []
        self.process: subprocess.Popen | None = None
        self.gw = Gateway(f"http://127.0.0.1:{self.port}", folder / "gateway-0.log")

    def start(self) -> None:
        log_path = self.folder / f"gateway-{len(self.logs)}.log"
        self.logs.append(log_path)
        with log_path.open("w+b") as log:
            self.process = subprocess.Popen(serve_command(self.port), env=self.env, stdout=log, stderr=log)
            engine_bench.wait_until_healthy(self.process, f"{self.gw.base_url}/health", log)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


# -- the clients ------------------------------------------------------------------------------------------------


class Submissions:
    """Client threads sending each job until its 202 comes; the ids accepted, and how many sends were resent."""

    def __init__(self, url: str, ids: list[str], clients: int):
        self.url = url
        self.pending = iter(ids)
        self.lock = threading.Lock()
        self.accepted: list[str] = []
        self.resent = 0
        self.refused: Counter[str] = Counter()  # submissions given up, by their last answer
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def done(self) -> bool:
        return not any(thread.is_alive() for thread in self.threads)

    def _next(self) -> str | None:
        with self.lock:
            return next(self.pending, None)

    def _client(self) -> None:
        with httpx.Client(timeout=30) as http:
            while (inference_id := self._next()) is not None:
                self._submit(http, inference_id)

    def _submit(self, http: httpx.Client, inference_id: str) -> None:
        """Send until a 202: the same InferenceId each time, so a resend after a lost answer is the same job."""
        body, deadline, last = json.dumps({"id": inference_id}).encode(), time.monotonic() + GIVE_UP_S, "no answer"
        while time.monotonic() < deadline:
            try:
                answer = http.post(self.url, content=body, headers=async_headers(inference_id))
                if answer.status_code == 202:
                    with self.lock:
                        self.accepted.append(inference_id)
                    return
                last = f"HTTP {answer.status_code}: {answer.text[:200]}"
            except httpx.TransportError:
                pass  # the gateway is down, or died mid-request: send again
            with self.lock:
                self.resent += 1
            time.sleep(RETRY_S)
        with self.lock:
            self.refused[last] += 1


# -- the run -------------------------------------------------------------------------------------------------------


@dataclass
class Kill:
    at_s: float  # since the first submission
    accepted: int  # 202s received by then
    outputs: int  # outputs written by then


def kills(server: Restartable, submissions: Submissions, outputs: Path, count: int, rng: random.Random,
          began: float) -> list[Kill]:
    """`count` SIGKILLs, each a random while after the gateway is up, each followed by a start on the same data."""
    done = []
    for number in range(1, count + 1):
        time.sleep(rng.uniform(*KILL_AFTER_S))
        server.kill()
        kill = Kill(round(time.perf_counter() - began, 2), len(submissions.accepted), outputs_written(outputs))
        done.append(kill)
        print(f"  kill {number:2d} at {kill.at_s:6.2f} s: {kill.accepted} accepted, {kill.outputs} outputs", flush=True)
        server.start()
    return done


def drain(submissions: Submissions, outputs: Path) -> bool:
    """Wait for the submissions to end and every accepted job's output; False when that takes past the bound."""
    deadline = time.monotonic() + DRAIN_SECONDS
    while not submissions.done() or outputs_written(outputs) < len(submissions.accepted):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@dataclass
class Counts:
    jobs: int
    accepted: int
    resent: int
    kills: int
    lost: int
    written_twice: int
    model_reruns: int
    lost_statuses: dict[str, int]
    refused: dict[str, int]  # submissions never accepted within GIVE_UP_S, by their last answer
    drained: bool


def count(server: Restartable, submissions: Submissions, outputs: Path, runs: Path, jobs: int, kill_count: int,
          drained: bool) -> Counts:
    written = {p.name.removesuffix(".out") for p in outputs.glob("*.out")}
    lost = sorted(set(submissions.accepted) - written)
    completed = Counter(m.group(1) for log in server.logs for m in COMPLETED.finditer(log.read_text(errors="replace")))
    ran = Counter(runs.read_text().split()) if runs.exists() else Counter()
    statuses = Counter(job_status(server.gw, i) for i in lost)
    return Counts(jobs, len(set(submissions.accepted)), submissions.resent, kill_count, len(lost),
                  sum(1 for n in completed.values() if n > 1), sum(1 for n in ran.values() if n > 1), dict(statuses),
                  dict(submissions.refused), drained)


def job_status(gw: Gateway, inference_id: str) -> str:
    answer = httpx.get(f"{gw.base_url}/async-invocations/{inference_id}", timeout=10)
    return answer.json().get("Status", "unknown") if answer.status_code == 200 else f"HTTP {answer.status_code}"


def crash_run(folder: Path, jobs: int, kill_count: int, seed: int, job_ms: float) -> tuple[Counts, list[Kill]]:
    runs, outputs = folder / "runs.txt", folder / "out"
    model = handler_model(folder / "model", RECORDING.format(runs=str(runs), seconds=job_ms / 1000))
    server = Restartable(folder / "gateway")
    server.folder.mkdir()
    try:
        server.start()
        create_async_endpoint(server.gw, ENDPOINT, model, outputs, PER_INSTANCE)
        rng = random.Random(seed)
        ids = [f"job-{seed}-{n:05d}" for n in range(jobs)]
        submissions = Submissions(f"{server.gw.base_url}/endpoints/{ENDPOINT}/async-invocations", ids, CLIENTS)
        began = time.perf_counter()
        submissions.start()
        done = kills(server, submissions, outputs, kill_count, rng, began)
        drained = drain(submissions, outputs)
        print(f"  {'all' if drained else 'NOT all'} accepted jobs' outputs written "
              f"{time.perf_counter() - began:.1f} s after the first submission", flush=True)
        return count(server, submissions, outputs, runs, jobs, kill_count, drained), done
    finally:
        server.stop()


def results_table(counts: Counts) -> str:
    c = counts
    header = ["jobs", "accepted (202)", "resent submissions", "kills", "lost", "written twice", "model re-runs"]
    return engine_bench.markdown(header, [[str(c.jobs), str(c.accepted), str(c.resent), str(c.kills), str(c.lost),
                                           str(c.written_twice), str(c.model_reruns)]])


def verdict(counts: Counts) -> str:
    lines = [f"target lost == 0: {'met' if counts.lost == 0 else 'NOT met'}"
             + (f" (their statuses: {counts.lost_statuses})" if counts.lost else ""),
             f"target written twice == 0: {'met' if counts.written_twice == 0 else 'NOT met'}",
             f"model re-runs: {counts.model_reruns} job(s) ran the model more than once (allowed: a job whose gateway "
             "died mid-run is run again; its output is still written once)"]
    if counts.refused:
        lines.append(f"NOTE: {sum(counts.refused.values())} submission(s) never accepted: {counts.refused}")
    if not counts.drained:
        lines.append(f"NOTE: not every accepted job had its output within {DRAIN_SECONDS:g} s of the last kill")
    return "\n".join(lines)


def parse_options(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2000, help="async jobs submitted")
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs of the gateway during the run")
    parser.add_argument("--seed", type=int, default=15, help="the kill moments' random seed")
    parser.add_argument("--job-ms", type=float, default=20.0, help="the model's time per job (ms)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    options = parse_options(argv)
    signal.signal(signal.SIGTERM, engine_bench.exit_on_sigterm)
    setup = {"jobs": options.jobs, "kills": options.kills, "seed": options.seed, "job_ms": options.job_ms,
             "clients": CLIENTS, "per_instance": PER_INSTANCE, "lease_seconds": LEASE_SECONDS,
             "kill_after_s": KILL_AFTER_S, "store": "SQLite (the default)", "machine": machine()}
    print(describe_machine(setup["machine"]))
    print(f"\n{options.jobs} async jobs ({options.job_ms:g} ms of model each) by {CLIENTS} clients; {options.kills} "
          f"SIGKILLs of the gateway, each {KILL_AFTER_S[0]:g}-{KILL_AFTER_S[1]:g} s after it is up (seed "
          f"{options.seed}); SERVELET_ASYNC_LEASE_SECONDS={LEASE_SECONDS}", flush=True)
    with tempfile.TemporaryDirectory(prefix="servelet-async-crash-") as folder:
        counts, done = crash_run(Path(folder), options.jobs, options.kills, options.seed, options.job_ms)
    print("\n" + results_table(counts) + "\n\n" + verdict(counts))
    if options.json:
        write_json(options.json, {"setup": setup, "counts": asdict(counts), "kills": [asdict(k) for k in done]})


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted; the gateway started here was stopped")
