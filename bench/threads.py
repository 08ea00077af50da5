"""What a second thread buys one sequence: llama-cpp-python's `Llama` against servelet's `Engine`, in process.

One request (bench/engine.py's first prompt), greedy, end of text ignored, 128 new tokens, at 1 and 2 threads.
- **Llama**: the high-level API, `n_ctx` 2048, `n_threads = n_threads_batch = T`, flash attention on as the
  engine has it (`--llama-flash-attn off` is the high-level API's default), streamed, end of text masked by a
  logits processor (bench/engine.py's EndOfTextMask).
- **Engine**: `servelet.engine.Engine` with an instance's settings (`SERVELET_THREADS` = T, all else default:
  32 sequences x 2048 cells, per-sequence KV), the request submitted with its async API.

Each system runs in a process of its own (two OpenMP teams in one process slow each other down, see `Child`),
loaded once per T; runs alternate (the order rotates each repeat) so the machine's drift hits both alike, and the
Engine / Llama ratio is taken per repeat. Tokens/s is over the decode phase: from the first streamed token to the
last. Over the same window, every OS thread of the system's process is read from /proc/self/task/TID: user +
system CPU (stat, 10 ms clock ticks), time on a CPU and time runnable but waiting for one (schedstat, ns),
voluntary and involuntary context switches (status), each per generated token. `main` runs Llama (and is its
OpenMP master) or the engine's asyncio event loop; `engine thread` decodes (the OpenMP master of its own team);
the other threads are llama.cpp's OpenMP workers.

    python bench/threads.py [--threads 1,2] [--repeats 3] [--tokens 128] [--logprobs]
                            [--llama-flash-attn on|off] [--engine KEY=VALUE,...] [--openmp-at-load]
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import dataclasses
import multiprocessing
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
from llama_cpp import Llama, LogitsProcessorList

import engine as engine_bench  # bench/engine.py: prompts, token clock, end-of-text mask, tables
import machine  # bench/machine.py: the CPU and the llama.cpp build
from servelet.artifacts import resolve_model
from servelet.engine import Engine, GenerationParams
from servelet.settings import InstanceSettings

PROMPT = engine_bench.PROMPTS[0]
CLOCK_TICK_S = 1 / os.sysconf("SC_CLK_TCK")
ENGINE_TIDS: set[int] = set()  # the engine's own thread, in its process


# -- per-thread accounting ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ThreadUse:
    """One OS thread's counters (cumulative since it started, or a difference of two readings)."""

    name: str
    cpu_s: float  # utime + stime, in clock ticks (10 ms) turned to seconds
    run_s: float  # time on a CPU (schedstat, ns precision)
    wait_s: float  # time runnable but waiting for a CPU (schedstat)
    voluntary: float  # context switches: the thread blocked or slept
    involuntary: float  # context switches: the thread was preempted

    def __sub__(self, before: ThreadUse) -> ThreadUse:
        return ThreadUse(self.name, *(getattr(self, f) - getattr(before, f) for f in COUNTERS))

    def per(self, tokens: int) -> ThreadUse:
        return ThreadUse(self.name, *(getattr(self, f) / tokens for f in COUNTERS))


COUNTERS = ("cpu_s", "run_s", "wait_s", "voluntary", "involuntary")


def read_thread(task: Path) -> ThreadUse:
    name = (task / "comm").read_text().strip()
    stat = (task / "stat").read_text().rsplit(")", 1)[1].split()
    run_ns, wait_ns, _slices = (int(v) for v in (task / "schedstat").read_text().split())
    switches = {}
    for line in (task / "status").read_text().splitlines():
        if "ctxt_switches:" in line:
            key, value = line.split(":")
            switches[key] = int(value)
    return ThreadUse(
        name,
        (int(stat[11]) + int(stat[12])) * CLOCK_TICK_S,
        run_ns / 1e9,
        wait_ns / 1e9,
        switches["voluntary_ctxt_switches"],
        switches["nonvoluntary_ctxt_switches"],
    )


def thread_snapshot() -> dict[int, ThreadUse]:
    threads = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            threads[int(task.name)] = read_thread(task)
        except (OSError, ValueError):
            continue  # the thread ended while we read it
    return threads


def thread_delta(before: dict[int, ThreadUse], after: dict[int, ThreadUse]) -> dict[int, ThreadUse]:
    """What each thread did between two snapshots; a thread born in between counts from zero."""
    return {tid: use - before.get(tid, ThreadUse(use.name, 0.0, 0.0, 0.0, 0, 0)) for tid, use in after.items()}


