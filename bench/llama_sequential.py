"""llama-cpp-python's high-level `Llama` answering a batch's requests one after another, as a single-user app does.

bench/engine.py runs it in-process on the installed bindings (system `llama`) and, so the stock bindings can be
measured with the very same code, as a worker in their own environment (system `llama-stock`, bench/llama_stock.py).
The worker speaks JSON lines: it loads the model, says `{"ready": VERSION, "system_info": ...}`, then answers each
`{"prompts": [...], "new_tokens": N}` with `{"timings": [...]}`, one RequestTiming per prompt, read on its own clock.
Standard library, numpy and llama_cpp only: that environment holds nothing else.

    python bench/llama_sequential.py MODEL THREADS CONTEXT_TOKENS     # the worker
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

import llama_cpp
import numpy as np
from llama_cpp import Llama, LogitsProcessorList


@dataclass(frozen=True)
class RequestTiming:
    """One request's clock readings (time.perf_counter) and the tokens it generated."""

    submitted: float
    first_token: float
    last_token: float
    tokens: int


class EndOfTextMask:
    """A logits processor that rules out end-of-generation tokens (like ignore_eos) and counts the samples."""

    def __init__(self, end_of_text_ids: np.ndarray):
        self.end_of_text_ids = end_of_text_ids
        self.sampled = 0

    def __call__(self, _input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        self.sampled += 1
        scores[self.end_of_text_ids] = -np.inf
        return scores


class SequentialLlama:
    """The way a single-user app calls `Llama`: the batch's requests all arrive at once and are answered in turn."""

    def __init__(self, llm: Llama):
        self.llm = llm
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        self.end_of_text_ids = np.array([t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)])

    def run_batch(self, prompts: tuple[str, ...], new_tokens: int) -> list[RequestTiming]:
        arrived = time.perf_counter()  # so each TTFT includes the wait for the requests answered before it
        return [self._answer(prompt, new_tokens, arrived) for prompt in prompts]

    def _answer(self, prompt: str, new_tokens: int, arrived: float) -> RequestTiming:
        mask = EndOfTextMask(self.end_of_text_ids)
        # Without a reset, Llama reuses the KV of a shared prefix with the previous prompt; the servers are
        # asked not to (cache_prompt false), so every prompt is prefilled in full here too.
        self.llm.reset()
        chunks = self.llm.create_completion(
            prompt,
            max_tokens=new_tokens,
            temperature=0,
            stop=[],
            stream=True,
            logits_processor=LogitsProcessorList([mask]),
        )
        first_token = 0.0
        for _chunk in chunks:
            first_token = first_token or time.perf_counter()
        return RequestTiming(arrived, first_token, time.perf_counter(), mask.sampled)


@contextmanager
def open_llama(model: Path, threads: int, context_tokens: int) -> Iterator[SequentialLlama]:
    llm = Llama(str(model), n_threads=threads, n_threads_batch=threads, n_ctx=context_tokens, verbose=False)
    try:
        yield SequentialLlama(llm)
    finally:
        llm.close()


def serve(runner: SequentialLlama, requests: TextIO, replies: TextIO) -> None:
    """Answer request lines until the input ends."""
    for line in requests:
        request = json.loads(line)
        timings = runner.run_batch(tuple(request["prompts"]), request["new_tokens"])
        replies.write(json.dumps({"timings": [asdict(timing) for timing in timings]}) + "\n")
        replies.flush()


def main(argv: list[str]) -> None:
    model, threads, context_tokens = Path(argv[0]), int(argv[1]), int(argv[2])
    # The replies keep stdout to themselves: anything else printing there (llama.cpp included) goes to stderr.
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    with open_llama(model, threads, context_tokens) as runner:
        info = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
        replies.write(json.dumps({"ready": llama_cpp.__version__, "system_info": info}) + "\n")
        replies.flush()
        serve(runner, sys.stdin, replies)


if __name__ == "__main__":
    main(sys.argv[1:])
