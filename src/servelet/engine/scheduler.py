"""Continuous batching: every step feeds all live sequences to one llama_decode call.

A step holds one token for each decoding sequence plus up to `prefill_chunk` prompt tokens of the
sequences being prefilled (shortest remaining prompt first, so most requests see their first token
early; a prompt that waited too long, or was preempted, goes first). While prompts are being prefilled,
decoding sequences may sit out steps for up to `max_decode_stall` seconds. Sequences join and leave
between steps: a newcomer first looks for its prompt's prefix in cells already computed (prefix_cache.py), and a
leaving sequence's cells are kept there. A greedy sequence decoding alone may feed draft tokens after its last one
(prompt lookup) and keep those the step's logits confirm.
"""

from __future__ import annotations

import heapq
import logging
import os
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from .llama import LlamaModel
from .prefix_cache import BLOCK_TOKENS, PrefixCache, block_hashes, matched_beyond, reusable, shared_blocks
from .sequence import Finished, FinishReason, Phase, Sequence, Token

log = logging.getLogger("servelet.engine")


@dataclass(frozen=True)
class SchedulerLimits:
    max_batch_size: int  # sequences holding a slot at once (n_seq_max)
    prefill_chunk: int  # prompt tokens fed per step, across all prefilling sequences
    max_prefill_wait: float  # seconds after which a waiting prompt is prefilled before shorter ones
    max_decode_stall: float  # seconds running streams may go without a token while prompts are prefilled
    prompt_lookup: int = 0  # most draft tokens a greedy sequence proposes per step (speculative decoding); 0: off
    prompt_lookup_max_batch: int = 1  # speculate only while at most this many sequences decode (see _drafts)


@dataclass
class SchedulerCounters:
    steps: int = 0
    preemptions: int = 0
    tokens_generated: int = 0
    prompt_tokens: int = 0
    finished: int = 0
    cancelled: int = 0  # left because their client did (servelet_cancelled_requests)
    draft_tokens: int = 0  # proposed by prompt lookup
    accepted_draft_tokens: int = 0


