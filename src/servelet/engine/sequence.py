"""One request's life inside the engine: its tokens, its KV position, its text and how it ends."""

from __future__ import annotations

import codecs
import enum
import time
from dataclasses import dataclass, field

import numpy as np

from .copy_constraint import CopyConstraint
from .params import GenerationParams

DRAFT_PAUSE_TOKENS = 16  # a sequence whose drafts keep missing stops proposing for this many tokens


class Phase(enum.Enum):
    WAITING = "waiting"  # queued, holds no slot and no KV cells
    PREFILL = "prefill"  # holds a slot; its pending tokens are being fed in chunks
    DECODE = "decode"  # holds a slot; feeds its last sampled token each step
    DONE = "done"


class FinishReason(str, enum.Enum):
    LENGTH = "length"
    EOS = "eos_token"
    STOP = "stop_sequence"
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass(frozen=True)
class Token:
    """One generated token as a client sees it: `text` is what it adds to the visible output."""

    id: int
    text: str
    logprob: float | None


@dataclass(frozen=True)
class GenerationStats:
    prompt_tokens: int
    generated_tokens: int
    time_to_first_token: float
    prompt_tokens_per_second: float
    tokens_per_second: float
    preemptions: int
    cached_tokens: int = 0  # prompt tokens whose KV cells came from the prefix cache, not a prefill
    draft_tokens: int = 0  # tokens prompt lookup proposed (speculative decoding)
    accepted_draft_tokens: int = 0  # ... that the model's own choice confirmed


@dataclass(frozen=True)
class Finished:
    """The last event of a generation."""

    reason: FinishReason
    text: str
    stats: GenerationStats
    error: str | None = None
    last: Token | None = None  # the token that ended it, delivered with the end so streams can merge them


