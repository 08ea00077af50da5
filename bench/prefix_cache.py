"""Prefix caching (issue 17): time to first token when prompts start the same way, servelet's engine with its prefix
cache against the same engine without it and llama.cpp's `llama-server` with `cache_prompt: true`.

Document QA: 4 documents of about 1,500 tokens (made-up places and facts: bench/prefix_cache_texts.py), 8 questions
each, the prompt being the document then the question. The 32 prompts, in an order shuffled with a seed (so one
document's questions overlap in time), are worked through by 16 concurrent clients, each sending its next prompt
when its last answer ends; greedy, 16 new tokens, end of text ignored. Systems: `servelet container` with its
default prefix cache (`cache-on`), the same with SERVELET_PREFIX_CACHE=0 (`cache-off`), and stock `llama-server`
with 16 slots of 2,048 tokens and `cache_prompt: true` (built once by bench/llama_server.py, about 7-10 minutes).
Targets: cache-on's TTFT p50 at most 0.25x cache-off's and at most 0.5x llama-server's.

Multi-turn chat: 8 clients x 6 turns through `servelet serve`'s OpenAI chat route, streamed, greedy, answers of at
most 32 tokens. Each client has a system prompt of its own (about 300 tokens), and each turn resends the whole
history plus a new user message of 50-100 tokens. TTFT is taken at the first chunk that carries text (or ends an
empty answer). Target: the median TTFT of turns 2-6 at most 0.3x turn 1's with the cache on; the cache off is run
for reference.

Fairness: the systems take turns, never side by side, in an order that rotates each repeat. Every repeat has new
texts (seeded by the repeat), so each system starts it with nothing of them cached. Ratios are paired within a
repeat; the targets read their median over the repeats. The CPU and the llama.cpp build are printed first and
saved with the figures.

    python bench/prefix_cache.py [--repeats 5] [--parts qa,chat] [--qa-systems cache-on,cache-off,llama-server]
                                 [--seed S] [--size NAME=VALUE ...] [--json PATH]
    python bench/prefix_cache.py --quick     # tiny sizes, one repeat: checks that the script works
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import httpx
import numpy as np
from llama_cpp import Llama

import engine as engine_bench  # bench/engine.py: server processes, ports, markdown tables
import llama_server as llama_server_build
from machine import describe as describe_machine
from machine import machine
from prefix_cache_clients import LLAMA_SERVER, SERVELET, Answer, ChatClients, ChatTurn, QAClients
from prefix_cache_texts import conversations, documents
from servelet.artifacts import resolve_model

THREADS = engine_bench.THREADS
QA_SYSTEMS = ("cache-on", "cache-off", "llama-server")
CHAT_SYSTEMS = ("cache-on", "cache-off")
PREFIX_CACHE_SETTING = {"cache-on": None, "cache-off": "0"}  # SERVELET_PREFIX_CACHE; None: servelet's default
QA_TARGETS = {"cache-off": 0.25, "llama-server": 0.5}  # cache-on's TTFT p50 over theirs, at most
CHAT_TARGET = 0.3  # cache-on's TTFT of the later turns over the first's, at most


@dataclass(frozen=True)
class Sizes:
    documents: int = 4
    document_tokens: int = 1500
    questions: int = 8
    qa_clients: int = 16  # also llama-server's slots
    new_tokens: int = 16
    chat_clients: int = 8
    turns: int = 6
    system_tokens: int = 300
    user_tokens: tuple[int, int] = (50, 100)
    answer_tokens: int = 32


QUICK = Sizes(documents=2, document_tokens=200, questions=2, qa_clients=2, new_tokens=4, chat_clients=2, turns=2,
              system_tokens=60, user_tokens=(30, 50), answer_tokens=4)


# -- the systems ---------------------------------------------------------------------------------------------------


def servelet_command(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("servelet")), *args]


def servelet_env(system: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "SERVELET_PREFIX_CACHE"} | {"SERVELET_THREADS": str(THREADS)}
    setting = PREFIX_CACHE_SETTING[system]
    return env | ({"SERVELET_PREFIX_CACHE": setting} if setting is not None else {}) | extra


@contextmanager
def servelet_container(system: str, model: Path, sizes: Sizes) -> Iterator[str]:
    """`servelet container` with its default settings but the prefix cache's; yields its base URL."""
    port = engine_bench.free_port()
    url = f"http://127.0.0.1:{port}"
    command = servelet_command("container", "--model", str(model), "--port", str(port))
    with engine_bench.server_process(command, f"{url}/ping", servelet_env(system)):
        yield url


