"""Prompt-lookup speculative decoding with the real default model: drafts copied from the sequence's own context are
verified in the step and change nothing a greedy client sees, except its speed."""

from __future__ import annotations

import asyncio

import pytest

from servelet.engine import Engine, EngineConfig, FinishReason, GenerationParams
from servelet.engine.sequence import Sequence
from servelet.gateway.questions import MAX_ANSWER_TOKENS, prompt_for

CONTEXT = (
    "Transformers provides thousands of pretrained models to perform tasks on different modalities such as text, "
    "vision, and audio. Transformers is backed by the three most popular deep learning libraries, Jax, PyTorch and "
    "TensorFlow, with a seamless integration between them. The AWS Well-Architected Framework has six pillars: "
    "operational excellence, security, reliability, performance efficiency, cost optimization, and sustainability."
)
QUESTIONS = [
    "What are the frameworks backing transformers?",
    "What are the pillars for well architected framework?",
    "Repeat the first sentence of the context.",
]
GREEDY = GenerationParams(max_new_tokens=40)


def ask(question: str) -> str:
    return (
        f"<start_of_turn>user\nContext: {CONTEXT}\nQuestion: {question}\nAnswer by copying from the context."
        "<end_of_turn>\n<start_of_turn>model\n"
    )


def config(prompt_lookup: int) -> EngineConfig:
    return EngineConfig(max_batch_size=4, max_model_len=1024, threads=2, prefix_cache_tokens=0, prompt_lookup=prompt_lookup)


@pytest.fixture(scope="module")
def speculating(model_path):
    engine = Engine(model_path, config(8))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def plain(model_path):
    engine = Engine(model_path, config(0))
    yield engine
    engine.close()


def sequence(tokens: list[int], generated: list[int]) -> Sequence:
    seq = Sequence(1, tokens, GenerationParams(), 100, False, sink=None)
    seq.generated = generated
    return seq


def test_a_draft_is_what_followed_the_latest_match_of_the_last_tokens():
    seq = sequence([1, 2, 3, 4, 5, 9, 2, 3, 7, 8], [2, 3])
    assert seq.propose(3) == [7, 8, 2]  # "2 3" last came before "7 8", then the output's own "2"
    assert sequence([1, 2, 3], [4]).propose(4) == []  # 4 never came before
    assert sequence([5, 6, 7, 5], [6]).propose(1) == [7]


async def test_qa_answers_are_the_same_with_drafts_and_the_drafts_are_counted(speculating, plain):
    """The prompts and parameters the QA routes send (servelet.gateway.questions)."""
    for question in QUESTIONS[:2]:
        prompt, spans = prompt_for(question, CONTEXT)
        params = GenerationParams(max_new_tokens=MAX_ANSWER_TOKENS, stop=["\n"], literal_spans=spans)
        expected = await plain.generate(prompt, params)
        answer = await speculating.generate(prompt, params)
        assert answer.text == expected.text, question
        assert answer.stats.generated_tokens == expected.stats.generated_tokens
        assert expected.stats.draft_tokens == 0
    assert answer.stats.accepted_draft_tokens > 0 and answer.stats.draft_tokens >= answer.stats.accepted_draft_tokens
    figures = speculating.occupancy()
    assert figures["accepted_draft_tokens"] > 0 and figures["draft_tokens"] >= figures["accepted_draft_tokens"]


async def test_streamed_tokens_keep_their_logprobs_and_limits_hold_inside_a_draft(speculating, plain):
    params = GenerationParams(max_new_tokens=7)
    tokens, end = await speculating.submit(ask(QUESTIONS[2]), params, logprobs=True).collect()
    plain_tokens, _ = await plain.submit(ask(QUESTIONS[2]), params, logprobs=True).collect()
    assert end.reason is FinishReason.LENGTH and end.stats.generated_tokens == 7 == len(tokens)
    assert [t.id for t in tokens] == [t.id for t in plain_tokens]
    assert all(t.logprob is not None and t.logprob <= 0 for t in tokens)
    assert [round(t.logprob, 2) for t in tokens] == [round(t.logprob, 2) for t in plain_tokens]
    until_models = GenerationParams(max_new_tokens=40, stop=["models"])
    stopped = await speculating.generate(ask(QUESTIONS[2]), until_models)
    assert stopped.reason is FinishReason.STOP and stopped.stats.accepted_draft_tokens > 0
    assert stopped.text == (await plain.generate(ask(QUESTIONS[2]), until_models)).text


async def test_sampled_requests_are_not_speculated(speculating):
    before = speculating.occupancy()["draft_tokens"]
    sampled = GenerationParams(max_new_tokens=12, temperature=0.8, seed=3)
    answers = await asyncio.gather(*(speculating.generate(ask(q), sampled) for q in QUESTIONS[:1]))
    assert answers[0].stats.draft_tokens == 0 and speculating.occupancy()["draft_tokens"] == before
