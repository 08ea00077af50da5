"""Prefix caching: a prompt that starts with tokens whose KV cells are still held reuses them instead of prefilling.

Finished sequences' cells are copied into spare sequence ids (the context has `max_batch_size` live ids and this
cache's ids above them, so live sequences keep dense, consecutive ids, which llama.cpp decodes in one micro-batch).
Prefixes are found by block: a block is `BLOCK_TOKENS` tokens, named by a hash of its tokens and of everything before
it (the keys of vLLM's automatic prefix caching), so a lookup walks the prompt's blocks until one is held by nobody.
The hash is SHA-256: with a weak hash a client could craft a prompt whose blocks collide with another client's and
read answers computed from that client's document (vLLM's CVE-2025-25183).
When every spare id holds something, the least recently used entry goes first.

Sliding-window layers (Gemma 3's) keep only the last window of positions of a sequence, so a prefix of P tokens can be
reused only while the positions just before P are still held: `reusable` checks it.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence as Tokens
from dataclasses import dataclass, field

import numpy as np

BLOCK_TOKENS = 16


def block_hashes(tokens: Tokens[int]) -> list[bytes]:
    """One hash per whole block of `tokens`, each covering the block and all the tokens before it."""
    whole = len(tokens) - len(tokens) % BLOCK_TOKENS
    data = np.asarray(tokens[:whole], dtype=np.int32).tobytes()
    step = BLOCK_TOKENS * 4
    hashes: list[bytes] = []
    parent = b""
    for start in range(0, len(data), step):
        parent = hashlib.sha256(parent + data[start : start + step]).digest()
        hashes.append(parent)
    return hashes


def shared_blocks(ours: list[bytes], theirs: list[bytes]) -> int:
    """Leading blocks two hash chains have in common."""
    n = 0
    for a, b in zip(ours, theirs):
        if a != b:
            break
        n += 1
    return n


def matched_beyond(prompt: Tokens[int], held: Tokens[int], start: int, limit: int) -> int:
    """How far `prompt` and `held` agree from `start` (where their blocks stopped agreeing), up to `limit` tokens: a
    partial last block counts too, so asking the same thing again reuses all but the last token."""
    end = min(len(held), limit)
    n = start
    while n < end and prompt[n] == held[n]:
        n += 1
    return n


def reusable(tokens: int, first_position: int, window: int) -> bool:
    """Whether `tokens` leading positions of a holder whose oldest held position is `first_position` can be reused:
    every layer must still hold the positions the next token attends to (all of them, or the last `window`)."""
    return first_position == 0 or (window > 0 and tokens - window >= first_position)


@dataclass
class CachedPrefix:
    slot: int  # the spare sequence id holding the cells
    hashes: list[bytes]  # of the whole blocks it holds
    tokens: list[int]  # whose cells it holds (whole blocks and a partial one)
    first_position: int
    used: float = field(default_factory=time.monotonic)


@dataclass
class PrefixCacheCounters:
    lookups: int = 0  # fresh prompts looked up
    hits: int = 0  # ... that reused cached cells
    cached_tokens: int = 0  # prompt tokens not prefilled thanks to the cache
    stored: int = 0  # sequences kept
    evicted: int = 0  # entries dropped to make room


class PrefixCache:
    """The spare sequence ids and what they hold; used by the scheduler on the engine thread only."""

    def __init__(self, slots: range):
        self.capacity = len(slots)
        self.spare = list(slots)
        self.entries: dict[int, CachedPrefix] = {}  # slot -> entry
        self.holders: dict[bytes, set[int]] = {}  # block hash -> slots holding that block
        self.counters = PrefixCacheCounters()

    @property
    def held_tokens(self) -> int:
        return sum(len(entry.tokens) for entry in self.entries.values())

    def longest(self, hashes: list[bytes]) -> tuple[CachedPrefix | None, int]:
        """The entry holding the most leading blocks of `hashes`, and how many (the most recently used wins ties)."""
        best: CachedPrefix | None = None
        depth = 0
        for i, h in enumerate(hashes):
            slots = self.holders.get(h)
            if not slots:
                break
            best = max((self.entries[s] for s in slots), key=lambda e: e.used)
            depth = i + 1
        return best, depth

    def touch(self, entry: CachedPrefix) -> None:
        entry.used = time.monotonic()

    def place_for(self, hashes: list[bytes]) -> int | None:
        """Where to keep a sequence whose blocks are `hashes`: None when an entry holds them all already; else the
        slot of an entry it extends (a conversation's earlier turn), a spare slot, the entry it mostly repeats (the
        next question about one document: the document stays cached without taking a second slot), or the least
        recently used."""
        held, depth = self.longest(hashes)
        if held is not None and depth == len(hashes):
            self.touch(held)
            return None
        ours = set(hashes)
        for entry in self.entries.values():
            if entry.hashes[-1] in ours:
                return entry.slot
        if self.spare:
            return self.spare[-1]
        if held is not None and 2 * depth >= len(hashes):
            return held.slot
        return min(self.entries.values(), key=lambda e: e.used).slot

    def store(self, slot: int, hashes: list[bytes], tokens: list[int], first_position: int) -> None:
        """Record that `slot` now holds the cells of `tokens` (copied there by the caller)."""
        old = self.entries.get(slot)
        self.drop(slot, evicted=old is not None and old.hashes[-1] not in set(hashes))
        if slot in self.spare:
            self.spare.remove(slot)
        self.entries[slot] = CachedPrefix(slot, hashes, tokens, first_position)
        for h in hashes:
            self.holders.setdefault(h, set()).add(slot)
        self.counters.stored += 1

    def drop(self, slot: int, evicted: bool = True) -> None:
        entry = self.entries.pop(slot, None)
        if entry is None:
            return
        for h in entry.hashes:
            slots = self.holders.get(h)
            if slots is not None:
                slots.discard(slot)
                if not slots:
                    del self.holders[h]
        self.spare.append(slot)
        if evicted:
            self.counters.evicted += 1