@contextmanager
def llama_server(system: str, model: Path, sizes: Sizes) -> Iterator[str]:
    """Stock `llama-server`, one slot of 2,048 tokens per QA client."""
    binary = llama_server_build.ensure_binary("stock")
    port = engine_bench.free_port()
    command = llama_server_build.command(binary, model, port, THREADS, parallel=sizes.qa_clients)
    with engine_bench.server_process(command, f"http://127.0.0.1:{port}/health"):
        yield f"http://127.0.0.1:{port}"


@contextmanager
def servelet_gateway(system: str, model: Path) -> Iterator[str]:
    """`servelet serve` (the gateway and one instance) in a run and data folder of its own; yields its base URL."""
    port = engine_bench.free_port()
    with tempfile.TemporaryDirectory(prefix="servelet-bench-") as folder:
        env = servelet_env(system, SERVELET_RUN_DIR=folder, SERVELET_DATA_DIR=folder)
        command = servelet_command("serve", "--model", str(model), "--port", str(port))
        with engine_bench.server_process(command, f"http://127.0.0.1:{port}/ping", env):
            yield f"http://127.0.0.1:{port}"


QA_SERVERS = {"cache-on": servelet_container, "cache-off": servelet_container, "llama-server": llama_server}
QA_APIS = {"cache-on": SERVELET, "cache-off": SERVELET, "llama-server": LLAMA_SERVER}


def gateway_prefix_cache_lines(url: str) -> list[str]:
    """The gateway's /metrics lines about its instances' prefix caches."""
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    return [line for line in metrics.splitlines() if line.startswith("servelet_prefix_cache_")]


def prefix_cache_figures(url: str) -> dict:
    """An instance's prefix cache counters, from its /ping (empty where it has none)."""
    ping = httpx.get(f"{url}/ping", timeout=10).json()
    return {key: value for key, value in ping.items() if key.startswith("prefix_cache_")}


# -- document QA ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QARun:
    """One system answering one repeat's prompts."""

    ttft_p50_s: float
    ttft_p90_s: float
    tokens_per_s: float
    wall_s: float
    generated_tokens: int
    prompt_tokens: int  # counted with the model's tokenizer
    cached_tokens: int | None  # as the server reports them


def qa_run(answers: list[Answer], prompt_tokens: int) -> QARun:
    timings = [a.timing for a in answers]
    wall = max(t.last_token for t in timings) - min(t.submitted for t in timings)
    generated = sum(t.tokens for t in timings)
    p50, p90 = np.percentile([t.first_token - t.submitted for t in timings], [50, 90])
    said = [a.cached_tokens for a in answers]
    cached = None if None in said else sum(said)
    return QARun(float(p50), float(p90), generated / wall, wall, generated, prompt_tokens, cached)


def qa_prompts(seed: str, sizes: Sizes, count: Callable[[str], int]) -> list[str]:
    """Every question on every document, in an order shuffled with the seed."""
    made = documents(seed, sizes.documents, sizes.document_tokens, sizes.questions, count)
    prompts = [document.prompt(question) for document in made for question in document.questions]
    random.Random(f"{seed}/order").shuffle(prompts)
    return prompts


def rotated(systems: list[str], repeat: int) -> list[str]:
    shift = repeat % len(systems)
    return systems[shift:] + systems[:shift]


