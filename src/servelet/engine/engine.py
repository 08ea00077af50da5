"""The async face of the engine: submit a prompt, iterate its tokens; decoding runs in one thread.

llama.cpp calls release the GIL, so the event loop keeps serving HTTP while a step decodes.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..prompt_spans import tokenize_segments
from .errors import REBUILD_WITHOUT_AMX, EngineStopped, InvalidConfig, InvalidRequest, Overloaded
from .generation import Generation
from .llama import ContextShape, LlamaModel, amx_compiled
from .copy_constraint import CopyConstraint, tokens_within
from .params import GenerationParams, allowed_new_tokens
from .prefix_cache import PrefixCache
from .scheduler import Scheduler, SchedulerLimits
from .sequence import Finished, Sequence

log = logging.getLogger("servelet.engine")

# A prompt of several tokens takes llama.cpp's tiled matrix kernels (AMX's, where built), the token decoded after
# it the one-row kernels: a build that does not fit the CPU may crash in either.
WARM_UP_PROMPT = "The capital of France is"
WARM_UP_WAIT_S = 60.0
MAX_SEQUENCES = 256  # llama.cpp's LLAMA_MAX_SEQ: live sequence ids and the prefix cache's together


@dataclass(frozen=True)
class EngineConfig:
    """Limits and layout of one engine; every field is a setting (see servelet.settings)."""

    max_batch_size: int = 32
    max_model_len: int = 2048
    max_waiting: int = 128
    max_tokens_per_request: int = 4096  # the largest max_new_tokens a request may ask for
    prefill_chunk: int = 128
    max_prefill_wait: float = 2.0
    max_decode_stall: float = 1.0  # 0: running streams get a token every step, even during a prefill burst
    # None: each sequence owns max_model_len cells (fast, never preempts). A number: one pool of that many
    # cells shared by all sequences, which may then outgrow it; the youngest is preempted and recomputed.
    kv_cache_tokens: int | None = None
    # Tokens of finished sequences kept for prompts that start the same way, in whole sequences of max_model_len
    # cells (extra sequence ids of the context), at most max_batch_size of them (a short max_model_len would
    # otherwise ask for hundreds, each with llama.cpp's minimum of 256 cells); 0: off. Per-sequence cells only: a
    # unified pool has no cache yet.
    prefix_cache_tokens: int = 16384
    prompt_lookup: int = 8  # most draft tokens a greedy sequence proposes per step from its own context; 0: off
    prompt_lookup_max_batch: int = 1  # speculate only while at most this many sequences decode
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)

    @property
    def prefix_cache_slots(self) -> int:
        if self.kv_cache_tokens is not None or self.prefix_cache_tokens <= 0:
            return 0
        wanted = -(-self.prefix_cache_tokens // self.max_model_len)
        return max(0, min(wanted, self.max_batch_size, MAX_SEQUENCES - self.max_batch_size))


class Outbox:
    """Events made during a step, handed to each event loop in one wake-up rather than one per token.

    Used only by the engine thread: sinks post into it, and the engine flushes it after every step.
    """

    def __init__(self) -> None:
        self._pending: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]] = {}

    def post(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, event) -> None:
        self._pending.setdefault(loop, []).append((queue, event))

    def flush(self) -> None:
        pending, self._pending = self._pending, {}
        for loop, items in pending.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass


def _deliver(items: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, event in items:
        queue.put_nowait(event)


class EventSink:
    """Carries one generation's events from the engine thread to the coroutine that iterates them."""

    def __init__(self, loop: asyncio.AbstractEventLoop, outbox: Outbox):
        self._loop = loop
        self._outbox = outbox
        self._queue: asyncio.Queue = asyncio.Queue()

    def put(self, event) -> None:
        self._outbox.post(self._loop, self._queue, event)

    async def get(self):
        return await self._queue.get()


