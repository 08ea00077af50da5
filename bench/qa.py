"""Question answering (issue 18): how often the QA route's answer is right, and how long it takes.

Why: a span that is copied from the context is only useful if it is the span that answers. This asks every question
of bench/data/qa.jsonl (question, context, acceptable answers: written by hand for this, each answer an exact
substring of its context) through the real `POST /question` route of a `servelet serve` it starts with the default
model (Gemma 3 270M), and scores the answers as SQuAD does: each answer and each reference normalised (lower case,
punctuation and the articles a/an/the dropped, whitespace collapsed), exact match and token F1, the best over the
references, averaged over the questions. Also counted: answers that are not `context[start:end]` (must be 0) and
empty answers. Latency per question (p50 / p90) is taken at 1 client (the whole set in order; these answers are the
ones scored) and at 8 concurrent clients (the whole set again, split between them).

Before and after a change: run the same script with the older code first on the path (the gateway it starts
inherits PYTHONPATH), label each run and keep its JSON:

    python bench/qa.py [--quick] [--label NAME] [--json PATH] [--clients 8]
    git worktree add --detach /tmp/qa-before 5c7a0e4
    cd bench && PYTHONPATH=/tmp/qa-before/src ../.venv/bin/python qa.py --label before --json /tmp/qa-before.json

`--quick`: the first 10 questions, 1 client (a check of the script in about a minute).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import string
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import httpx

import engine as engine_bench  # bench/engine.py: the default model, ports, a server process until the block ends
from machine import describe as describe_machine
from machine import machine
from servelet.artifacts import resolve_model

DATA = Path(__file__).with_name("data") / "qa.jsonl"
QUICK_QUESTIONS = 10
PUNCTUATION = frozenset(string.punctuation)
TIMEOUT = httpx.Timeout(300.0, connect=10.0)  # one answer on a loaded 2-core machine, queued behind 7 others


@dataclass(frozen=True)
class Item:
    question: str
    context: str
    answers: tuple[str, ...]


@dataclass
class Asked:
    """One question's answer from the route, and how long the route took to give it."""

    item: Item
    answer: str
    start: int
    end: int
    score: float
    seconds: float

    @property
    def is_span(self) -> bool:
        return self.item.context[self.start:self.end] == self.answer

    @property
    def exact(self) -> float:
        return max(float(normalise(self.answer) == normalise(truth)) for truth in self.item.answers)

    @property
    def f1(self) -> float:
        return max(token_f1(self.answer, truth) for truth in self.item.answers)


def load_items(path: Path = DATA) -> list[Item]:
    """The evaluation set; a reference that is not a substring of its context is a mistake in the set, refused."""
    items = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        row = json.loads(line)
        item = Item(row["question"], row["context"], tuple(row["answers"]))
        missing = [answer for answer in item.answers if answer not in item.context]
        if not item.answers or missing:
            raise ValueError(f"{path}:{number}: answers not found in the context: {missing or 'none listed'}")
        items.append(item)
    return items


# -- SQuAD's scoring (the official v1.1 script's normalisation, exact match and token F1) --------------------------

def normalise(text: str) -> str:
    text = "".join(char for char in text.lower() if char not in PUNCTUATION)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def token_f1(answer: str, truth: str) -> float:
    said, wanted = normalise(answer).split(), normalise(truth).split()
    common = sum((Counter(said) & Counter(wanted)).values())
    if common == 0:
        return float(said == wanted)  # both empty: a match
    precision, recall = common / len(said), common / len(wanted)
    return 2 * precision * recall / (precision + recall)


# -- asking the route ------------------------------------------------------------------------------------------------

@contextmanager
def gateway() -> Iterator[str]:
    """`servelet serve` with the default model, in a run and data folder of its own; yields its base URL."""
    model = resolve_model(engine_bench.MODEL_URI)
    port = engine_bench.free_port()
    with tempfile.TemporaryDirectory(prefix="servelet-bench-qa-") as folder:
        env = os.environ | {"SERVELET_RUN_DIR": folder, "SERVELET_DATA_DIR": folder,
                            "SERVELET_THREADS": str(engine_bench.THREADS)}
        command = [str(Path(sys.executable).with_name("servelet")), "serve", "--model", str(model), "--port", str(port)]
        with engine_bench.server_process(command, f"http://127.0.0.1:{port}/ping", env):
            yield f"http://127.0.0.1:{port}"