def document_qa(model: Path, sizes: Sizes, options: argparse.Namespace, count) -> dict:
    systems = options.qa_systems
    runs: dict[str, list[QARun]] = {system: [] for system in systems}
    same_answers: list[int] = []  # per repeat: cache-on's answers identical to cache-off's (greedy)
    differing: list[dict] = []  # the others, to read: the question and both answers
    with ExitStack() as stack:
        urls, clients = {}, {}
        for system in systems:
            print(f"{system}: starting", flush=True)
            urls[system] = stack.enter_context(QA_SERVERS[system](system, model, sizes))
            clients[system] = QAClients(urls[system], QA_APIS[system], sizes.qa_clients)
            clients[system].run(qa_prompts(f"{options.seed}/warm-up", QUICK, count), sizes.new_tokens)
        for repeat in range(options.repeats):
            prompts = qa_prompts(f"{options.seed}/repeat-{repeat}", sizes, count)
            prompt_tokens = sum(count(p) for p in prompts)
            print(f"\ndocument QA, repeat {repeat + 1}: {len(prompts)} prompts, {prompt_tokens} tokens", flush=True)
            texts = {}
            for system in rotated(systems, repeat):
                answers = clients[system].run(prompts, sizes.new_tokens)
                texts[system] = [a.text for a in answers]
                run = qa_run(answers, prompt_tokens)
                runs[system].append(run)
                cached = "-" if run.cached_tokens is None else f"{run.cached_tokens / run.prompt_tokens:.0%}"
                print(f"  {system:<13} TTFT p50 {run.ttft_p50_s:6.3f} s  p90 {run.ttft_p90_s:6.3f} s  "
                      f"{run.tokens_per_s:6.1f} tok/s  prompt tokens cached: {cached}", flush=True)
            if "cache-off" in texts:
                pairs = list(zip(prompts, texts["cache-on"], texts["cache-off"]))
                same_answers.append(sum(on == off for _, on, off in pairs))
                differing += [{"repeat": repeat, "question": prompt.rsplit("\n\n", 1)[-1], "cache-on": on, "cache-off": off}
                              for prompt, on, off in pairs if on != off]
                print(f"  cache-on's greedy answers identical to cache-off's: {same_answers[-1]} of {len(prompts)}")
        cache = prefix_cache_figures(urls["cache-on"])
    return {"runs": runs, "same_answers": same_answers, "differing_answers": differing, "prefix_cache": cache}


def qa_report(qa: dict) -> dict:
    runs = qa["runs"]
    medians = {system: {field: statistics.median(getattr(run, field) for run in system_runs)
                        for field in ("ttft_p50_s", "ttft_p90_s", "tokens_per_s")}
               for system, system_runs in runs.items()}
    rows = [[system, f"{m['ttft_p50_s']:.3f}", f"{m['ttft_p90_s']:.3f}", f"{m['tokens_per_s']:.1f}",
             cached_share(runs[system])] for system, m in medians.items()]
    print("\n### Document QA (medians over repeats)\n")
    print(engine_bench.markdown(["system", "TTFT p50 (s)", "TTFT p90 (s)", "generated tokens/s", "prompt tokens cached"], rows))
    others = [system for system in runs if system != "cache-on"]
    ratios = {f"{figure}: cache-on / {other}": paired(runs["cache-on"], runs[other], figure)
              for figure in ("ttft_p50_s", "tokens_per_s") for other in others}
    print("\npaired by repeat: median (each repeat)")
    for name, values in ratios.items():
        print(f"  {name}: {statistics.median(values):.2f}x ({', '.join(f'{v:.2f}' for v in values)})")
    for other in others:
        value = statistics.median(ratios[f"ttft_p50_s: cache-on / {other}"])
        print(verdict(f"TTFT p50 cache-on / {other}", value, QA_TARGETS[other]))
    print(f"cache-on's greedy answers identical to cache-off's, per repeat: {qa['same_answers']}")
    print(f"cache-on instance's /ping at the end: {qa['prefix_cache']}")
    return {"medians": medians, "paired_ratios": ratios}


def cached_share(runs: list[QARun]) -> str:
    if any(run.cached_tokens is None for run in runs):
        return "not reported"
    return f"{statistics.median(run.cached_tokens / run.prompt_tokens for run in runs):.0%}"


def paired(ours: list, theirs: list, field: str) -> list[float]:
    return [getattr(a, field) / getattr(b, field) for a, b in zip(ours, theirs)]


def verdict(what: str, value: float, target: float) -> str:
    return f"{what}: {value:.2f}x, target <= {target}x: {'met' if value <= target else 'NOT met'}"


