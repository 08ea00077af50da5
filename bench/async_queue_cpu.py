"""Async inference, where the queue's CPU goes: CPU time per job of the gateway and of its instance in the saturated
phase of bench/async_queue.py, and optionally py-spy profiles of both.

Why: throughput on a 2-core machine shared with other work swings from run to run, while the CPU a process spends
per job moves less: it is what a change to the queue's path should cut (docs/benchmarks.md compares two trees with
it, each run through PYTHONPATH, alternately).

Per round: K `wrk` connections POST small inline bodies to the echo handler's async endpoint for D seconds (as
async_queue.py's first phase), then every output is waited for. Measured from /proc: the gateway's and the instance's
CPU seconds (user + system, every thread) over that time / the jobs accepted; also accepted/s and completed/s end to
end. With --profile DIR, `py-spy record --format raw` samples both processes meanwhile (DIR/gateway-N.txt,
DIR/instance-N.txt: collapsed stacks, one line per stack and its sample count).

    python bench/async_queue_cpu.py [--seconds 10] [--clients 32] [--rounds 1] [--profile DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import async_queue as queue_bench
import engine as engine_bench

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PY_SPY_RATE = 250  # samples a second
DRAIN_SECONDS = 300.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU of every thread of the process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def children(pid: int) -> list[int]:
    return [int(child) for task in Path(f"/proc/{pid}/task").iterdir() for child in (task / "children").read_text().split()]


def instance_pid(gateway_pid: int) -> int:
    """The gateway's `servelet container` process."""
    todo = children(gateway_pid)
    while todo:
        pid = todo.pop()
        if b"container" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
            return pid
        todo += children(pid)
    raise RuntimeError(f"gateway {gateway_pid} runs no instance")


def profilers(folder: Path, round_number: int, pids: dict[str, int]) -> list[subprocess.Popen]:
    """py-spy on each process (nonblocking: it does not stop them to read their stacks)."""
    folder.mkdir(parents=True, exist_ok=True)
    return [subprocess.Popen(["py-spy", "record", "--nonblocking", "--rate", str(PY_SPY_RATE), "--format", "raw",
                              "-o", str(folder / f"{name}-{round_number}.txt"), "--pid", str(pid)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for name, pid in pids.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds of load per round (D)")
    parser.add_argument("--clients", type=int, default=32, help="wrk connections (K)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--profile", type=Path, help="write py-spy profiles of both processes here")
    options = parser.parse_args()
    if options.profile and shutil.which("py-spy") is None:
        parser.error("--profile needs py-spy (pip install py-spy)")
    with tempfile.TemporaryDirectory(prefix="servelet-async-cpu-") as folder:
        folder = Path(folder)
        model = queue_bench.handler_model(folder / "model", queue_bench.ECHO)
        outputs, run = folder / "out", folder / "gateway"
        run.mkdir()
        port = engine_bench.free_port()
        with (folder / "gateway.log").open("w+b") as log, engine_bench.running(
            queue_bench.serve_command(port), env=queue_bench.gateway_env(run, None), stdout=log, stderr=log,
        ) as gateway:
            engine_bench.wait_until_healthy(gateway, f"http://127.0.0.1:{port}/health", log)
            gw = queue_bench.Gateway(f"http://127.0.0.1:{port}", folder / "gateway.log")
            queue_bench.create_async_endpoint(gw, queue_bench.ENDPOINT, model, outputs, queue_bench.PER_INSTANCE)
            pids = {"gateway": gateway.pid, "instance": instance_pid(gateway.pid)}
            invoke = f"{gw.base_url}/endpoints/{queue_bench.ENDPOINT}/async-invocations"
            done = queue_bench.load(invoke, 1, options.clients, 202).requests  # warm-up
            queue_bench.drain_seconds(outputs, done, time.perf_counter())
            for round_number in range(options.rounds):
                spies = profilers(options.profile, round_number, pids) if options.profile else []
                if spies:
                    time.sleep(1.0)  # py-spy attached
                before = {name: cpu_seconds(pid) for name, pid in pids.items()}
                began = time.perf_counter()
                accepted = queue_bench.load(invoke, options.seconds, options.clients, 202)
                through = queue_bench.drain_seconds(outputs, done + accepted.requests, began)
                spent = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
                for spy in spies:
                    spy.send_signal(signal.SIGINT)  # py-spy writes its profile and exits
                for spy in spies:
                    spy.wait(30)
                done += accepted.requests
                jobs = accepted.requests
                completed = "-" if through is None else f"{jobs / through:.0f}/s"
                print(f"round {round_number}: accepted {accepted.per_s:.0f}/s, completed {completed} end to end "
                      f"({jobs} jobs); CPU ms per job: gateway {1000 * spent['gateway'] / jobs:.3f}, instance "
                      f"{1000 * spent['instance'] / jobs:.3f}; load average {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