async def ask(client: httpx.AsyncClient, item: Item) -> Asked:
    began = time.perf_counter()
    response = await client.post("/question", json={"question": item.question, "context": item.context})
    seconds = time.perf_counter() - began
    response.raise_for_status()
    body = response.json()
    return Asked(item, body["answer"], body["start"], body["end"], body["score"], seconds)


async def ask_all(url: str, items: list[Item], clients: int) -> list[Asked]:
    """Every item once, `clients` at a time, each client sending its next question when its last answer came."""
    waiting = list(reversed(items))
    asked: list[Asked] = []

    async def one_client(client: httpx.AsyncClient) -> None:
        while waiting:
            asked.append(await ask(client, waiting.pop()))

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT, limits=limits) as client:
        await ask(client, items[0])  # warm-up, not counted: the first request pays for connections and caches
        await asyncio.gather(*(one_client(client) for _ in range(clients)))
    order = {id(item): index for index, item in enumerate(items)}
    return sorted(asked, key=lambda one: order[id(one.item)])


# -- figures -----------------------------------------------------------------------------------------------------------

def percentile(values: list[float], share: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[round(share * 100) - 1] if len(values) > 1 else values[0]


def latency(asked: list[Asked]) -> dict:
    seconds = [one.seconds for one in asked]
    return {"questions": len(seconds), "p50_s": round(percentile(seconds, 0.5), 3),
            "p90_s": round(percentile(seconds, 0.9), 3)}


def accuracy(asked: list[Asked]) -> dict:
    return {"questions": len(asked),
            "exact_match": round(100 * statistics.fmean(one.exact for one in asked), 1),
            "f1": round(100 * statistics.fmean(one.f1 for one in asked), 1),
            "not_a_span": sum(not one.is_span for one in asked),
            "empty": sum(not one.answer for one in asked)}


def answers_record(asked: list[Asked]) -> list[dict]:
    return [{"question": one.item.question, "answer": one.answer, "references": list(one.item.answers),
             "exact": one.exact, "f1": round(one.f1, 3), "score": one.score, "seconds": round(one.seconds, 3)}
            for one in asked]


def parse_options(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"the first {QUICK_QUESTIONS} questions, 1 client")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients of the second pass (default 8)")
    parser.add_argument("--label", default="current", help="names this run in the JSON (before, after, ...)")
    parser.add_argument("--json", type=Path, help="write the figures and every answer here")
    options = parser.parse_args(argv)
    if options.clients < 1:
        parser.error("--clients must be at least 1")
    return options


def main(argv: list[str] | None = None) -> None:
    options = parse_options(argv)
    items = load_items()[:QUICK_QUESTIONS] if options.quick else load_items()
    facts = machine()
    print(describe_machine(facts), flush=True)
    print(f"{options.label}: {len(items)} questions through POST /question", flush=True)
    load_at_start = round(os.getloadavg()[0], 2)  # a shared machine's other work, beside the figures
    with gateway() as url:
        alone = asyncio.run(ask_all(url, items, 1))
        print(f"1 client: {len(alone)} answers, {sum(one.seconds for one in alone):.0f} s", flush=True)
        together = None if options.quick else asyncio.run(ask_all(url, items, options.clients))
    figures = {"label": options.label, "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "machine": facts, "load_average_1m": {"start": load_at_start, "end": round(os.getloadavg()[0], 2)}, "accuracy": accuracy(alone), "latency": {"1": latency(alone)}}
    if together is not None:
        figures["latency"][str(options.clients)] = latency(together)
        figures["accuracy_concurrent"] = accuracy(together)
    for one in alone:
        mark = "ok " if one.exact else ("~  " if one.f1 else "no ")
        print(f"{mark}{one.item.question!r} -> {one.answer!r} (score {one.score:.3f}, {one.seconds:.2f} s)")
    print(json.dumps({key: figures[key] for key in figures if key != "machine"}, indent=2))
    if options.json:
        options.json.write_text(json.dumps(figures | {"answers": answers_record(alone)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
