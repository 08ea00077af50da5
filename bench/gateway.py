"""What the gateway costs: N concurrent streams through `servelet serve` against the same through the engine API alone.

Engine alone: `servelet.engine.Engine` in this process, with the settings an instance uses (2 threads), requests
submitted with the async API, asking for each token's log-prob as both gateway routes carry it (the same work
for the same answer; `--engine-without-logprobs` drops that). Instance direct: the same streams over HTTP to the
instance's own Unix socket (what a client pays for HTTP, without the gateway hop). Gateway: `servelet serve`
(gateway + one instance over a Unix socket), the same requests streamed over HTTP on a route of your choice. Both
HTTP sides stream through a lean client (`--client lean`, asyncio and httptools) by default, as the client shares
the two cores with llama.cpp; `--client httpx` measures with httpx instead.

Runs alternate (engine, instance, gateway, then the order rotates) so the machine's drift (single runs swing by
10% here) hits all sides alike. Medians are reported, and the per-repeat gateway / engine and gateway / instance
ratios (the runs of one repeat are neighbours in time): their median with a distribution-free interval, and their
geometric mean with a t-interval on the log scale (tighter, assuming the log-ratios are near normal).
Then the gateway's added latency on a small non-streaming request: `POST /invocations` through the gateway
against the same call on the instance's own socket.

One run cannot read a 3% difference on these machines; `--save FILE` keeps a run's figures and
`--pool FILE...` reports several saved runs as one.

    python bench/gateway.py [--n 16] [--new-tokens 128] [--repeats 40] [--route tgi|invocations] [--client lean|httpx]
                            [--pings 50] [--save FILE]
    python bench/gateway.py --pool FILE [FILE...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from scipy import stats

import engine as engine_bench  # bench/engine.py: prompts, timings, the HTTP streaming client
from machine import describe as describe_machine
from machine import machine
from servelet.artifacts import resolve_model
from servelet.engine import Engine, GenerationParams
from servelet.instance.stream import open_stream
from servelet.settings import InstanceSettings

THREADS = engine_bench.THREADS
READ_TIMEOUT_S = 900.0


def json_lines_tokens(line: str, tokens: int) -> int:
    return engine_bench.servelet_tokens_after(line, tokens)


def sse_tokens(line: str, tokens: int) -> int:
    if not line.startswith("data:") or line.strip() == "data: [DONE]":
        return tokens
    event = json.loads(line.removeprefix("data:"))
    if "error" in event:
        raise RuntimeError(f"gateway: {event['error']}")
    return tokens + (("token" in event) or bool(event.get("choices")))


ROUTES = {
    "invocations": engine_bench.StreamingApi(
        "/invocations",
        lambda p, n: {"inputs": p, "parameters": {"max_new_tokens": n, "ignore_eos": True}, "stream": True},
        json_lines_tokens,
    ),
    "tgi": engine_bench.StreamingApi(
        "/generate_stream",
        lambda p, n: {"inputs": p, "parameters": {"max_new_tokens": n, "ignore_eos": True}},
        sse_tokens,
    ),
}


class InstanceDirect(engine_bench.ConcurrentClient):
    """httpx's client (`--client httpx`) straight to the instance's Unix socket."""

    def __init__(self, socket_path: Path):
        super().__init__("http://instance", ROUTES["invocations"])
        self.socket_path = socket_path

    async def _send_all(self, prompts, new_tokens):
        transport = httpx.AsyncHTTPTransport(uds=str(self.socket_path))
        async with httpx.AsyncClient(
            base_url=self.base_url, transport=transport, timeout=engine_bench.REQUEST_TIMEOUT
        ) as client:
            return list(await asyncio.gather(*(self._send(client, p, new_tokens) for p in prompts)))


class LeanClient:
    """Streams a batch of requests at once and times each answer, spending as little CPU as it can: it runs on the
    same two cores as llama.cpp's threads, where a real client would not (httpx took ~170 us a token here, more
    than the gateway's relay). It reads with the gateway's own hop reader (asyncio streams and httptools), one
    connection per stream; `address` is `http://HOST:PORT` or `unix:PATH`."""

    def __init__(self, address: str, api: engine_bench.StreamingApi):
        self.address, self.api = address, api

    def run_batch(self, prompts: tuple[str, ...], new_tokens: int) -> list[engine_bench.RequestTiming]:
        return asyncio.run(self._all(prompts, new_tokens))

    async def _all(self, prompts, new_tokens):
        return list(await asyncio.gather(*(self._one(p, new_tokens) for p in prompts)))

    async def _one(self, prompt: str, new_tokens: int) -> engine_bench.RequestTiming:
        body = json.dumps(self.api.body(prompt, new_tokens)).encode()
        clock = engine_bench.TokenClock()
        pending = b""
        headers = {"Content-Type": "application/json"}
        async with open_stream(self.address, self.api.path, body, headers, READ_TIMEOUT_S) as answer:
            if answer.status_code != 200:
                raise RuntimeError(f"{self.address}{self.api.path} answered {answer.status_code}: {await answer.aread()!r}")
            async for chunk in answer.aiter_raw():
                *lines, pending = (pending + chunk).split(b"\n")
                counted = clock.tokens
                for line in lines:
                    counted = self.api.tokens_after(line.decode(), counted)
                clock.count(counted)
        return clock.timing(f"{self.address}{self.api.path}")


class EngineAlone:
    """The engine API in this process: every request submitted at once, tokens timed as they arrive."""

    def __init__(self, model: Path, logprobs: bool):
        settings = InstanceSettings(threads=THREADS)
        self.engine = Engine(model, settings.engine_config())
        self.logprobs = logprobs

    def run_batch(self, prompts: tuple[str, ...], new_tokens: int) -> list[engine_bench.RequestTiming]:
        return asyncio.run(self._all(prompts, new_tokens))

    async def _all(self, prompts, new_tokens):
        return list(await asyncio.gather(*(self._one(p, new_tokens) for p in prompts)))

    async def _one(self, prompt: str, new_tokens: int) -> engine_bench.RequestTiming:
        clock = engine_bench.TokenClock()
        params = GenerationParams(max_new_tokens=new_tokens, ignore_eos=True)
        async for _ in self.engine.submit(prompt, params, logprobs=self.logprobs):
            clock.count(clock.tokens + 1)
        return clock.timing("the engine")


def serve_pid(port: int) -> int | None:
    """The `servelet serve` process listening on `port` (found by its command line)."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                args = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"serve" in args and str(port).encode() in args:
                return int(proc.name)
    return None