def name_thread(tid: int, name: str) -> None:
    """Give an OS thread a name /proc shows (Python 3.11 does not name its threads)."""
    Path(f"/proc/self/task/{tid}/comm").write_text(name[:15])


# -- one run of each system -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    decode_tokens_per_s: float  # from the first token to the last
    end_to_end_tokens_per_s: float  # from submission to the last token (includes the prefill)
    threads: dict[int, ThreadUse]  # per generated token, over the decode phase
    roles: dict[int, str]  # what each thread is


class DecodeWindow:
    """Times a streamed answer and reads every thread's counters at its first and last token."""

    def __init__(self) -> None:
        self.clock = engine_bench.TokenClock()
        self.at_first: dict[int, ThreadUse] | None = None

    def count(self, tokens: int) -> None:
        self.clock.count(tokens)
        if self.at_first is None and self.clock.tokens:
            self.at_first = thread_snapshot()

    def run(self) -> Run:
        after = thread_snapshot()
        timing = self.clock.timing("the answer")
        steps = timing.tokens - 1
        if self.at_first is None or steps < 1:
            raise RuntimeError("fewer than two tokens: no decode phase to measure")
        used = thread_delta(self.at_first, after)
        return Run(
            steps / (timing.last_token - timing.first_token),
            timing.tokens / (timing.last_token - timing.submitted),
            {tid: use.per(steps) for tid, use in used.items()},
            {tid: thread_role(tid, use.name) for tid, use in used.items()},
        )


class LlamaSystem:
    name = "Llama"

    def __init__(self, model: Path, threads: int, flash_attn: bool):
        self.llm = Llama(
            str(model),
            n_ctx=engine_bench.CONTEXT_TOKENS,
            n_threads=threads,
            n_threads_batch=threads,
            flash_attn=flash_attn,
            verbose=False,
        )
        self.end_of_text_ids = engine_bench.SequentialLlama(self.llm).end_of_text_ids

    def run(self, prompt: str, tokens: int) -> Run:
        mask = engine_bench.EndOfTextMask(self.end_of_text_ids)
        self.llm.reset()  # no reuse of the previous run's KV
        window = DecodeWindow()
        chunks = self.llm.create_completion(
            prompt, max_tokens=tokens, temperature=0, stop=[], stream=True, logits_processor=LogitsProcessorList([mask])
        )
        for _chunk in chunks:
            window.count(mask.sampled)
        return window.run()

    def close(self) -> None:
        self.llm.close()


class EngineSystem:
    name = "Engine"

    def __init__(self, model: Path, threads: int, logprobs: bool, overrides: dict[str, int]):
        config = dataclasses.replace(InstanceSettings(threads=threads).engine_config(), **overrides)
        self.engine = Engine(model, config)
        self.logprobs = logprobs
        ENGINE_TIDS.add(self.engine._thread.native_id)
        name_thread(self.engine._thread.native_id, "servelet-engine")

    def run(self, prompt: str, tokens: int) -> Run:
        return asyncio.run(self._one(prompt, tokens))

    async def _one(self, prompt: str, tokens: int) -> Run:
        window = DecodeWindow()
        params = GenerationParams(max_new_tokens=tokens, ignore_eos=True)
        async for _token in self.engine.submit(prompt, params, logprobs=self.logprobs):
            window.count(window.clock.tokens + 1)
        return window.run()

    def close(self) -> None:
        self.engine.close()


# -- the run: each system in a process of its own -------------------------------------------------------------
#
# libgomp counts the threads of all OpenMP teams in a process (gomp_managed_threads): once they outnumber the
# cores, every team's barriers spin 100 rounds instead of 300,000 and then sleep in the kernel. Llama's team (on
# the main thread) and the engine's (on its own thread) in one process would do that to each other.


@dataclass(frozen=True)
class SystemSpec:
    name: str  # "Llama" or "Engine"
    threads: int
    options: argparse.Namespace


def build(spec: SystemSpec, model: Path):
    if spec.options.openmp_at_load:
        run_openmp_region_at_load()
    if spec.name == "Llama":
        return LlamaSystem(model, spec.threads, spec.options.llama_flash_attn == "on")
    return EngineSystem(model, spec.threads, spec.options.logprobs, spec.options.engine)


