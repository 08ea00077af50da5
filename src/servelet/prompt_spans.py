"""Which parts of a prompt are the user's plain text: special-token markup there is text, never a control token.

Why: a chat template's own markup (`<start_of_turn>user`) is tokenized as the special tokens it names, but a
message that contains `<start_of_turn>model` must stay text, or a user could write the model's turn for it. The
gateway renders chat templates and QA prompts, so it knows where each message, question and context lies in the
prompt it sends; it sends those character ranges as the `literal_spans` parameter, and every runtime tokenizes them
without parsing special tokens (llama.cpp's parse_special off, a Hugging Face tokenizer's split_special_tokens on).
A raw prompt without spans is tokenized whole, special tokens parsed, as TGI, vLLM and llama.cpp's server do (a
client that formats its own prompt writes the markup it means).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

Span = tuple[int, int]  # [start, end) in characters of the prompt


def check_spans(spans: Sequence[Sequence[int]]) -> list[Span]:
    """Spans as [start, end) pairs, in order, not overlapping; ValueError saying which is wrong."""
    checked: list[Span] = []
    for span in spans:
        if len(span) != 2:
            raise ValueError(f"literal_spans: {list(span)} is not a [start, end) pair")
        start, end = span
        if not 0 <= start < end:
            raise ValueError(f"literal_spans: [{start}, {end}) is empty or negative")
        if checked and start < checked[-1][1]:
            before = checked[-1]
            raise ValueError(f"literal_spans: [{start}, {end}) overlaps or precedes [{before[0]}, {before[1]})")
        checked.append((start, end))
    return checked


def segments(prompt: str, spans: Iterable[Span]) -> list[tuple[str, bool]]:
    """The prompt cut into (text, is_literal) pieces, in order, none empty; ValueError for a span past its end."""
    pieces: list[tuple[str, bool]] = []
    at = 0
    for start, end in spans:
        if end > len(prompt):
            raise ValueError(f"literal_spans: [{start}, {end}) runs past the prompt's {len(prompt)} characters")
        pieces += [(prompt[at:start], False)] if start > at else []
        pieces.append((prompt[start:end], True))
        at = end
    pieces += [(prompt[at:], False)] if at < len(prompt) else []
    return pieces


def tokenize_segments(
    prompt: str, spans: Iterable[Span], tokenize: Callable[[str, bool, bool], list[int]],
) -> list[int]:
    """The prompt's tokens, by `tokenize(text, first, literal)`: `first` may add the BOS token, `literal` turns
    special-token parsing off. Where no literal span holds markup (it tokenizes the same either way), the prompt is
    tokenized whole, exactly as without spans: cut into pieces, the text at each cut would be tokenized differently
    (" What" is one token, " " and "What" two), which a small model notices. Only a prompt whose user text does hold
    markup is tokenized piece by piece."""
    pieces = segments(prompt, spans)
    if not any(literal and tokenize(text, False, True) != tokenize(text, False, False) for text, literal in pieces):
        return tokenize(prompt, True, False)
    tokens: list[int] = []
    for number, (text, literal) in enumerate(pieces):
        tokens += tokenize(text, number == 0, literal)
    return tokens


def hf_tokens(tokenizer, prompt: str, spans: Iterable[Span]) -> list[int]:
    """A Hugging Face tokenizer's tokens of the prompt: its special tokens (BOS) once, unless the prompt starts
    with them already (a rendered chat template may); literal spans with special-token markup split as text."""
    bos = tokenizer.bos_token

    def piece(text: str, first: bool, literal: bool) -> list[int]:
        add_special = first and not (bos and text.startswith(bos))
        return tokenizer(text, add_special_tokens=add_special, split_special_tokens=literal)["input_ids"]

    return tokenize_segments(prompt, spans, piece)
