"""Constrained span decoding: an answer that can only be a run of the context's own tokens.

Extractive question answering on a generative model asks it to copy the answer from the context; left free, a small
model paraphrases, runs on, or answers nothing. With this constraint, each step may only pick a token that continues
some run of the context's tokens matching the answer so far (the first token: any context token), or a token that
ends the answer (end of text, end of turn, a line break). The answer is then a span of the context by construction,
and the probability of each pick among the allowed tokens is what the answer's score is made of.

The positions where the answer so far matches are kept as an array and advanced per token, so a step costs a few
vectorised operations over the context's length, batched with every other sequence's rows.
"""

from __future__ import annotations

import numpy as np


class CopyConstraint:
    def __init__(self, context_tokens: list[int], end_tokens: list[int]):
        self.context = np.asarray(context_tokens, dtype=np.int64)
        self.ends = np.unique(np.asarray(end_tokens, dtype=np.int64))
        self.positions = np.arange(len(self.context))  # context indices the next token may be copied from

    def allowed(self) -> np.ndarray:
        """Token ids the next step may pick, sorted."""
        return np.union1d(self.context[self.positions], self.ends)

    def pick(self, row: np.ndarray) -> tuple[int, float]:
        """The most likely allowed token of a logits row, and its log-probability among the allowed tokens."""
        allowed = self.allowed()
        scores = row[allowed].astype(np.float64)
        best = int(scores.argmax())
        peak = scores[best]
        log_norm = peak + np.log(np.exp(scores - peak).sum())
        return int(allowed[best]), float(peak - log_norm)

    def advance(self, token: int) -> None:
        """The answer grew by `token`: keep the runs it continues (an end token ends them all)."""
        if token in self.ends:
            self.positions = self.positions[:0]
            return
        after = self.positions[self.context[self.positions] == token] + 1
        self.positions = after[after < len(self.context)]


def token_spans(pieces: list[bytes]) -> list[tuple[int, int]]:
    """[start, end) byte offsets of each token in the text its pieces make up."""
    spans, at = [], 0
    for piece in pieces:
        spans.append((at, at + len(piece)))
        at += len(piece)
    return spans


def tokens_within(text: str, span: tuple[int, int], pieces: list[bytes]) -> tuple[int, int] | None:
    """The run of tokens [first, last) covering the character span of `text` (tokens that overlap it, so a leading
    space a token carries comes with it); None when the pieces do not spell `text` (no faithful offsets)."""
    raw = text.encode("utf-8")
    if b"".join(pieces) != raw:
        return None
    start = len(text[: span[0]].encode("utf-8"))
    end = len(text[: span[1]].encode("utf-8"))
    covering = [i for i, (a, b) in enumerate(token_spans(pieces)) if b > start and a < end]
    return (covering[0], covering[-1] + 1) if covering else None