# -- multi-turn chat -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatRun:
    """One system holding one repeat's conversations: turns[t][c] is client c's turn t."""

    turns: list[list[ChatTurn]]

    @property
    def first_turn_s(self) -> float:
        return statistics.median(turn.ttft_s for turn in self.turns[0])

    @property
    def later_turns_s(self) -> float:
        return statistics.median(turn.ttft_s for turns in self.turns[1:] for turn in turns)

    @property
    def later_vs_first(self) -> float:
        return self.later_turns_s / self.first_turn_s

    def cached_share(self, turns: slice) -> float:
        chosen = [turn for by_client in self.turns[turns] for turn in by_client]
        return sum(t.cached_tokens for t in chosen) / sum(t.prompt_tokens for t in chosen)


def multi_turn_chat(model: Path, sizes: Sizes, options: argparse.Namespace, count) -> dict:
    systems = list(CHAT_SYSTEMS)
    runs: dict[str, list[ChatRun]] = {system: [] for system in systems}
    same_replies: list[int] = []
    with ExitStack() as stack:
        urls, clients = {}, {}
        for system in systems:
            print(f"{system} (servelet serve): starting", flush=True)
            urls[system] = stack.enter_context(servelet_gateway(system, model))
            clients[system] = ChatClients(urls[system], sizes.answer_tokens)
            clients[system].run(chat_texts(f"{options.seed}/warm-up", QUICK, count))
        for repeat in range(options.repeats):
            talks = chat_texts(f"{options.seed}/repeat-{repeat}", sizes, count)
            print(f"\nmulti-turn chat, repeat {repeat + 1}: {len(talks)} clients x {sizes.turns} turns", flush=True)
            for system in rotated(systems, repeat):
                by_client = clients[system].run(talks)
                run = ChatRun([list(turns) for turns in zip(*by_client)])
                runs[system].append(run)
                print(f"  {system:<10} TTFT turn 1 {run.first_turn_s:6.3f} s  turns 2-{sizes.turns} {run.later_turns_s:6.3f} s"
                      f"  ({run.later_vs_first:.2f}x)  prompt tokens cached in turns 2-{sizes.turns}: "
                      f"{run.cached_share(slice(1, None)):.0%}", flush=True)
            on, off = runs["cache-on"][-1], runs["cache-off"][-1]
            same_replies.append(sum(a.reply == b.reply for x, y in zip(on.turns, off.turns) for a, b in zip(x, y)))
            print(f"  cache-on's greedy replies identical to cache-off's: {same_replies[-1]} of {len(talks) * sizes.turns}")
        metrics = gateway_prefix_cache_lines(urls["cache-on"])
    return {"runs": runs, "same_replies": same_replies, "metrics": metrics}


def chat_texts(seed: str, sizes: Sizes, count):
    return conversations(seed, sizes.chat_clients, sizes.turns, sizes.system_tokens, sizes.user_tokens, count)


def chat_report(chat: dict, sizes: Sizes) -> dict:
    runs = chat["runs"]
    later = f"turns 2-{sizes.turns}"
    rows = []
    for system, system_runs in runs.items():
        by_turn = [statistics.median(statistics.median(t.ttft_s for t in run.turns[turn]) for run in system_runs)
                   for turn in range(sizes.turns)]
        rows.append([system, *(f"{v:.3f}" for v in by_turn),
                     f"{statistics.median(run.later_vs_first for run in system_runs):.2f}x",
                     f"{statistics.median(run.cached_share(slice(1, None)) for run in system_runs):.0%}"])
    print("\n### Multi-turn chat (medians over repeats)\n")
    header = ["system", *(f"TTFT turn {t + 1} (s)" for t in range(sizes.turns)), f"{later} / turn 1, paired",
              f"prompt tokens cached, {later}"]
    print(engine_bench.markdown(header, rows))
    ratios = {system: [run.later_vs_first for run in system_runs] for system, system_runs in runs.items()}
    for system, values in ratios.items():
        print(f"  {system} {later} / turn 1 by repeat: {', '.join(f'{v:.2f}' for v in values)}")
    print(verdict(f"TTFT {later} / turn 1, cache-on", statistics.median(ratios["cache-on"]), CHAT_TARGET))
    print(f"cache-on's greedy replies identical to cache-off's, per repeat: {chat['same_replies']}")
    print("cache-on gateway's /metrics at the end:\n  " + "\n  ".join(chat["metrics"]))
    return {"later_vs_first": ratios}


# -- the run -------------------------------------------------------------------------------------------------------


