"""Constrained span decoding (`answer_span`): every answer is a run of the context's own tokens, with the real model."""

from __future__ import annotations

import math

import numpy as np
import pytest

from servelet.engine import Engine, EngineConfig, GenerationParams, InvalidRequest
from servelet.engine.copy_constraint import CopyConstraint, tokens_within
from servelet.gateway.questions import prompt_for

CARS = "My car used to be blue but I painted red"
FRAMEWORKS = (
    "Transformers provides thousands of pretrained models to perform tasks on different modalities such as text, "
    "vision, and audio. Transformers is backed by the three most popular deep learning libraries, Jax, PyTorch and "
    "TensorFlow, with a seamless integration between them."
)


@pytest.fixture(scope="module")
def engine(model_path):
    engine = Engine(model_path, EngineConfig(max_batch_size=4, max_model_len=1024, threads=2, prefix_cache_tokens=0))
    yield engine
    engine.close()


def test_the_allowed_tokens_follow_the_runs_the_answer_continues():
    constraint = CopyConstraint([5, 6, 7, 5, 8], end_tokens=[1])
    assert constraint.allowed().tolist() == [1, 5, 6, 7, 8]
    constraint.advance(5)
    assert constraint.allowed().tolist() == [1, 6, 8]  # after either 5
    constraint.advance(6)
    assert constraint.allowed().tolist() == [1, 7]
    row = np.zeros(10, dtype=np.float32)
    row[9], row[7], row[1] = 50.0, 2.0, 0.0  # 9 is the model's favourite, but not in the context
    token, logprob = constraint.pick(row)
    assert token == 7 and logprob == pytest.approx(math.log(math.exp(2) / (math.exp(2) + 1)), rel=1e-6)
    constraint.advance(1)
    assert constraint.allowed().tolist() == [1]  # ended: only an end token is left


def test_the_span_maps_to_the_tokens_that_cover_it():
    text = "ab cd ef"
    pieces = [b"ab", b" cd", b" ef"]
    assert tokens_within(text, (3, 5), pieces) == (1, 2)  # " cd" carries the space before "cd"
    assert tokens_within(text, (0, 8), pieces) == (0, 3)
    assert tokens_within(text, (0, 2), [b"ab", b" cd"]) is None  # the pieces do not spell the text


async def answer(engine: Engine, question: str, context: str, **extra) -> tuple[str, float, str]:
    prompt, spans = prompt_for(question, context)
    params = GenerationParams(max_new_tokens=32, stop=["\n"], literal_spans=spans, answer_span=spans[0], **extra)
    tokens, end = await engine.submit(prompt, params, logprobs=True).collect()
    return end.text, math.exp(sum(t.logprob for t in tokens)), end.reason.value


async def test_answers_are_spans_of_the_context_with_a_probability(engine):
    for question, context, expected in (
        ("What is the color of my car now?", CARS, "red"),
        ("What are the frameworks backing transformers?", FRAMEWORKS, "Jax, PyTorch and TensorFlow"),
    ):
        text, score, _ = await answer(engine, question, context)
        assert text.strip() and text.strip() in " ".join(context.split()), text
        assert expected in text and 0 < score <= 1


async def test_a_clear_answer_scores_higher_than_a_guess(engine):
    _, clear, _ = await answer(engine, "What is the color of my car now?", CARS)
    _, guess, _ = await answer(engine, "What is the name of my dog?", CARS)
    assert clear > guess


async def test_a_constrained_request_must_be_greedy_and_its_span_inside_the_prompt(engine):
    prompt, spans = prompt_for("What colour?", CARS)
    with pytest.raises(InvalidRequest, match="greedily"):
        engine.submit(prompt, GenerationParams(answer_span=spans[0], temperature=0.7))
    with pytest.raises(InvalidRequest, match="runs past"):
        engine.submit(prompt, GenerationParams(answer_span=(0, len(prompt) + 1)))