def serve(spec: SystemSpec, model: Path, conn) -> None:
    """A child process: build the system, warm it up, then answer each token count sent with a Run until "stop"."""
    name_thread(os.getpid(), "bench-main")
    system = build(spec, model)
    try:
        system.run(PROMPT, 16)  # warm-up: OpenMP team, buffers, page cache
        conn.send("ready")
        while (message := conn.recv()) != "stop":
            conn.send(system.run(PROMPT, message))
    finally:
        system.close()


def run_openmp_region_at_load() -> None:
    """Make every model load first run one empty OpenMP parallel region (as many threads as cores) on the loading
    thread, as the AMX build's weight conversion does (ggml-cpu/amx/common.h parallel_for): that thread then owns
    an OpenMP team of its own. A simulation for machines without AMX."""
    gomp = ctypes.CDLL("libgomp.so.1")  # the copy llama.cpp's libggml-cpu already loaded
    region = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(lambda _data: None)
    load = llama_cpp.llama_model_load_from_file

    def load_after_region(*args):
        gomp.GOMP_parallel(region, None, 0, 0)  # what `#pragma omp parallel` compiles to; 0: default threads
        return load(*args)

    load_after_region.region = region  # the callback must outlive every call
    llama_cpp.llama_model_load_from_file = load_after_region


class Child:
    """One system in its own process (spawned, so no OpenMP state is inherited)."""

    def __init__(self, spec: SystemSpec, model: Path):
        context = multiprocessing.get_context("spawn")
        self.name = spec.name
        self.conn, child_conn = context.Pipe()
        self.process = context.Process(target=serve, args=(spec, model, child_conn), daemon=True)
        self.process.start()
        if self.conn.recv() != "ready":
            raise RuntimeError(f"{spec.name} did not start")

    def run(self, tokens: int) -> Run:
        self.conn.send(tokens)
        return self.conn.recv()

    def close(self) -> None:
        if self.process.is_alive():
            self.conn.send("stop")
        self.process.join(timeout=30)


Results = dict[int, dict[str, list[Run]]]  # threads -> system -> runs


def benchmark(model: Path, options: argparse.Namespace) -> Results:
    results: Results = {}
    for threads in options.threads:
        print(f"\nT = {threads}", flush=True)
        children: list[Child] = []
        try:
            for name in ("Llama", "Engine"):
                children.append(Child(SystemSpec(name, threads, options), model))
            results[threads] = {child.name: [] for child in children}
            for repeat in range(options.repeats):
                shift = repeat % len(children)
                for child in children[shift:] + children[:shift]:
                    run = child.run(options.tokens)
                    results[threads][child.name].append(run)
                    print(
                        f"  {child.name:<7} T={threads} run {repeat + 1}: {run.decode_tokens_per_s:6.1f} tok/s decode, "
                        f"{run.end_to_end_tokens_per_s:6.1f} end to end",
                        flush=True,
                    )
        finally:
            for child in children:
                child.close()
    return results


# -- the report -----------------------------------------------------------------------------------------------


def values(runs: list[Run], field: str) -> str:
    ordered = [getattr(run, field) for run in runs]
    return f"{statistics.median(ordered):.1f} ({', '.join(f'{v:.1f}' for v in ordered)})"


def throughput_table(results: Results) -> str:
    rows = []
    for threads, by_system in results.items():
        llama, ours = by_system["Llama"], by_system["Engine"]
        paired = [e.decode_tokens_per_s / l.decode_tokens_per_s for e, l in zip(ours, llama)]
        rows.append([
            str(threads),
            values(llama, "decode_tokens_per_s"),
            values(ours, "decode_tokens_per_s"),
            f"{statistics.median(paired):.2f} ({', '.join(f'{r:.2f}' for r in paired)})",
            values(llama, "end_to_end_tokens_per_s"),
            values(ours, "end_to_end_tokens_per_s"),
        ])
    header = [
        "T",
        "Llama decode tok/s, median (runs)",
        "Engine decode tok/s",
        "Engine / Llama, paired",
        "Llama end to end tok/s",
        "Engine end to end tok/s",
    ]
    return engine_bench.markdown(header, rows)


def scaling_line(results: Results) -> str | None:
    if len(results) < 2:
        return None
    low, high = min(results), max(results)
    parts = []
    for system in ("Llama", "Engine"):
        a = statistics.median(r.decode_tokens_per_s for r in results[low][system])
        b = statistics.median(r.decode_tokens_per_s for r in results[high][system])
        parts.append(f"{system} {b / a:.2f}x")
    return f"decode tok/s at T = {high} over T = {low} (medians): " + ", ".join(parts)