def parse_options(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="rounds of every system; medians are reported")
    parser.add_argument("--parts", default="qa,chat", help="qa, chat or both (qa,chat)")
    parser.add_argument("--qa-systems", default=",".join(QA_SYSTEMS),
                        help=f"document QA's systems, cache-on among them ({', '.join(QA_SYSTEMS)})")
    parser.add_argument("--seed", default="issue-17", help="seeds the texts (each repeat its own) and the QA order")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and one repeat: checks that the script works")
    parser.add_argument("--size", action="append", default=[], metavar="NAME=VALUE",
                        help="change one size, e.g. documents=2 or user_tokens=50,100 (names: the Sizes fields)")
    parser.add_argument("--json", type=Path, help="also write the setup and every run as JSON here")
    options = parser.parse_args(argv)
    options.parts = [p.strip() for p in options.parts.split(",") if p.strip()]
    if not options.parts or set(options.parts) - {"qa", "chat"}:
        parser.error("--parts: qa, chat or qa,chat")
    options.qa_systems = [s.strip() for s in options.qa_systems.split(",") if s.strip()]
    if "cache-on" not in options.qa_systems or set(options.qa_systems) - set(QA_SYSTEMS):
        parser.error(f"--qa-systems: cache-on and any of {', '.join(QA_SYSTEMS[1:])}")
    if options.repeats < 1:
        parser.error("--repeats: at least 1")
    if options.quick and "--repeats" not in (argv or sys.argv[1:]):
        options.repeats = 1
    try:
        options.sizes = sized(QUICK if options.quick else Sizes(), options.size)
    except ValueError as exc:
        parser.error(f"--size: {exc}")
    return options


def sized(sizes: Sizes, changes: list[str]) -> Sizes:
    """`sizes` with each NAME=VALUE of `changes` applied (positive integers; user_tokens takes LOW,HIGH)."""
    names = {f.name for f in fields(Sizes)}
    for change in changes:
        name, _, value = change.partition("=")
        if name not in names:
            raise ValueError(f"{name!r} is not a size; choose from {', '.join(sorted(names))}")
        numbers = tuple(int(v) for v in value.split(","))
        if len(numbers) != (2 if name == "user_tokens" else 1) or min(numbers) < 1:
            raise ValueError(f"{change!r}: positive integers, LOW,HIGH for user_tokens")
        sizes = replace(sizes, **{name: numbers if name == "user_tokens" else numbers[0]})
    return sizes


def main(argv: list[str] | None = None) -> None:
    options = parse_options(argv)
    signal.signal(signal.SIGTERM, engine_bench.exit_on_sigterm)  # servers stopped
    sizes = options.sizes
    model = resolve_model(engine_bench.MODEL_URI)
    vocab = Llama(str(model), vocab_only=True, verbose=False)

    def count(text: str) -> int:
        return len(vocab.tokenize(text.encode(), add_bos=False))

    setup = {"model": str(model), "threads": THREADS, "sizes": asdict(sizes), "repeats": options.repeats,
             "seed": options.seed, "parts": options.parts, "machine": machine()}
    print(describe_machine(setup["machine"]))
    print(f"model {model.name}; {THREADS} threads; {options.repeats} repeat(s); seed {options.seed!r}; sizes {sizes}")
    report: dict = {"setup": setup}
    if "qa" in options.parts:
        qa = document_qa(model, sizes, options, count)
        report["qa"] = {"runs": {s: [asdict(r) for r in rs] for s, rs in qa["runs"].items()},
                        "same_answers": qa["same_answers"], "differing_answers": qa["differing_answers"],
                        "prefix_cache": qa["prefix_cache"]}
    if "chat" in options.parts:
        chat = multi_turn_chat(model, sizes, options, count)
        report["chat"] = {"runs": {s: [asdict(r) for r in rs] for s, rs in chat["runs"].items()},
                          "same_replies": chat["same_replies"], "metrics": chat["metrics"]}
    print()
    print(describe_machine(setup["machine"]))
    if options.quick:
        print("(quick sizes: the targets below are not meant to be read)")
    if "qa" in options.parts:
        report["qa"]["summary"] = qa_report(qa)
    if "chat" in options.parts:
        report["chat"]["summary"] = chat_report(chat, sizes)
    if options.json:
        options.json.write_text(json.dumps(report, indent=1) + "\n")
        print(f"\nwrote {options.json}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted; the servers started here were stopped")
