"""Prefix caching: prompts that start like an earlier or a running one reuse its KV cells, with the real default model.

llama.cpp's kernels round differently by batch shape (a chunk of 128 prompt rows against one of 40), so "the same
answer as a fresh prefill" is checked where the shapes match: one request at a time, greedy. Concurrent requests
are checked for what the cache promises there: the shared prefix is prefilled once and every request is answered.
"""

from __future__ import annotations

import asyncio

import pytest

from servelet.engine import Engine, EngineConfig, FinishReason, GenerationParams
from servelet.engine.prefix_cache import BLOCK_TOKENS, PrefixCache, block_hashes, reusable

FACTS = (
    "The Amazon rainforest covers much of the Amazon basin of South America. The basin encompasses seven million "
    "square kilometres, of which five and a half million are covered by the rainforest. The region includes territory "
    "belonging to nine nations. Most of the forest is in Brazil, with 60% of the rainforest, followed by Peru with "
    "13%, Colombia with 10%, and minor amounts in Venezuela, Ecuador, Bolivia, Guyana, Suriname and French Guiana. "
)
QUESTIONS = ["Which country has most of the forest?", "How many nations share the region?", "What share has Peru?"]
GREEDY = GenerationParams(max_new_tokens=12)


def ask(document: str, question: str) -> str:
    return f"<start_of_turn>user\n{document}\nQuestion: {question}<end_of_turn>\n<start_of_turn>model\n"


def document(topic: str, repeats: int = 3) -> str:
    return f"A note about {topic}. " + FACTS * repeats


def config(prefix_cache_tokens: int) -> EngineConfig:
    return EngineConfig(
        max_batch_size=4, max_model_len=1536, threads=2, max_decode_stall=0, prefix_cache_tokens=prefix_cache_tokens
    )


@pytest.fixture(scope="module")
def cached(model_path):
    engine = Engine(model_path, config(3072))  # two sequences of 1,536 cells
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def fresh(model_path):
    engine = Engine(model_path, config(0))
    yield engine
    engine.close()


# -- the blocks and the cache's bookkeeping (no model) -----------------------------------------------------------
def test_a_block_hash_names_the_block_and_everything_before_it():
    tokens = list(range(100))
    hashes = block_hashes(tokens)
    assert len(hashes) == 100 // BLOCK_TOKENS  # a partial block is never keyed
    changed_first = block_hashes([999] + tokens[1:])
    assert all(a != b for a, b in zip(hashes, changed_first))  # every later block's key changes with the first
    changed_last = block_hashes(tokens[:-BLOCK_TOKENS] + [7] * BLOCK_TOKENS)
    assert changed_last[:-1] == hashes[:-1] and changed_last[-1] != hashes[-1]


def test_the_least_recently_used_entry_makes_room_and_an_extended_one_is_replaced_in_place():
    cache = PrefixCache(range(10, 12))
    a, b, c = (block_hashes([n] * 64) for n in (1, 2, 3))
    for hashes in (a, b):
        slot = cache.place_for(hashes)
        cache.store(slot, hashes, [0] * 64, 0)
    assert cache.place_for(a) is None  # held already: nothing to copy
    assert cache.longest(a + c)[1] == len(a)
    cache.touch(cache.longest(a)[0])  # `b` is now the least recently used
    slot_of_b = cache.longest(b)[0].slot
    assert cache.place_for(c) == slot_of_b
    cache.store(slot_of_b, c, [3] * 64, 0)
    assert cache.longest(b) == (None, 0) and cache.counters.evicted == 1
    longer_a = block_hashes([1] * 64 + [5] * 32)  # a conversation's next turn extends its earlier one
    slot_of_a = cache.longest(a)[0].slot
    assert cache.place_for(longer_a) == slot_of_a
    cache.store(slot_of_a, longer_a, [1] * 64 + [5] * 32, 0)
    assert cache.counters.evicted == 1 and cache.longest(longer_a)[1] == len(longer_a)
    other_question = block_hashes([1] * 64 + [6] * 16)  # the same document, another question: its entry is refreshed
    assert cache.place_for(other_question) == slot_of_a


def test_a_sliding_window_must_still_hold_the_positions_before_the_prefix():
    assert reusable(100, 0, 0) and reusable(100, 0, 512)
    assert reusable(800, 200, 512) and not reusable(700, 200, 512)
    assert not reusable(800, 200, 0)  # without a window every layer must hold every position


