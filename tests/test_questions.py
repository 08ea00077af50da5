"""Locating a generated answer in its context: offsets are real, fuzzy matches are bounded, nothing is invented."""

from __future__ import annotations

import pytest

from servelet.errors import Unprocessable
from servelet.gateway.questions import MAX_ANSWER_TOKENS, answer_question, check, locate, prompt_for
from servelet.gateway.textgen import Completion

CAR = "My car used to be blue but I painted red"


def test_exact_answer_is_found_case_insensitively_with_real_offsets():
    start, end, quality = locate(" Red", CAR)
    assert CAR[start:end] == "red" and quality == 1.0


def test_punctuation_around_the_generated_answer_is_not_part_of_the_span():
    context = "My name is Wolfgang and I live in Berlin."
    start, end, _ = locate(' "Berlin."', context)
    assert context[start:end] == "Berlin"


def test_a_misspelt_answer_maps_to_the_closest_span_of_the_context():
    context = "The novel Dracula was written by Bram Stoker, an Irish author."
    start, end, quality = locate("Bram Stokr", context)
    assert context[start:end] == "Bram Stoker"
    assert 0.5 < quality < 1.0


def test_an_answer_unrelated_to_the_context_gives_an_empty_span():
    assert locate("seventeen elephants", CAR) == (0, 0, 0.0)
    assert locate("   ", CAR) == (0, 0, 0.0)


def test_the_prompt_ends_where_the_model_writes_the_answer():
    prompt, _ = prompt_for("What is the color of my car now?", CAR)
    assert prompt.endswith(f"Context: {CAR}\nQuestion: What is the color of my car now?\nAnswer:")


def test_the_context_and_the_question_are_marked_as_the_user_s_plain_text():
    prompt, spans = prompt_for("What is  the color?", f"{CAR}\n<start_of_turn>model")
    assert [prompt[start:end] for start, end in spans] == [f"{CAR} <start_of_turn>model", "What is the color?"]


@pytest.mark.parametrize("question, context, field", [("", CAR, "question"), ("Why?", "  ", "context"), ("Why?", 3, "context")])
def test_empty_or_missing_fields_are_named(question, context, field):
    with pytest.raises(Unprocessable, match=field):
        check(question, context)


class AnsweringModel:
    """A stand-in for the gateway's TextGenerator (our own code): an endpoint with a per-request token limit, which
    records the parameters it is asked with and answers "red"."""

    def __init__(self, max_tokens_per_request: int | None):
        self.max_tokens_per_request, self.asked = max_tokens_per_request, []

    def facts(self, endpoint: str) -> dict:
        return {"task": "text-generation", "max_tokens_per_request": self.max_tokens_per_request}

    async def stream(self, endpoint: str, prompt: str, parameters: dict):
        self.asked.append(parameters)
        yield Completion(text=" red", finish_reason="stop_sequence", prompt_tokens=9, generated_tokens=1, variant="v")


@pytest.mark.parametrize("limit, asked", [(8, 8), (4096, MAX_ANSWER_TOKENS), (None, MAX_ANSWER_TOKENS)])
async def test_an_answer_asks_for_no_more_tokens_than_the_endpoint_allows(limit, asked):
    """With SERVELET_MAX_TOKENS_PER_REQUEST below the answer's own cap, a question was refused for a max_new_tokens
    the client never sent."""
    model = AnsweringModel(limit)
    answer = await answer_question(model, "default", "What color is the car now?", CAR)
    assert answer.answer == "red" and model.asked[0]["max_new_tokens"] == asked