def cpu_seconds(pid: int | None, main_thread_only: bool = False) -> float:
    """User + system CPU time a process (or its main thread: an instance's event loop, without llama.cpp's
    threads) has used so far (Linux /proc), 0 where unknown."""
    if pid is None:
        return 0.0
    stat = Path(f"/proc/{pid}/task/{pid}/stat" if main_thread_only else f"/proc/{pid}/stat")
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pid(parent: int | None) -> int | None:
    """The one child process of `parent` (the gateway's instance), found by its parent's pid in /proc."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                    return int(proc.name)
            except OSError:
                continue
    return None


def small_request_latency(gateway_url: str, instance_socket: Path, pings: int) -> tuple[float, float]:
    """p50 seconds of one small non-streaming request, through the gateway and straight to the instance (alternating)."""
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 1}}
    via_gateway, direct = [], []
    with httpx.Client(base_url=gateway_url, timeout=60) as gateway, httpx.Client(
        transport=httpx.HTTPTransport(uds=str(instance_socket)), base_url="http://instance", timeout=60
    ) as instance:
        for client in (gateway, instance):  # warm both connections
            client.post("/invocations", json=body).raise_for_status()
        for _ in range(pings):
            for client, samples in ((gateway, via_gateway), (instance, direct)):
                started = time.perf_counter()
                client.post("/invocations", json=body).raise_for_status()
                samples.append(time.perf_counter() - started)
    return statistics.median(via_gateway), statistics.median(direct)


@dataclass(frozen=True)
class Clients:
    instance: Callable[[Path], object]
    gateway: Callable[[str, engine_bench.StreamingApi], object]


CLIENTS = {
    "lean": Clients(lambda socket: LeanClient(f"unix:{socket}", ROUTES["invocations"]), LeanClient),
    "httpx": Clients(InstanceDirect, engine_bench.ConcurrentClient),
}


def parse_options(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=16, help="concurrent streams")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument(
        "--repeats", type=int, default=40, help="alternating runs per side (7 or 15 cannot read a 3%% difference here)"
    )
    parser.add_argument("--route", choices=sorted(ROUTES), default="tgi", help="the gateway route streamed")
    parser.add_argument(
        "--client", choices=sorted(CLIENTS), default="lean", help="the streaming client of the instance and gateway sides"
    )
    parser.add_argument("--pings", type=int, default=50, help="small requests per side for the latency figure")
    parser.add_argument(
        "--engine-without-logprobs", action="store_true", help="the engine side skips the log-probs the routes carry"
    )
    parser.add_argument("--save", type=Path, help="write this run's figures to a JSON file, for --pool")
    parser.add_argument("--pool", type=Path, nargs="+", help="report saved runs as one (runs nothing)")
    options = parser.parse_args(argv)
    if not 1 <= options.n <= len(engine_bench.PROMPTS):
        parser.error(f"--n: 1 to {len(engine_bench.PROMPTS)}")
    return options


@dataclass
class Figures:
    """What a run measured, savable and poolable: tokens/s per side and repeat, CPU and latency totals."""

    title: str
    route: str
    tokens_per_s: dict[str, list[float]]
    ttft_p50_s: dict[str, list[float]]
    gateway_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    gateway_tokens: int = 0
    # The instance's event-loop thread, by side: called directly, and behind the gateway.
    instance_loop_cpu_s: dict[str, float] = field(default_factory=dict)
    instance_loop_tokens: dict[str, int] = field(default_factory=dict)
    gateway_p50_s: list[float] = field(default_factory=list)
    direct_p50_s: list[float] = field(default_factory=list)
    machines: list[dict] = field(default_factory=list)  # the CPU and llama.cpp build of each run

    @classmethod
    def pooled(cls, runs: list["Figures"]) -> "Figures":
        cpus = {m["cpu"] for run in runs for m in run.machines}
        if len(cpus) > 1:
            raise SystemExit(f"--pool: these runs come from different CPUs ({', '.join(sorted(cpus))}); pool one CPU's runs")
        return cls(
            machines=[m for run in runs for m in run.machines],
            title=f"{len(runs)} runs pooled: " + "; ".join(run.title for run in runs),
            route=", ".join(sorted({run.route for run in runs})),
            tokens_per_s={side: [v for run in runs for v in run.tokens_per_s[side]] for side in SIDES},
            ttft_p50_s={side: [v for run in runs for v in run.ttft_p50_s[side]] for side in SIDES},
            gateway_cpu_s=sum(run.gateway_cpu_s for run in runs),
            client_cpu_s=sum(run.client_cpu_s for run in runs),
            gateway_tokens=sum(run.gateway_tokens for run in runs),
            instance_loop_cpu_s={side: sum(run.instance_loop_cpu_s.get(side, 0.0) for run in runs) for side in LOOP_SIDES},
            instance_loop_tokens={side: sum(run.instance_loop_tokens.get(side, 0) for run in runs) for side in LOOP_SIDES},
            gateway_p50_s=[v for run in runs for v in run.gateway_p50_s],
            direct_p50_s=[v for run in runs for v in run.direct_p50_s],
        )


SIDES = ("engine", "instance", "gateway")
LOOP_SIDES = ("instance", "gateway")  # the sides that run on the instance process


def geometric_mean_interval(ratios: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """The geometric mean of paired ratios and a t-interval for it, computed on their logarithms."""
    logs = [math.log(r) for r in ratios]
    mean = statistics.fmean(logs)
    half = stats.t.ppf((1 + confidence) / 2, len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def report(figures: Figures, logprobs: bool = True) -> None:
    print(f"\n{figures.title}")
    for facts in {json.dumps(m, sort_keys=True): m for m in figures.machines}.values():
        print(describe_machine(facts))
    medians = {side: statistics.median(values) for side, values in figures.tokens_per_s.items()}
    rows = [
        (f"engine API alone (in process, log-probs {'on' if logprobs else 'off'})", "engine"),
        ("instance direct (`/invocations`, Unix socket)", "instance"),
        (f"gateway `{figures.route}`", "gateway"),
    ]
    print("\n| path | tokens/s (median) | TTFT p50 (median) | runs |\n| --- | ---: | ---: | ---: |")
    for name, side in rows:
        ttft = statistics.median(figures.ttft_p50_s[side])
        print(f"| {name} | {medians[side]:.1f} | {ttft:.3f} s | {len(figures.tokens_per_s[side])} |")
    print(f"\ngateway / engine tokens/s (medians): {medians['gateway'] / medians['engine']:.3f} (target >= 0.97)")
    print(f"gateway / instance direct tokens/s (medians): {medians['gateway'] / medians['instance']:.3f}")
    gateway = figures.tokens_per_s["gateway"]
    for other in ("engine", "instance"):
        paired = [g / o for g, o in zip(gateway, figures.tokens_per_s[other])]
        interval = engine_bench.median_interval(paired)
        shown = f", 95% interval {interval[0]:.3f}-{interval[1]:.3f}" if interval else ""
        print(f"per-repeat gateway / {other}: {', '.join(f'{r:.3f}' for r in paired)}")
        print(f"  median {statistics.median(paired):.3f}{shown}")
        if len(paired) > 2:
            mean, low, high = geometric_mean_interval(paired)
            print(f"  geometric mean {mean:.3f}, 95% t-interval {low:.3f}-{high:.3f}")
    if figures.gateway_tokens:
        print(f"gateway process CPU: {figures.gateway_cpu_s * 1000 / figures.gateway_tokens:.2f} ms per streamed token "
              f"({figures.gateway_cpu_s:.1f} s over {figures.gateway_tokens} tokens; the machine has {os.cpu_count()} "
              f"cores); the client's: {figures.client_cpu_s * 1000 / figures.gateway_tokens:.2f} ms")
    per_token = {
        side: figures.instance_loop_cpu_s[side] * 1000 / tokens
        for side, tokens in figures.instance_loop_tokens.items() if tokens
    }
    if per_token.keys() == set(LOOP_SIDES):
        print(f"instance event-loop thread CPU: {per_token['instance']:.3f} ms per token called directly, "
              f"{per_token['gateway']:.3f} ms behind the gateway")
    if figures.gateway_p50_s:
        via, direct = statistics.median(figures.gateway_p50_s), statistics.median(figures.direct_p50_s)
        print(f"small request p50: {via * 1000:.1f} ms via gateway, {direct * 1000:.1f} ms direct; "
              f"the gateway adds {(via - direct) * 1000:.1f} ms")


def main(argv=None) -> None:
    options = parse_options(argv)
    if options.pool:
        runs = [Figures(**json.loads(path.read_text())) for path in options.pool]
        report(Figures.pooled(runs))
        return
    figures = measure_all(options)
    report(figures, logprobs=not options.engine_without_logprobs)
    if options.save:
        options.save.write_text(json.dumps(asdict(figures), indent=1))
        print(f"saved to {options.save}")


def measure_all(options) -> Figures:
    model = resolve_model(engine_bench.MODEL_URI)
    prompts = engine_bench.PROMPTS[: options.n]
    run_dir = Path(tempfile.mkdtemp(prefix="servelet-bench-"))
    port = engine_bench.free_port()
    command = [str(Path(sys.executable).with_name("servelet")), "serve", "--model", str(model), "--port", str(port)]
    env = os.environ | {"SERVELET_THREADS": str(THREADS), "SERVELET_RUN_DIR": str(run_dir), "SERVELET_DATA_DIR": str(run_dir)}
    title = (f"N = {options.n} streams x {options.new_tokens} tokens, greedy, EOS ignored; gateway route "
             f"{ROUTES[options.route].path}; {options.repeats} alternating runs per side; {THREADS} threads; "
             f"{options.client} client")
    print(title)
    clients = CLIENTS[options.client]
    alone = EngineAlone(model, logprobs=not options.engine_without_logprobs)
    runs: dict[str, list[engine_bench.Measurement]] = {side: [] for side in SIDES}
    with engine_bench.server_process(command, f"http://127.0.0.1:{port}/ping", env):
        sides = {
            "engine": alone,
            "instance": clients.instance(run_dir / "default-AllTraffic-0.sock"),
            "gateway": clients.gateway(f"http://127.0.0.1:{port}", ROUTES[options.route]),
        }
        for runner in sides.values():
            runner.run_batch(prompts[:2], 4)  # warm-up
        gateway_pid = serve_pid(port)
        instance_pid = child_pid(gateway_pid)
        gateway_cpu, client_cpu, gateway_tokens = 0.0, 0.0, 0
        loop_cpu, loop_tokens = dict.fromkeys(LOOP_SIDES, 0.0), dict.fromkeys(LOOP_SIDES, 0)
        names = list(sides)
        for repeat in range(options.repeats):
            shift = repeat % len(names)
            for side in names[shift:] + names[:shift]:
                runner = sides[side]
                cpu_before, client_before = cpu_seconds(gateway_pid), time.thread_time()  # the client's loop: this thread
                loop_before = cpu_seconds(instance_pid, main_thread_only=True)
                timings = runner.run_batch(prompts, options.new_tokens)
                if side in loop_cpu:
                    loop_cpu[side] += cpu_seconds(instance_pid, main_thread_only=True) - loop_before
                    loop_tokens[side] += sum(t.tokens for t in timings)
                if side == "gateway":
                    gateway_cpu += cpu_seconds(gateway_pid) - cpu_before
                    client_cpu += time.thread_time() - client_before
                    gateway_tokens += sum(t.tokens for t in timings)
                cell = engine_bench.measure(timings)
                runs[side].append(cell)
                print(f"  run {repeat + 1} {side:8s} {cell.tokens_per_s:7.1f} tok/s  TTFT p50 {cell.ttft_p50_s:.3f} s")
        gateway_p50, direct_p50 = small_request_latency(
            f"http://127.0.0.1:{port}", run_dir / "default-AllTraffic-0.sock", options.pings
        )
    alone.engine.close()
    return Figures(
        title=title,
        route=ROUTES[options.route].path,
        tokens_per_s={side: [cell.tokens_per_s for cell in cells] for side, cells in runs.items()},
        ttft_p50_s={side: [cell.ttft_p50_s for cell in cells] for side, cells in runs.items()},
        gateway_cpu_s=gateway_cpu,
        client_cpu_s=client_cpu,
        gateway_tokens=gateway_tokens,
        instance_loop_cpu_s=loop_cpu,
        instance_loop_tokens=loop_tokens,
        gateway_p50_s=[gateway_p50],
        direct_p50_s=[direct_p50],
        machines=[machine()],
    )


if __name__ == "__main__":
    main()