class Scheduler:
    """Owns the sequences and the KV accounting; runs in one thread (the engine's)."""

    def __init__(self, model: LlamaModel, limits: SchedulerLimits, prefix_cache: PrefixCache | None = None):
        self.model = model
        self.limits = limits
        self.prefix_cache = prefix_cache  # its sequence ids follow the live ones; per-sequence KV cells only
        self.waiting: deque[Sequence] = deque()
        self.live: list[Sequence] = []  # in admission order: the youngest is last
        # A min-heap: the lowest free slot is taken first, keeping the live sequence ids dense (see _plan).
        self.free_slots = list(range(limits.max_batch_size))
        self.kv_free = model.kv_cells - (prefix_cache.capacity * model.kv_cells_per_seq if prefix_cache else 0)
        self.counters = SchedulerCounters()
        self._scratch: np.ndarray | None = None  # one row of the vocabulary, reused
        self._decoded_at = 0.0  # when running streams last got a token (or there were none to wait)
        self.freed_at_step: dict[int, int] = {}  # request id -> step that freed it (for introspection)

    # -- joining and leaving ----------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.live)

    def drop_cancelled(self) -> None:
        """Cancelled sequences leave before the step is built, so their cells are free for it."""
        for seq in [s for s in self.live if s.cancelled]:
            self._finish(seq, FinishReason.CANCELLED)
            self.counters.cancelled += 1
        for seq in [s for s in self.waiting if s.cancelled]:
            self.waiting.remove(seq)
            self._finish(seq, FinishReason.CANCELLED)
            self.counters.cancelled += 1

    def fail_all(self, message: str) -> None:
        """End every sequence with an error; each still gets its Finished event, whatever state it is in."""
        for seq in list(self.live) + list(self.waiting):
            try:
                self._finish(seq, FinishReason.ERROR, error=message)
            except Exception:  # the context is broken: still tell the waiting client
                log.exception("could not release request %d", seq.request_id)
                seq.sink.put(Finished(FinishReason.ERROR, seq.text, seq.stats(time.perf_counter()), message))
        self.live.clear()
        self.waiting.clear()

    def _finish(self, seq: Sequence, reason: FinishReason, error: str | None = None, last: Token | None = None) -> None:
        if seq in self.live:
            if reason is not FinishReason.ERROR:
                self._keep(seq)
            self._release(seq)
            self.live.remove(seq)
        seq.phase = Phase.DONE
        self.counters.finished += 1
        if seq.sampler is not None:
            self.model.free_sampler(seq.sampler)
            seq.sampler = None
        self.freed_at_step[seq.request_id] = self.counters.steps
        if len(self.freed_at_step) > 4096:
            self.freed_at_step.pop(next(iter(self.freed_at_step)))
        seq.sink.put(Finished(reason, seq.text, seq.stats(time.perf_counter()), error, last))

    def _release(self, seq: Sequence) -> None:
        self.model.forget(seq.slot)
        self.kv_free += seq.n_cached
        heapq.heappush(self.free_slots, seq.slot)
        seq.slot = -1
        seq.n_cached = 0

    # -- prefix caching (see prefix_cache.py) --------------------------------------------------
    def _keep(self, seq: Sequence) -> None:
        """Copy a leaving sequence's cells into the prefix cache, unless an entry holds its blocks already."""
        cache = self.prefix_cache
        if cache is None or seq.n_cached < BLOCK_TOKENS:
            return
        tokens = seq.held_tokens()
        hashes = block_hashes(tokens)
        slot = cache.place_for(hashes)
        if slot is None:
            return
        if self.model.copy_kv(seq.slot, slot, len(tokens)):
            cache.store(slot, hashes, tokens, self.model.kv_first_position(slot))
        else:
            cache.drop(slot)

    def _prefix_source(self, seq: Sequence) -> tuple[int, int] | None | bool:
        """Where a fresh prompt's longest reusable prefix is held, as (sequence id, tokens): in the cache, or in a
        live sequence. False when a live sequence is still prefilling more of that prefix than is held anywhere: the
        prompt then waits for it rather than computing the same cells a second time."""
        cache = self.prefix_cache
        if cache is None or seq.n_cached or seq.generated:
            return None
        if seq.prompt_blocks is None:
            seq.prompt_blocks = block_hashes(seq.prompt_tokens)
            cache.counters.lookups += bool(seq.prompt_blocks)
        blocks = seq.prompt_blocks
        if not blocks:
            return None
        prompt = seq.prompt_tokens
        limit = len(prompt) - 1  # the last prompt token is fed again: its logits give the first new token
        window = self.model.sliding_window
        best: tuple[int, int] | None = None
        entry, depth = cache.longest(blocks)
        if entry is not None:
            tokens = matched_beyond(prompt, entry.tokens, min(depth * BLOCK_TOKENS, limit), limit)
            if reusable(tokens, entry.first_position, window):
                best = (entry.slot, tokens)
        coming = 0  # the most a live sequence still prefilling will hold
        for other in self.live:
            if other.prompt_blocks is None:
                continue
            shared = min(shared_blocks(blocks, other.prompt_blocks) * BLOCK_TOKENS, limit)
            if other.phase is Phase.PREFILL:
                coming = max(coming, shared)
            if not shared or other.n_cached <= (best[1] if best else 0):
                continue
            held = matched_beyond(prompt, other.held_tokens(), min(shared, other.n_cached), limit)
            if held > (best[1] if best else 0) and reusable(held, self.model.kv_first_position(other.slot), window):
                best = (other.slot, held)
        have = best[1] if best else 0
        if coming - have >= BLOCK_TOKENS:
            return False
        return best if have >= BLOCK_TOKENS else None

    def _reuse(self, seq: Sequence, source: int, tokens: int) -> None:
        cache = self.prefix_cache
        if not self.model.copy_kv(source, seq.slot, tokens):
            return
        seq.n_cached = seq.cached_tokens = tokens
        self.kv_free -= tokens
        cache.counters.hits += 1
        cache.counters.cached_tokens += tokens
        if (entry := cache.entries.get(source)) is not None:
            cache.touch(entry)

    def _preempt_youngest(self) -> Sequence:
        """Free the youngest live sequence's cells; it is recomputed from its tokens when room returns."""
        seq = self.live.pop()
        self._release(seq)
        seq.phase = Phase.WAITING
        seq.preemptions += 1
        self.counters.preemptions += 1
        self.waiting.appendleft(seq)
        log.info("preempted request %d after %d tokens (KV cells exhausted)", seq.request_id, len(seq.generated))
        return seq

    def _prefill_order(self, now: float):
        """Preempted sequences first, then prompts that waited too long, then the shortest remaining prompt."""
        return lambda s: (s.preemptions == 0, now - s.arrived < self.limits.max_prefill_wait, s.pending)

    def _admit(self) -> None:
        """Give slots to as many waiting sequences as this step's prefill budget can start.

        A slot is taken only when prefill starts, and the lowest free one: sequences that decode together then
        hold consecutive ids, which llama.cpp can run as one micro-batch.
        """
        budget = self.limits.prefill_chunk - sum(s.pending for s in self.live if s.phase is Phase.PREFILL)
        for seq in sorted(self.waiting, key=self._prefill_order(time.perf_counter())):
            if budget <= 0 or not self.free_slots:
                break
            source = self._prefix_source(seq)
            if source is False:
                continue
            reused = source[1] if source else 0
            # Leave room for one more token of every live sequence before taking a newcomer in.
            if seq.pending - reused + len(self.live) + 1 > self.kv_free and self.live:
                break
            if seq.sampler is None and (seq.params.sampling or seq.params.penalised):
                seq.sampler = self._new_sampler(seq)
            self.waiting.remove(seq)
            seq.slot = heapq.heappop(self.free_slots)
            if source:
                self._reuse(seq, *source)
            seq.phase = Phase.PREFILL
            if not seq.admitted:
                seq.admitted = time.perf_counter()
            self.live.append(seq)
            budget -= seq.pending

    def _new_sampler(self, seq: Sequence):
        p = seq.params
        seed = p.seed if p.seed is not None else int.from_bytes(os.urandom(4), "little")
        return self.model.new_sampler(
            temperature=p.temperature,
            top_k=p.top_k,
            top_p=p.top_p,
            repetition_penalty=p.repetition_penalty,
            frequency_penalty=p.frequency_penalty,
            presence_penalty=p.presence_penalty,
            seed=seed,
            sampling=p.sampling,
            history=seq.prompt_tokens,
        )

    # -- one step -----------------------------------------------------------------------------
    def _plan(self) -> list[tuple[Sequence, int]]:
        """Choose (sequence, tokens to feed) for this step, preempting the youngest if cells run out."""
        while True:
            decoding = [s for s in self.live if s.phase is Phase.DECODE]
            prefilling = [s for s in self.live if s.phase is Phase.PREFILL]
            now = time.perf_counter()
            prefilling.sort(key=self._prefill_order(now))
            # Prefill first: while prompts wait, running streams sit out steps for up to max_decode_stall
            # seconds, so the new requests' first tokens come sooner (and decode rows are not recomputed
            # alongside every chunk); then they rejoin, so no stream stalls for longer than that.
            stall = bool(prefilling) and now - self._decoded_at < self.limits.max_decode_stall
            if not decoding or not stall:
                self._decoded_at = now
            plan = [] if stall else [(s, 1 + len(s.draft)) for s in self._drafts(decoding)]
            budget = min(self.limits.prefill_chunk, self.model.batch.capacity - sum(n for _, n in plan))
            for s in prefilling:
                if budget <= 0:
                    break
                n = min(s.pending, budget)
                plan.append((s, n))
                budget -= n
            needed = sum(n for _, n in plan)
            if needed <= self.kv_free or len(self.live) <= 1:
                # With per-sequence KV, llama.cpp puts only runs of consecutive, increasing sequence ids in one
                # micro-batch: in slot order a decode step is one pass over the weights, out of order it is many.
                return sorted(plan, key=lambda entry: entry[0].slot)
            self._preempt_youngest()

    def _drafts(self, decoding: list[Sequence]) -> list[Sequence]:
        """Propose this step's draft tokens (prompt lookup) for greedy sequences, or none.

        With per-sequence cells llama.cpp runs a step's rows in micro-batches of equal length per sequence, so one
        sequence's draft rows cost a pass of their own over the weights unless it decodes alone: speculation runs
        only while at most `prompt_lookup_max_batch` sequences decode (docs/engine.md, "Prompt lookup")."""
        limits = self.limits
        speculate = limits.prompt_lookup > 0 and len(decoding) <= limits.prompt_lookup_max_batch
        room = self.model.batch.capacity - len(decoding)
        for seq in decoding:
            seq.draft = []
            if not speculate or seq.sampler is not None or seq.constraint is not None or room <= 0:
                continue
            left = seq.max_new_tokens - len(seq.generated) - 1  # the token after the drafts always comes
            cells = self.model.kv_cells_per_seq - seq.n_cached - 1
            limit = min(seq.draft_room(), limits.prompt_lookup, left, cells, room)
            if limit > 0:
                seq.draft = seq.propose(limit)
                room -= len(seq.draft)
        return decoding

    def step(self) -> None:
        self.drop_cancelled()
        self._admit()
        if not self.live:
            return
        plan = self._plan()
        batch = self.model.batch
        batch.clear()
        outputs: list[tuple[Sequence, int]] = []  # sequences sampling one token this step, with their batch index
        rows: list[int] = []  # their logits rows
        drafted: list[tuple[Sequence, int]] = []  # sequences verifying drafts, with their first logits row
        row = 0
        for seq, n in plan:
            draft = seq.draft if seq.phase is Phase.DECODE else []
            tokens = seq.next_tokens(n - len(draft)) + draft
            samples = n - len(draft) == seq.pending
            index = batch.add(tokens, seq.n_cached, seq.slot, samples, logits_rows=1 + len(draft))
            if draft:
                drafted.append((seq, row))
                row += 1 + len(draft)
            elif samples:
                outputs.append((seq, index))
                rows.append(row)
                row += 1
        rc = self.model.decode()
        self.counters.steps += 1
        if rc == 1:  # no KV slot even so (fragmentation): make room and retry next step
            if len(self.live) > 1:
                self._preempt_youngest()
                return
            self._finish(self.live[0], FinishReason.ERROR, error="the KV cache cannot hold this sequence")
            return
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with status {rc}")
        for seq, n in plan:
            seq.n_cached += n
            self.kv_free -= n
        self.counters.prompt_tokens += sum(n for s, n in plan if s.phase is Phase.PREFILL)
        logits = self.model.logits_rows(row) if row else None
        if outputs:
            # Without drafts the sampled rows are the logits rows, in order: no copy of the 262k-wide rows.
            self._sample(outputs, logits if row == len(outputs) else logits[rows])
        for seq, first in drafted:
            self._verify(seq, logits[first : first + 1 + len(seq.draft)])

    def _verify(self, seq: Sequence, rows: np.ndarray) -> None:
        """Keep the drafts the model itself would have chosen, and its own token after them; forget the rest.

        Row j holds the logits after the sequence's last token and drafts 0..j-1, so greedy decoding would have
        picked argmax(row j) next: drafts are accepted while they equal it. The output is the same tokens greedy
        decoding without drafts gives (up to the rounding of a different batch shape)."""
        draft, seq.draft = seq.draft, []
        chosen = rows.argmax(axis=1)
        accepted = 0
        while accepted < len(draft) and draft[accepted] == chosen[accepted]:
            accepted += 1
        rejected = len(draft) - accepted
        if rejected:
            seq.n_cached -= rejected
            self.kv_free += rejected
            self.model.trim_kv(seq.slot, seq.n_cached)
        seq.draft_tokens += len(draft)
        seq.accepted_draft_tokens += accepted
        self.counters.draft_tokens += len(draft)
        self.counters.accepted_draft_tokens += accepted
        seq.follow_acceptance(accepted, self.limits.prompt_lookup)
        logprobs = self._greedy_logprobs(rows[: accepted + 1], chosen[: accepted + 1]) if seq.want_logprobs else None
        now = time.perf_counter()
        for j in range(accepted + 1):
            if self._emit(seq, int(chosen[j]), None if logprobs is None else float(logprobs[j]), now):
                return

    def _greedy_logprobs(self, rows: np.ndarray, chosen: np.ndarray) -> np.ndarray:
        peaks = rows[np.arange(len(chosen)), chosen]
        return peaks - self._log_normalisers(rows, peaks)

    def _log_normalisers(self, rows: np.ndarray, peaks: np.ndarray) -> np.ndarray:
        """log(sum(exp(row))) per row, `peaks` being each row's largest logit (the vocabulary has 262k entries).

        Row by row, so each pass stays in the core's cache (a row is 1 MiB), and without a max pass of its own:
        3.5 ms for 16 rows on one core where the whole block at once took 5.2; 4% of a step. In this thread:
        splitting the rows over two threads was 4% slower end to end (llama.cpp's OpenMP worker still spins on
        the other core)."""
        if self._scratch is None or self._scratch.shape[0] != rows.shape[1]:
            self._scratch = np.empty(rows.shape[1], dtype=np.float32)
        out = np.empty(rows.shape[0], dtype=np.float32)
        for i, row in enumerate(rows):
            np.subtract(row, peaks[i], out=self._scratch)
            np.exp(self._scratch, out=self._scratch)
            out[i] = peaks[i] + np.log(self._scratch.sum())
        return out

    def _sample(self, outputs: list[tuple[Sequence, int]], logits: np.ndarray) -> None:
        """One token for each of `outputs` from its row of `logits`."""
        greedy_rows = [r for r, (s, _) in enumerate(outputs) if s.sampler is None]
        chosen = np.empty(len(outputs), dtype=np.int64)
        if len(greedy_rows) == len(outputs):  # the common case: no copy of the logits
            chosen[:] = logits.argmax(axis=1)
        elif greedy_rows:
            # One vectorised argmax over the greedy rows; per-sequence sampler chains cost more.
            chosen[greedy_rows] = logits[greedy_rows].argmax(axis=1)
        constrained = {}  # row -> the pick's log-probability among the tokens its constraint allows
        for r, (seq, index) in enumerate(outputs):
            if seq.sampler is not None:
                chosen[r] = self.model.sample_with(seq.sampler, index)
            elif seq.constraint is not None:
                chosen[r], constrained[r] = seq.constraint.pick(logits[r])
        logprob_rows = [r for r, (s, _) in enumerate(outputs) if s.want_logprobs and s.constraint is None]
        logprobs = {}
        if logprob_rows:
            rows = logits if len(logprob_rows) == len(outputs) else logits[logprob_rows]
            picked = rows[np.arange(len(logprob_rows)), chosen[logprob_rows]]
            # A greedy row's pick is its largest logit; a sampled row's may not be, and exp must not overflow.
            peaks = np.array(
                [picked[k] if outputs[r][0].sampler is None else rows[k].max() for k, r in enumerate(logprob_rows)],
                dtype=np.float32,
            )
            log_norm = self._log_normalisers(rows, peaks)
            for k, r in enumerate(logprob_rows):
                logprobs[r] = float(picked[k] - log_norm[k])
        logprobs |= {r: lp for r, lp in constrained.items() if outputs[r][0].want_logprobs}
        now = time.perf_counter()
        for r, (seq, _) in enumerate(outputs):
            self._emit(seq, int(chosen[r]), logprobs.get(r), now)

    def _emit(self, seq: Sequence, token: int, logprob: float | None, now: float) -> bool:
        """Give a sequence its next token; True when that ended it."""
        if seq.phase is Phase.PREFILL:
            seq.phase = Phase.DECODE
            if not seq.first_token_at:
                seq.first_token_at = now
                seq.prefill_seconds = now - seq.admitted
        if seq.constraint is not None:
            seq.constraint.advance(token)
        piece = self.model.piece(token, seq.params.skip_special_tokens)
        event, end = seq.accept(token, piece, logprob, self.model.is_end_of_generation(token))
        self.counters.tokens_generated += 1
        if end is None:
            seq.sink.put(event)
            return False
        self._finish(seq, end, last=event)
        return True