class StopMatcher:
    """Finds stop sequences in generated text; holds back a tail that could still grow into one."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.holdback = max((len(s) for s in stops), default=1) - 1

    def scan(self, text: str, start: int) -> tuple[int, str] | None:
        """Where in `text` the first stop sequence begins, and which one it is (the first listed, if several begin
        there), looking only where a new one could end."""
        if not self.stops:
            return None
        window_start = max(0, start - self.holdback)
        found = [(i, s) for s in self.stops if (i := text.find(s, window_start)) >= 0]
        return min(found, key=lambda match: match[0]) if found else None

    def safe_end(self, text: str) -> int:
        """How much of `text` can be shown now: all of it unless its tail is a prefix of a stop sequence."""
        for keep in range(min(self.holdback, len(text)), 0, -1):
            tail = text[-keep:]
            if any(s.startswith(tail) for s in self.stops):
                return len(text) - keep
        return len(text)


@dataclass(eq=False)
class Sequence:
    """Engine-side state of one generation. Touched only by the engine thread once submitted."""

    request_id: int
    prompt_tokens: list[int]
    params: GenerationParams
    max_new_tokens: int
    want_logprobs: bool
    sink: object  # receives Token / Finished events (see engine.EventSink)
    arrived: float = field(default_factory=time.perf_counter)

    phase: Phase = Phase.WAITING
    slot: int = -1
    n_cached: int = 0  # tokens of this sequence already in its KV cells
    generated: list[int] = field(default_factory=list)
    sampler: object | None = None
    preemptions: int = 0
    cancelled: bool = False
    admitted: float = 0.0
    first_token_at: float = 0.0
    prefill_seconds: float = 0.0
    cached_tokens: int = 0  # prompt tokens reused from another sequence's KV cells (prefix caching)
    prompt_blocks: list[bytes] | None = None  # the prompt's block hashes, once looked up (engine/prefix_cache.py)
    constraint: CopyConstraint | None = None  # answer_span: only tokens that copy a run of the context
    draft: list[int] = field(default_factory=list)  # this step's proposed tokens (prompt lookup), verified after it
    draft_limit: int = 4  # how many to propose next: follows what was accepted (0: paused)
    drafts_resume_at: int = 0  # generated tokens after which a paused sequence proposes again
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0

    def __post_init__(self):
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._text = ""  # all decoded text so far
        self._shown = 0  # characters of _text already sent to the client
        self._stops = StopMatcher(self.params.stop)

    # -- what to feed next ------------------------------------------------------------------
    def next_tokens(self, n: int) -> list[int]:
        """The next n tokens to feed: prompt tokens first, then (after a preemption) generated ones."""
        start, n_prompt = self.n_cached, len(self.prompt_tokens)
        if start >= n_prompt:
            return self.generated[start - n_prompt : start - n_prompt + n]
        return (self.prompt_tokens[start : start + n] + self.generated[: max(0, start + n - n_prompt)])[:n]

    def held_tokens(self) -> list[int]:
        """The tokens whose KV cells this sequence holds, in order."""
        n_prompt = len(self.prompt_tokens)
        if self.n_cached <= n_prompt:
            return self.prompt_tokens[: self.n_cached]
        return self.prompt_tokens + self.generated[: self.n_cached - n_prompt]

    def propose(self, limit: int, longest_ngram: int = 3) -> list[int]:
        """Prompt lookup: the tokens that followed the latest earlier occurrence of the sequence's last n tokens (n from
        `longest_ngram` down to 1) in its prompt and output, at most `limit` of them. No draft model: answers that
        copy from their context (extractive QA, code edits, summaries quoting a document) are proposed correctly."""
        history = np.asarray(self.prompt_tokens + self.generated, dtype=np.int32)
        for n in range(min(longest_ngram, len(history) - 1), 0, -1):
            starts = np.lib.stride_tricks.sliding_window_view(history[:-1], n)
            found = np.flatnonzero((starts == history[-n:]).all(axis=1))
            if found.size:
                follow = int(found[-1]) + n
                return history[follow : follow + limit].tolist()
        return []

    def draft_room(self) -> int:
        if not self.draft_limit and len(self.generated) >= self.drafts_resume_at:
            self.draft_limit = 1
        return self.draft_limit

    def follow_acceptance(self, accepted: int, most: int) -> None:
        """Propose two more than were accepted last time; after misses, fewer, then none for a while (draft rows
        that are rejected still cost their share of a step)."""
        if accepted:
            self.draft_limit = min(accepted + 2, most)
        else:
            self.draft_limit //= 2
            if not self.draft_limit:
                self.drafts_resume_at = len(self.generated) + DRAFT_PAUSE_TOKENS

    @property
    def pending(self) -> int:
        """Tokens still to feed before the next sample (a whole prompt, or prompt + output after preemption)."""
        return len(self.prompt_tokens) + len(self.generated) - self.n_cached

    @property
    def kv_needed(self) -> int:
        """KV cells this sequence will hold by the end of its generation."""
        return len(self.prompt_tokens) + self.max_new_tokens

    # -- text -------------------------------------------------------------------------------
    def accept(self, token: int, piece: bytes, logprob: float | None, is_eog: bool) -> tuple[Token, FinishReason | None]:
        """Record a sampled token; returns the client's view of it and why the sequence ends, if it does."""
        self.generated.append(token)
        end: FinishReason | None = None
        if is_eog and not self.params.ignore_eos:
            piece = b""
            end = FinishReason.EOS
        before = len(self._text)
        self._text += self._utf8.decode(piece, final=False)
        stop = self._stops.scan(self._text, before)
        if stop is not None:
            stop_at, stop_text = stop
            self._text = self._text[: stop_at + (len(stop_text) if self.params.include_stop_str_in_output else 0)]
            end = FinishReason.STOP
        elif end is None and len(self.generated) >= self.max_new_tokens:
            end = FinishReason.LENGTH
        if end is not None:
            self._text += "" if end is FinishReason.STOP else self._utf8.decode(b"", final=True)
            visible_end = len(self._text)
        else:
            visible_end = self._stops.safe_end(self._text)
        shown = self._text[self._shown : max(self._shown, visible_end)]
        self._shown = max(self._shown, visible_end)
        return Token(token, shown, logprob), end

    @property
    def text(self) -> str:
        return self._text

    def stats(self, now: float) -> GenerationStats:
        n_gen = len(self.generated)
        decode_time = now - self.first_token_at if self.first_token_at else 0.0
        ttft = self.first_token_at - self.arrived if self.first_token_at else 0.0
        return GenerationStats(
            prompt_tokens=len(self.prompt_tokens),
            generated_tokens=n_gen,
            time_to_first_token=ttft,
            prompt_tokens_per_second=len(self.prompt_tokens) / self.prefill_seconds if self.prefill_seconds else 0.0,
            tokens_per_second=(n_gen - 1) / decode_time if n_gen > 1 and decode_time > 0 else 0.0,
            preemptions=self.preemptions,
            cached_tokens=self.cached_tokens,
            draft_tokens=self.draft_tokens,
            accepted_draft_tokens=self.accepted_draft_tokens,
        )
