"""The async queue's frequent queries against the number of ended jobs kept: a lease of 32 jobs plus their ending,
and a backlog count, on a fresh SQLite file, in process (no HTTP, no gateway).

Why: ended jobs stay in the table (their status is asked for) and soon outnumber the rest; a query that reads them
slows down for ever, on the gateway's event loop. With the queue's indexes (control/async_queue.py) both figures
should stay flat as the ended jobs grow.

    python bench/queue_queries.py [--ended 1000,30000] [--repeats 50]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from machine import describe as describe_machine
from machine import machine
from servelet.control.async_queue import Ending, Job, JobQueue, JobStatus
from servelet.control.store import Store

BATCH = 32
WAITING = 2_000


def job() -> Job:
    now = time.time()
    return Job(inference_id=str(uuid.uuid4()), endpoint="echo", status=JobStatus.PENDING.value, created=now,
               expires=now + 3600, invocation_timeout=900, inline_body=b"{}", content_type="application/json",
               output_location="file:///tmp/unused.out")


def end_all(queue: JobQueue, jobs: list[Job]) -> None:
    queue.finish_many("bench", [Ending(j.inference_id, JobStatus.COMPLETED, notify=False) for j in jobs])


def measure(ended: int, repeats: int) -> tuple[float, float]:
    """(ms per lease + ending of BATCH jobs, ms per backlog count), medians, with `ended` ended jobs kept."""
    with tempfile.TemporaryDirectory() as folder:
        store = Store(Store.default_url(Path(folder)))
        queue = JobQueue(store)
        for start in range(0, ended, 500):
            queue.enqueue_many([job() for _ in range(min(500, ended - start))])
            end_all(queue, queue.lease("echo", "bench", 500, 30))
        queue.enqueue_many([job() for _ in range(WAITING)])
        leases, counts = [], []
        for _ in range(repeats):
            began = time.perf_counter()
            end_all(queue, queue.lease("echo", "bench", BATCH, 30))
            leases.append((time.perf_counter() - began) * 1000)
            began = time.perf_counter()
            queue.backlog("echo")
            counts.append((time.perf_counter() - began) * 1000)
        queue.close()
        store.close()
    return statistics.median(leases), statistics.median(counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ended", default="1000,30000", help="ended jobs kept, comma-separated")
    parser.add_argument("--repeats", type=int, default=50)
    options = parser.parse_args()
    print(describe_machine(machine()))
    print(f"\n| ended jobs kept | lease + ending of {BATCH} jobs (ms, median) | backlog count (ms, median) |")
    print("| ---: | ---: | ---: |")
    for ended in (int(n) for n in options.ended.split(",")):
        lease, count = measure(ended, options.repeats)
        print(f"| {ended:,} | {lease:.2f} | {count:.2f} |", flush=True)


if __name__ == "__main__":
    main()
