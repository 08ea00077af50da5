"""Extractive question answering on a generative model: the answer is a span of the context.

A few-shot prompt asks the model to copy the answer from the context, and the engine holds it to that: with
`answer_span` every generated token continues a run of the context's own tokens or ends the answer (constrained span
decoding, engine/copy_constraint.py), so the answer is a span by construction; it is then located in the context
the client sent, so `start`/`end` are real offsets and `answer` is `context[start:end]`. `score` is the probability
the model gives that span under the constraint: the product of its picks' probabilities among the allowed tokens,
the end of the answer included (an answer cut by the token limit has no end in it). An answer the model ends at
once is "no answer": `answer` "", offsets 0, and the score is the probability of ending at once. A runtime that
cannot constrain (vLLM, transformers) writes freely; the closest word span is then taken and the score is scaled by
how closely it matches.

An endpoint whose model is an extractive one (task question-answering) finds the span itself: the pair is
forwarded to it and its answer returned as it is.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from difflib import SequenceMatcher

from ..control.invocation import Invocation
from ..errors import ModelFailed, Unprocessable
from ..prompt_spans import Span
from .textgen import Completion, TextGenerator, Token

FEW_SHOT = (
    "Extract the answer to the question from the context.\n\n"
    "Context: The meeting was moved from Monday to Thursday afternoon.\n"
    "Question: When is the meeting?\n"
    "Answer: Thursday afternoon\n\n"
    "Context: Anna bought three apples and a loaf of bread at the market.\n"
    "Question: What did Anna buy besides apples?\n"
    "Answer: a loaf of bread\n\n"
)
MAX_ANSWER_TOKENS = 24
MAX_SPAN_WORDS_EXTRA = 3  # a fuzzy span may be a few words longer than what the model wrote
MIN_FUZZY_MATCH = 0.5
_EDGE_PUNCTUATION = " \t\n\"'`.,;:!?()[]{}"


@dataclass
class QuestionAnswer:
    score: float
    start: int
    end: int
    answer: str

    def as_dict(self) -> dict:
        return asdict(self)


def prompt_for(question: str, context: str) -> tuple[str, list[Span]]:
    """The prompt, and where the context and the question lie in it: the user's plain text, whose markup
    (`<start_of_turn>`) must stay text (servelet/prompt_spans.py)."""
    context, question = " ".join(context.split()), " ".join(question.split())
    context_at = len(FEW_SHOT) + len("Context: ")
    question_at = context_at + len(context) + len("\nQuestion: ")
    text = FEW_SHOT + f"Context: {context}\nQuestion: {question}\nAnswer:"
    return text, [(context_at, context_at + len(context)), (question_at, question_at + len(question))]


def check(question, context) -> tuple[str, str]:
    """Both must be non-empty strings; the message names the one that is not."""
    for name, value in (("question", question), ("context", context)):
        if not isinstance(value, str):
            raise Unprocessable(f"{name}: must be a string")
        if not value.strip():
            raise Unprocessable(f"{name}: must not be empty")
    return question, context


def locate(generated: str, context: str) -> tuple[int, int, float]:
    """The span of `context` that best matches `generated`: (start, end, match quality in [0, 1])."""
    wanted = generated.strip(_EDGE_PUNCTUATION)
    if not wanted:
        return 0, 0, 0.0
    at = context.lower().find(wanted.lower())
    if at >= 0:
        return at, at + len(wanted), 1.0
    words = [m.span() for m in re.finditer(r"\S+", context)]
    longest = len(wanted.split()) + MAX_SPAN_WORDS_EXTRA
    best = (0, 0, 0.0)
    for i in range(len(words)):
        for j in range(i, min(i + longest, len(words))):
            start, end = _trim(context, words[i][0], words[j][1])
            if start >= end:
                continue
            quality = SequenceMatcher(None, wanted.lower(), context[start:end].lower()).ratio()
            if quality > best[2]:
                best = (start, end, quality)
    return best if best[2] >= MIN_FUZZY_MATCH else (0, 0, 0.0)


def _trim(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start] in _EDGE_PUNCTUATION:
        start += 1
    while end > start and text[end - 1] in _EDGE_PUNCTUATION:
        end -= 1
    return start, end


def _probability(tokens: list[Token]) -> float:
    """The answer's probability: the product of its tokens' (the end's too), as the engine scored them."""
    logprobs = [t.logprob for t in tokens if t.logprob is not None]
    return math.exp(sum(logprobs)) if logprobs else 0.0


def _answer(context: str, completion: Completion, tokens: list[Token]) -> QuestionAnswer:
    start, end, quality = locate(completion.text, context)
    probability = _probability(tokens)
    score = min(1.0, max(0.0, probability if not completion.text.strip() else probability * quality))
    return QuestionAnswer(score=round(score, 6), start=start, end=end, answer=context[start:end])


async def stream_answer(
    textgen: TextGenerator, endpoint: str, question: str, context: str
) -> AsyncIterator[Token | QuestionAnswer]:
    """Yield the generated answer's tokens as they come, then the located span (an extractive model: the span)."""
    question, context = check(question, context)
    if textgen.facts(endpoint).get("task") == "question-answering":
        yield await ask_extractive_model(textgen, endpoint, question, context)
        return
    prompt, spans = prompt_for(question, context)
    # Within the endpoint's own SERVELET_MAX_TOKENS_PER_REQUEST: a lower one would refuse a number the client never sent.
    tokens = min(MAX_ANSWER_TOKENS, textgen.facts(endpoint).get("max_tokens_per_request") or MAX_ANSWER_TOKENS)
    parameters = {
        "max_new_tokens": tokens, "stop": ["\n"], "temperature": 0, "literal_spans": spans, "answer_span": spans[0],
    }
    tokens: list[Token] = []
    async for item in textgen.stream(endpoint, prompt, parameters):
        if isinstance(item, Token):
            tokens.append(item)
            yield item
        else:
            yield _answer(context, item, tokens)


async def answer_question(textgen: TextGenerator, endpoint: str, question: str, context: str) -> QuestionAnswer:
    result = None
    async for item in stream_answer(textgen, endpoint, question, context):
        if isinstance(item, QuestionAnswer):
            result = item
    assert result is not None
    return result


async def ask_extractive_model(textgen: TextGenerator, endpoint: str, question: str, context: str) -> QuestionAnswer:
    body = json.dumps({"question": question, "context": context}).encode()
    answer = await textgen.router.invoke(Invocation(endpoint=endpoint, body=body))
    try:
        span = json.loads(answer.body)
        return QuestionAnswer(score=span["score"], start=span["start"], end=span["end"], answer=span["answer"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelFailed(f"the instance's answer is not an answer span: {exc!r}", 500) from None