class Engine:
    """Continuous-batching LLM engine over one llama.cpp context."""

    def __init__(self, model: str | Path | LlamaModel, config: EngineConfig | None = None):
        """`model`: a GGUF path, or a model `prepare` opened (in a snapshot template, before the fork)."""
        self.config = config or EngineConfig()
        self._ids = itertools.count(1)
        self._outbox = Outbox()
        self._inbox: list[Sequence] = []
        self._wake = threading.Condition()
        self._in_engine = 0  # sequences submitted and not finished, guarded by _wake
        self._stopping = False
        self._failure: str | None = None
        # The engine thread loads the model as well as decoding with it: see _load.
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(model,), name="servelet-engine", daemon=True)
        self._thread.start()
        self._loaded.wait()
        if self._load_error is not None:
            self._thread.join()
            raise self._load_error

    # -- public API ---------------------------------------------------------------------------
    def submit(self, prompt: str | list[int], params: GenerationParams | None = None, *, logprobs: bool = False) -> Generation:
        """Queue a generation; raises InvalidRequest / ContextOverflow / Overloaded before it starts."""
        params = params or GenerationParams()
        if self.failure or self._stopping:
            raise EngineStopped(self.failure or "the engine is shutting down")
        tokens = self._tokens(prompt, params) if isinstance(prompt, str) else list(prompt)
        if not tokens or (isinstance(prompt, str) and not prompt):
            raise InvalidRequest("inputs must not be empty")
        max_new = allowed_new_tokens(len(tokens), params, self.max_model_len, self.config.max_tokens_per_request)
        constraint = self._copy_constraint(prompt, tokens, params) if params.answer_span is not None else None
        loop = asyncio.get_running_loop()
        sink = EventSink(loop, self._outbox)
        seq = Sequence(next(self._ids), tokens, params, max_new, logprobs or params.details, sink)
        seq.constraint = constraint
        with self._wake:
            limit = self.config.max_batch_size + self.config.max_waiting
            if self._in_engine >= limit:
                raise Overloaded(
                    f"overloaded: {self._in_engine} requests are running or waiting "
                    f"(max batch {self.config.max_batch_size} + queue {self.config.max_waiting}: SERVELET_MAX_BATCH_SIZE, "
                    "SERVELET_MAX_WAITING); retry later"
                )
            self._in_engine += 1
            self._inbox.append(seq)
            self._wake.notify()
        return Generation(seq, sink.get, lambda: self.cancel(seq))

    async def generate(self, prompt: str | list[int], params: GenerationParams | None = None) -> Finished:
        _, result = await self.submit(prompt, params).collect()
        return result

    def cancel(self, seq: Sequence) -> None:
        """Takes effect at the start of the next step (the engine thread frees the slot and cells)."""
        with self._wake:
            seq.cancelled = True
            self._wake.notify()

    def warm_up(self) -> None:
        """Generate two tokens of a short prompt before any request, so that a llama.cpp build that crashes on this
        CPU kills the instance before it reports ready rather than at a user's first request.

        It runs like any request, on the engine thread (whose thread team every decode uses); then the counters go
        back to what they were, so /ping and the metrics show no trace of it (its KV cells are freed as it ends).
        Call it from a thread without a running event loop, before submitting anything."""
        with self._wake:
            if self._in_engine:
                raise RuntimeError("warm_up: the engine already has requests; warm it up before submitting any")
            counters = replace(self.scheduler.counters)
        params = GenerationParams(max_new_tokens=2, ignore_eos=True)
        result = asyncio.run(asyncio.wait_for(self.generate(WARM_UP_PROMPT, params), WARM_UP_WAIT_S))
        if result.error:
            raise RuntimeError(
                f"the warm-up generation failed ({result.error}): the llama.cpp build may not fit this CPU; rebuild it "
                f"without AMX with `{REBUILD_WITHOUT_AMX}`"
            )
        deadline = time.monotonic() + WARM_UP_WAIT_S
        while time.monotonic() < deadline:
            with self._wake:  # the engine thread counts a finished request out after its client heard of it
                if not self._in_engine:
                    self.scheduler.counters = counters  # no step runs while we hold the lock with nothing in flight
                    return
            time.sleep(0.001)
        raise RuntimeError(f"warm_up: the engine did not settle within {WARM_UP_WAIT_S:.0f} s")

    def _copy_constraint(self, prompt: str | list[int], tokens: list[int], params: GenerationParams) -> CopyConstraint:
        span = params.answer_span
        if not isinstance(prompt, str):
            raise InvalidRequest("answer_span: give the prompt as text (its character range is what is copied from)")
        if span[1] > len(prompt):
            raise InvalidRequest(f"answer_span: [{span[0]}, {span[1]}) runs past the prompt's {len(prompt)} characters")
        if params.sampling or params.penalised:
            raise InvalidRequest("answer_span: the answer is copied greedily; leave temperature, sampling and penalties out")
        covered = tokens_within(prompt, span, self.model.text_pieces(tokens, prompt))
        if covered is None:
            raise InvalidRequest("answer_span: the prompt's tokens do not spell its text, so the span cannot be found")
        return CopyConstraint(tokens[covered[0] : covered[1]], self.model.answer_end_tokens)

    def tokenize(self, text: str) -> list[int]:
        return self.model.tokenize(text)

    def _tokens(self, prompt: str, params: GenerationParams) -> list[int]:
        """The prompt's tokens; its literal spans (a user's text) without special-token parsing."""
        try:
            return tokenize_segments(prompt, params.literal_spans, lambda text, first, literal: self.model.tokenize(
                text, add_special=first, parse_special=not literal))
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None

    @property
    def steps(self) -> int:
        return self.scheduler.counters.steps

    @property
    def failure(self) -> str | None:
        """Why the engine can generate no more (a step failed, or its thread is gone), None while it can: the
        instance's /ping answers 503 with it, so the gateway replaces the instance."""
        if self._failure is None and not self._stopping and not self._thread.is_alive():
            return "the engine thread is no longer running"
        return self._failure

    def occupancy(self) -> dict:
        """Running and waiting counts for metrics and health (read without locking; approximate)."""
        return {
            "running": len(self.scheduler.live),
            "waiting": len(self.scheduler.waiting) + len(self._inbox),
            "steps": self.scheduler.counters.steps,
            "preemptions": self.scheduler.counters.preemptions,
            "cancelled": self.scheduler.counters.cancelled,
            "tokens_generated": self.scheduler.counters.tokens_generated,
            "prompt_tokens": self.scheduler.counters.prompt_tokens,
            "draft_tokens": self.scheduler.counters.draft_tokens,
            "accepted_draft_tokens": self.scheduler.counters.accepted_draft_tokens,
        } | self.prefix_cache_figures()

    def prefix_cache_figures(self) -> dict:
        cache = self.scheduler.prefix_cache
        if cache is None:
            return {}
        counters = cache.counters
        return {
            "prefix_cache_lookups": counters.lookups,
            "prefix_cache_hits": counters.hits,
            "prefix_cache_cached_tokens": counters.cached_tokens,
            "prefix_cache_evictions": counters.evicted,
            "prefix_cache_held_tokens": cache.held_tokens,
            "prefix_cache_capacity_tokens": cache.capacity * self.max_model_len,
        }

    def close(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)
        self.model.close()

    # -- internals ----------------------------------------------------------------------------

    @staticmethod
    def prepare(model_path: str | Path, config: EngineConfig) -> LlamaModel | None:
        """The model loaded and its context opened (KV cells allocated, no token in them), for a snapshot template
        to fork instances from; None where that cannot be done without threads: an AMX build converts the weights
        with a team of OpenMP threads, which a forked child does not get, so its instances load after the fork."""
        if amx_compiled():
            log.info("this llama.cpp build has AMX, which loads the weights with a team of threads: the template "
                     "imports llama.cpp but its instances load the model themselves after the fork")
            return None
        return open_model(model_path, config)

    def _load(self, model: str | Path | LlamaModel) -> None:
        """Load the model and open its context, on the engine thread.

        llama.cpp's CPU backend (built with OpenMP) computes with a team of threads that belongs to the calling
        thread, and libgomp counts the threads of every team in the process: once they outnumber the cores, every
        team's barriers spin 100 rounds instead of 300,000 and then sleep in the kernel. The AMX build converts the
        weights at load with a team of its own (ggml-cpu/amx parallel_for), so a model loaded on the caller's thread
        and decoded on this one made two teams, 3 threads on 2 cores. Simulated without AMX (bench/threads.py
        --openmp-at-load), decoding fell to 0.91x of `Llama`'s speed at 2 threads, with ~50 sleeps per token in each
        of llama.cpp's threads. Loaded here, the load and every decode share one team. Nothing else may compute
        with llama.cpp on another thread while the engine lives (docs/engine.md, "Threads and AMX"). A model
        `prepare` opened in a snapshot template ran no computation, so it has no team yet: the first decode here
        makes it."""
        config = self.config
        if isinstance(model, LlamaModel):
            self.model = model
            model.set_threads(config.threads)  # the template's were a placeholder: this instance's share of the cores
        else:
            self.model = open_model(model, config)
        self.max_model_len = min(config.max_model_len, self.model.kv_cells_per_seq)
        slots = config.prefix_cache_slots
        cache = PrefixCache(range(config.max_batch_size, config.max_batch_size + slots)) if slots else None
        self.scheduler = Scheduler(
            self.model,
            prefix_cache=cache,
            limits=SchedulerLimits(
                max_batch_size=config.max_batch_size,
                prefill_chunk=config.prefill_chunk,
                max_prefill_wait=config.max_prefill_wait,
                max_decode_stall=config.max_decode_stall,
                prompt_lookup=config.prompt_lookup,
                prompt_lookup_max_batch=config.prompt_lookup_max_batch,
            ),
        )

    def _run(self, model: str | Path | LlamaModel) -> None:
        try:
            self._load(model)
        except BaseException as exc:  # raised again by __init__, in the caller's thread
            self._load_error = exc
            return
        finally:
            self._loaded.set()
        scheduler = self.scheduler
        while True:
            with self._wake:
                while not self._stopping and not self._inbox and not scheduler.has_work():
                    self._wake.wait()
                if self._stopping:
                    scheduler.fail_all("the engine is shutting down")
                    self._outbox.flush()
                    return
                for seq in self._inbox:
                    scheduler.add(seq)
                self._inbox.clear()
            done_before = scheduler.counters.finished
            try:
                scheduler.step()
            except Exception as exc:  # a broken context cannot be trusted again: fail everything, loudly
                log.exception("engine step failed")
                self._failure = f"the engine failed: {exc}"
                with self._wake:
                    for seq in self._inbox:
                        scheduler.add(seq)
                    self._inbox.clear()
                    scheduler.fail_all(self._failure)
                    self._in_engine = 0
                self._outbox.flush()
                return
            self._outbox.flush()
            finished = scheduler.counters.finished - done_before
            if finished:
                with self._wake:
                    self._in_engine -= finished


def open_model(model_path: str | Path, config: EngineConfig) -> LlamaModel:
    """Load the GGUF and open the one context `config` lays out."""
    unified = config.kv_cache_tokens is not None
    sequences = config.max_batch_size + config.prefix_cache_slots
    kv_cells = config.kv_cache_tokens if unified else sequences * config.max_model_len
    model = LlamaModel(model_path)
    if config.max_model_len > model.n_ctx_train:
        model.close()
        raise InvalidConfig(
            f"max_model_len {config.max_model_len} exceeds the model's training context of {model.n_ctx_train} tokens"
        )
    try:
        model.open_context(
            ContextShape(
                n_seq_max=sequences,
                kv_cells=kv_cells,
                n_batch=config.prefill_chunk + config.max_batch_size,
                unified=unified,
                n_threads=config.threads,
            )
        )
    except Exception:
        model.close()
        raise
    return model
