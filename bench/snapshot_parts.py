"""The parts of a snapshot start that docs/benchmarks.md names, each measured on its own:

1. fork(): a process prepared as a template is (the default model loaded, its context open), forked 5 times,
   with 4 KB pages and with glibc's `malloc.hugetlb=1` tunable (what the gateway gives its templates);
2. a client of an instance's Unix socket: httpx's default (it builds a TLS context) against servelet's
   InstanceClient (none: plain HTTP to our own worker);
3. `import numpy.random` in a process that imported numpy (what a forked child would pay to re-seed a generator
   nobody had used).

    python bench/snapshot_parts.py
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

from machine import describe as describe_machine
from machine import machine

FORKS = 5
TEMPLATE = """
import json, os, time
from servelet.runtimes import prepare_runtime
from servelet.settings import InstanceSettings
prepare_runtime(InstanceSettings(threads=1))
times = []
for _ in range({forks}):
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    times.append(time.perf_counter() - started)
    os.waitpid(pid, 0)
print(json.dumps(times))
"""
CLIENTS = """
import json, time, httpx
from servelet.instance.client import InstanceClient
def timed(make):
    make()  # the first pays the imports
    started = time.perf_counter(); make(); return time.perf_counter() - started
default = timed(lambda: httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds="/tmp/x.sock"), base_url="http://x"))
ours = timed(lambda: InstanceClient("unix:/tmp/x.sock"))
print(json.dumps([default, ours]))
"""
NUMPY_RANDOM = """
import json, time, numpy
started = time.perf_counter(); import numpy.random; print(json.dumps(time.perf_counter() - started))
"""


def run(code: str, env: dict[str, str] | None = None):
    """A fresh interpreter for each figure: what it measures must not be warm from another."""
    done = subprocess.run([sys.executable, "-c", code], env=os.environ | (env or {}), capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    print(describe_machine(machine()))
    one_thread = {"OPENBLAS_NUM_THREADS": "1"}
    huge_pages = one_thread | {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    for label, env in (("4 KB pages", one_thread), ("glibc.malloc.hugetlb=1", huge_pages)):
        times = [t * 1000 for t in run(TEMPLATE.format(forks=FORKS), env)]
        print(f"fork() of a prepared template, {label}: median {statistics.median(times):.1f} ms "
              f"(min {min(times):.1f}, max {max(times):.1f}, {FORKS} forks)")
    default, ours = run(CLIENTS)
    print(f"a Unix-socket client: httpx's default {default * 1000:.1f} ms, InstanceClient {ours * 1000:.2f} ms")
    print(f"import numpy.random after numpy: {run(NUMPY_RANDOM) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