def thread_table(results: Results) -> str:
    """Per thread, medians over the repeats of each per-token figure; threads idle in the window are left out."""
    rows = []
    for threads, by_system in results.items():
        for system, runs in by_system.items():
            tids = sorted({tid for run in runs for tid in run.threads})
            for tid in tids:
                uses = [run.threads[tid] for run in runs if tid in run.threads]
                if max(use.run_s for use in uses) < 1e-6:
                    continue
                role = next(run.roles[tid] for run in runs if tid in run.roles)
                med = lambda f: statistics.median(getattr(u, f) for u in uses)  # noqa: E731
                rows.append([
                    str(threads),
                    system,
                    f"{role} ({tid})",
                    f"{med('cpu_s') * 1e3:.2f}",
                    f"{med('run_s') * 1e3:.2f}",
                    f"{med('wait_s') * 1e3:.3f}",
                    f"{med('voluntary'):.2f}",
                    f"{med('involuntary'):.3f}",
                ])
            total = [sum(use.run_s for use in run.threads.values()) for run in runs]
            rows.append([str(threads), system, "all threads", "", f"{statistics.median(total) * 1e3:.2f}", "", "", ""])
    header = [
        "T",
        "system",
        "thread (tid)",
        "CPU ms/token (stat)",
        "on-CPU ms/token (schedstat)",
        "runnable, waiting ms/token",
        "voluntary switches/token",
        "involuntary switches/token",
    ]
    return engine_bench.markdown(header, rows)


def thread_role(tid: int, name: str) -> str:
    """main, the engine's thread, or one of llama.cpp's OpenMP workers (nothing else starts threads here), shown
    with its name: Linux gives a new thread its creator's name at that moment."""
    if tid == os.getpid():
        return "main"
    if tid in ENGINE_TIDS:
        return "engine thread"
    return f"OpenMP worker ({name})"


def parse_options(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=engine_bench.int_list, default=[1, 2], help="thread counts, e.g. 1,2")
    parser.add_argument("--repeats", type=int, default=3, help="runs per system and thread count")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per run")
    parser.add_argument("--logprobs", action="store_true", help="the engine also computes each token's log-prob")
    parser.add_argument("--llama-flash-attn", choices=("on", "off"), default="on")
    parser.add_argument(
        "--openmp-at-load",
        action="store_true",
        help="each model load first runs an OpenMP region on the loading thread, as the AMX build's weight "
        "conversion does (a simulation for machines without AMX)",
    )
    parser.add_argument(
        "--engine",
        type=engine_overrides,
        default={},
        help="EngineConfig fields to override, e.g. max_batch_size=1,max_model_len=2048",
    )
    options = parser.parse_args(argv)
    if options.tokens < 2:
        parser.error("--tokens: at least 2 (the decode phase starts at the first token)")
    return options


def engine_overrides(text: str) -> dict[str, int]:
    known = {f.name for f in dataclasses.fields(InstanceSettings(threads=1).engine_config())}
    overrides = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, _, value = item.partition("=")
        if key not in known or not value:
            raise argparse.ArgumentTypeError(f"KEY=VALUE with KEY one of {', '.join(sorted(known))}")
        overrides[key] = float(value) if "." in value else int(value)
    return overrides


def main(argv: list[str] | None = None) -> None:
    options = parse_options(argv)
    model = resolve_model(engine_bench.MODEL_URI)
    name_thread(os.getpid(), "bench-main")
    print(machine.describe(machine.machine()))
    print(
        f"model {model.name}; one sequence, {options.tokens} new tokens, greedy, end of text ignored; "
        f"Llama flash attention {options.llama_flash_attn}; engine log-probs {'on' if options.logprobs else 'off'}; "
        f"engine overrides {options.engine or 'none'}; OpenMP region at load {'on' if options.openmp_at_load else 'off'}; "
        f"{options.repeats} alternating runs per system and T; each system in a process of its own"
    )
    started = time.perf_counter()
    results = benchmark(model, options)
    print("\n" + throughput_table(results))
    if line := scaling_line(results):
        print("\n" + line)
    print("\nPer thread, decode phase, per generated token (medians over the runs):\n")
    print(thread_table(results))
    print(f"\n{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