# -- the engine ------------------------------------------------------------------------------------------------
async def test_questions_about_one_document_reuse_its_cells_and_answer_as_a_fresh_prefill_does(cached, fresh):
    doc = document("rivers", repeats=11)  # over 1,000 tokens
    doc_tokens = len(cached.tokenize(ask(doc, "")))
    assert doc_tokens >= 1000
    before = cached.occupancy()
    for question in QUESTIONS:
        prompt = ask(doc, question)
        expected = await fresh.generate(prompt, GREEDY)
        prefilled = cached.occupancy()["prompt_tokens"]
        answer = await cached.generate(prompt, GREEDY)
        assert answer.text == expected.text, question
        assert expected.stats.cached_tokens == 0
    # the last question prefilled only what follows the document (the engine's own count of prompt tokens fed)
    assert answer.stats.cached_tokens >= doc_tokens - 2 * BLOCK_TOKENS
    assert cached.occupancy()["prompt_tokens"] - prefilled == answer.stats.prompt_tokens - answer.stats.cached_tokens
    after = cached.occupancy()
    assert after["prefix_cache_hits"] - before["prefix_cache_hits"] == len(QUESTIONS) - 1
    assert after["prefix_cache_lookups"] - before["prefix_cache_lookups"] == len(QUESTIONS)
    assert after["prefix_cache_held_tokens"] > 0 and after["prefix_cache_capacity_tokens"] == 3072
    assert "prefix_cache_hits" not in fresh.occupancy()


async def test_the_same_prompt_again_is_answered_the_same_from_the_cache(cached):
    prompt = ask(document("lakes"), QUESTIONS[0])
    first = await cached.generate(prompt, GREEDY)
    again = await cached.generate(prompt, GREEDY)
    assert again.text == first.text
    assert again.stats.cached_tokens == again.stats.prompt_tokens - 1  # only the last prompt token is fed again


async def test_concurrent_prompts_with_one_document_prefill_it_once(cached):
    doc = document("mountains")
    prompts = [ask(doc, q) for q in QUESTIONS]
    counted = cached.occupancy()["prompt_tokens"]
    answers = await asyncio.gather(*(cached.generate(p, GREEDY) for p in prompts))
    prefilled = cached.occupancy()["prompt_tokens"] - counted
    doc_tokens = len(cached.tokenize(ask(doc, "")))
    assert all(a.reason is FinishReason.LENGTH and a.text.strip() for a in answers)
    assert sum(a.stats.cached_tokens > 0 for a in answers) == len(prompts) - 1  # they waited for the first one
    assert prefilled < doc_tokens + len(prompts) * 3 * BLOCK_TOKENS


async def test_entries_are_evicted_least_recently_used_without_failing_a_request(cached, fresh):
    """Two sequences fit in this cache: a third document evicts the oldest, which is then prefilled afresh."""
    evicted = cached.occupancy()["prefix_cache_evictions"]
    prompts = [ask(document(topic), QUESTIONS[1]) for topic in ("deserts", "glaciers", "volcanoes")]
    for prompt in prompts:
        await cached.generate(prompt, GREEDY)
    again = await cached.generate(prompts[0], GREEDY)
    assert again.stats.cached_tokens == 0 and cached.occupancy()["prefix_cache_evictions"] > evicted
    assert again.text == (await fresh.generate(prompts[0], GREEDY)).text


async def test_a_cancelled_request_leaves_the_cells_it_shared_valid(cached, fresh):
    """The second request takes the first one's document while the first still runs; the first is then cancelled."""
    doc = document("forests")
    first = cached.submit(ask(doc, QUESTIONS[0]), GenerationParams(max_new_tokens=200, ignore_eos=True))
    first_tokens = aiter(first)
    await anext(first_tokens)  # its prompt is in its cells once it has a token
    second = cached.submit(ask(doc, QUESTIONS[2]), GREEDY)
    second_tokens = aiter(second)
    await anext(second_tokens)
    first.cancel()
    async for _ in second_tokens:
        pass
    assert second.result.stats.cached_tokens > 0
    assert second.result.text == (await fresh.generate(ask(doc, QUESTIONS[2]), GREEDY)).text
    await first_tokens.aclose()
