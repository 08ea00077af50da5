"""Text generation on a causal language model, through the same token interface as the llama.cpp engine.

`GenerationEngine.submit` returns the engine's own `Generation`, so `lmi.py` serves it
unchanged: `{"inputs", "parameters", "stream"}` in, `{"generated_text"}` or JSON lines of tokens out. Generations
run one at a time in one worker thread (a forward pass already uses every core the instance has); up to
`max_waiting` more wait their turn, beyond that `submit` raises Overloaded (429). Stop sequences, finish reasons,
streamed text and timings come from the engine's own `Sequence`, so both runtimes end a generation alike.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from ...engine.errors import EngineStopped, InvalidRequest, Overloaded
from ...engine.generation import Generation
from ...engine.params import GenerationParams, allowed_new_tokens
from ...engine.sequence import Finished, FinishReason, Sequence, Token
from ...prompt_spans import hf_tokens
from ...settings import InstanceSettings
from ..lmi import TextGenerationRuntime
from .decoding import Detokenizer, Sampler
from .folder import load_model, load_tokenizer

log = logging.getLogger("servelet.runtimes.transformers")

@dataclass
class Job:
    """A generation for the worker thread: its sequence, and how to hand an event to the waiting coroutine."""

    seq: Sequence
    post: Callable[[Token | Finished], None]


def poster(loop: asyncio.AbstractEventLoop, events: asyncio.Queue) -> Callable[[Token | Finished], None]:
    """A function the worker thread calls to put an event on a queue of `loop`."""

    def post(event: Token | Finished) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    return post


class GenerationEngine:
    """One causal LM generating for one request at a time; a TokenEngine for lmi.py."""

    def __init__(self, model, tokenizer, context_length: int, max_waiting: int, max_tokens_per_request: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.context_length, self.max_waiting = context_length, max_waiting
        self.max_tokens_per_request = max_tokens_per_request
        eos = model.generation_config.eos_token_id
        self.eos_ids = {*(eos if isinstance(eos, list) else [eos]), tokenizer.eos_token_id} - {None}
        self._ids = itertools.count(1)
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._in_engine = 0  # submitted and not finished, guarded by _lock
        self._running = False
        self._stopping = False
        self.counters = {"tokens_generated": 0, "prompt_tokens": 0, "cancelled": 0}
        self._thread = threading.Thread(target=self._run, name="servelet-generate", daemon=True)
        self._thread.start()

    def submit(self, prompt: str, params: GenerationParams | None = None, *, logprobs: bool = False) -> Generation:
        """Queue a generation; raises InvalidRequest / ContextOverflow / Overloaded before it starts."""
        params = params or GenerationParams()
        if self._stopping:
            raise EngineStopped("the engine is shutting down")
        try:
            tokens = hf_tokens(self.tokenizer, prompt, params.literal_spans) if prompt else []
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        if not tokens:
            raise InvalidRequest("inputs must not be empty")
        max_new = allowed_new_tokens(len(tokens), params, self.context_length, self.max_tokens_per_request)
        seq = Sequence(next(self._ids), tokens, params, max_new, logprobs or params.details, sink=None)
        with self._lock:
            if self._in_engine > self.max_waiting:
                raise Overloaded(
                    f"overloaded: 1 request is generating and {self._in_engine - 1} are waiting "
                    f"(queue {self.max_waiting}); retry later"
                )
            self._in_engine += 1
        events: asyncio.Queue = asyncio.Queue()
        self._jobs.put(Job(seq, poster(asyncio.get_running_loop(), events)))
        return Generation(seq, events.get, lambda: setattr(seq, "cancelled", True))  # the worker looks before each token

    def tokenize(self, text: str) -> list[int]:
        return hf_tokens(self.tokenizer, text, [])

    def occupancy(self) -> dict:
        with self._lock:
            running = int(self._running)
            return {"running": running, "waiting": self._in_engine - running} | self.counters

    @property
    def failure(self) -> str | None:
        alive = self._stopping or self._thread.is_alive()
        return None if alive else "the generation thread is no longer running"

    def close(self) -> None:
        self._stopping = True
        self._jobs.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            with self._lock:
                self._running = True
            try:
                self._generate(job)
            except Exception as exc:  # the model failed: this request ends with the error, the next may run
                log.exception("generation %d failed", job.seq.request_id)
                stats = job.seq.stats(time.perf_counter())
                job.post(Finished(FinishReason.ERROR, job.seq.text, stats, f"the model failed: {exc}"))
            finally:
                with self._lock:
                    self._running = False
                    self._in_engine -= 1
        # Shutting down: whoever still waits is told so.
        while not self._jobs.empty():
            if (left := self._jobs.get_nowait()) is not None:
                stats = left.seq.stats(time.perf_counter())
                left.post(Finished(FinishReason.ERROR, "", stats, "the engine is shutting down"))

    @torch.inference_mode()
    def _generate(self, job: Job) -> None:
        seq = job.seq
        seq.admitted = time.perf_counter()
        sampler, text = Sampler(seq.params), Detokenizer(self.tokenizer, seq.prompt_tokens, seq.params.skip_special_tokens)
        history = list(seq.prompt_tokens)
        feed, cache = torch.tensor([seq.prompt_tokens]), None
        self.counters["prompt_tokens"] += len(seq.prompt_tokens)
        while True:  # ends: every pass accepts a token, and the sequence ends by max_new_tokens at the latest
            if seq.cancelled or self._stopping:
                if seq.cancelled:  # its client left: the tokens it still had to generate are never computed
                    self.counters["cancelled"] += 1
                job.post(Finished(FinishReason.CANCELLED, seq.text, seq.stats(time.perf_counter())))
                return
            started = time.perf_counter()
            out = self.model(input_ids=feed, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            token, logprob = sampler.choose(out.logits[0, -1].float(), history)
            if not seq.first_token_at:
                seq.first_token_at = time.perf_counter()
                seq.prefill_seconds = seq.first_token_at - started
            is_eos = token in self.eos_ids
            last = (is_eos and not seq.params.ignore_eos) or len(seq.generated) + 1 >= seq.max_new_tokens
            piece = text.add(token, final=last)
            shown, end = seq.accept(token, piece.encode(), logprob if seq.want_logprobs else None, is_eos)
            history.append(token)
            self.counters["tokens_generated"] += 1
            if end is not None:
                job.post(Finished(end, seq.text, seq.stats(time.perf_counter()), last=shown))
                return
            job.post(shown)
            feed = torch.tensor([[token]])


class GenerationRuntime(TextGenerationRuntime):
    name = "transformers"

    def __init__(self, path: Path, settings: InstanceSettings):
        self.path = path
        self.tokenizer = load_tokenizer(path)
        model = load_model(AutoModelForCausalLM, path, settings)
        super().__init__(GenerationEngine(
            model, self.tokenizer, context_length(model, settings), settings.max_waiting, settings.max_tokens_per_request
        ))

    def facts(self) -> dict:
        template = self.tokenizer.chat_template
        return super().facts() | {
            "name": self.path.name,
            "context_length": self.engine.context_length,
            "max_batch_size": 1,
            "max_tokens_per_request": self.engine.max_tokens_per_request,
            "chat_template": template if isinstance(template, str) else None,
            "bos_token": self.tokenizer.bos_token,
            "eos_token": self.tokenizer.eos_token,
        }


def context_length(model, settings: InstanceSettings) -> int:
    """The model's trained context (max_position_embeddings), or less where SERVELET_MAX_MODEL_LEN says so."""
    trained = getattr(model.config, "max_position_embeddings", None)
    if trained is None:
        return settings.max_model_len
    return min(trained, settings.max_model_len) if "max_model_len" in settings.model_fields_set else trained
