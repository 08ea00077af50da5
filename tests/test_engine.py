"""The continuous-batching engine, with the real default model through llama.cpp."""

from __future__ import annotations

import asyncio

import pytest

from servelet.engine import (
    ContextOverflow,
    EngineStopped,
    Engine,
    EngineConfig,
    FinishReason,
    GenerationParams,
    InvalidConfig,
    InvalidRequest,
    Overloaded,
)

WORDS = [
    "apple", "river", "guitar", "pencil", "tiger", "window", "candle", "rocket",
    "banana", "mirror", "violin", "garden", "pepper", "castle", "dolphin", "blanket",
]  # fmt: skip


def repeat_prompt(word: str) -> str:
    return f"{word}, {word}, {word}, {word}, {word}, {word}, {word}, {word},"


@pytest.fixture(scope="module")
def engine(model_path):
    # Streams decode in every step here (no prefill-first pause), so step-counting tests read simply.
    config = EngineConfig(max_batch_size=16, max_model_len=1024, threads=2, max_decode_stall=0)
    engine = Engine(model_path, config)
    yield engine
    engine.close()


def assert_idle_and_empty(engine: Engine) -> None:
    """No sequence left and no KV cell held, as llama.cpp itself reports."""
    load = engine.occupancy()
    assert load["running"] == 0 and load["waiting"] == 0
    assert all(engine.model.kv_extent(slot) == 0 for slot in range(engine.config.max_batch_size))


async def test_sixteen_concurrent_requests_each_get_their_own_answer(engine):
    params = GenerationParams(max_new_tokens=12)
    results = await asyncio.gather(*(engine.generate(repeat_prompt(w), params) for w in WORDS))
    for word, result in zip(WORDS, results):
        assert result.reason is FinishReason.LENGTH and result.stats.generated_tokens == 12
        assert word in result.text, f"{word!r} prompt answered {result.text!r}"
        strangers = [w for w in WORDS if w != word and w in result.text]
        assert not strangers, f"{word!r} prompt leaked {strangers}: {result.text!r}"
    assert_idle_and_empty(engine)


async def test_a_lone_greedy_request_is_reproducible(engine):
    params = GenerationParams(max_new_tokens=24)
    first = await engine.generate("The capital of France is", params)
    second = await engine.generate("The capital of France is", params)
    assert first.text == second.text and first.text.strip()


async def test_the_warm_up_leaves_no_trace(engine, model_path):
    """The llamacpp runtime warms its engine up before it reports ready: nothing of it may show afterwards."""
    warmed = Engine(model_path, engine.config)
    try:
        await asyncio.to_thread(warmed.warm_up)  # as the runtime calls it: in the thread that loads the model
        figures = {key: value for key, value in warmed.occupancy().items() if key != "prefix_cache_capacity_tokens"}
        assert figures == {key: 0 for key in figures}  # what /ping reports
        assert_idle_and_empty(warmed)
        params = GenerationParams(max_new_tokens=8)
        answer = await warmed.generate("The capital of France is", params)
        assert answer.text == (await engine.generate("The capital of France is", params)).text
        assert warmed.occupancy()["tokens_generated"] == answer.stats.generated_tokens  # none of the warm-up's
    finally:
        warmed.close()


async def test_seeded_sampling_is_reproducible(engine):
    params = GenerationParams(max_new_tokens=24, do_sample=True, temperature=0.9, top_p=0.95, top_k=50, seed=7)
    first = await engine.generate("Once upon a time", params)
    second = await engine.generate("Once upon a time", params)
    other = await engine.generate("Once upon a time", params.model_copy(update={"seed": 8}))
    assert first.text == second.text
    assert other.text != first.text


async def test_repetition_penalty_changes_a_repetitive_answer(engine):
    plain = await engine.generate(repeat_prompt("apple"), GenerationParams(max_new_tokens=16))
    penalised = await engine.generate(repeat_prompt("apple"), GenerationParams(max_new_tokens=16, repetition_penalty=3.0))
    assert plain.text.count("apple") > penalised.text.count("apple")


async def test_stop_sequences_end_the_text_before_them(engine):
    gen = engine.submit("Count: 1, 2, 3,", GenerationParams(max_new_tokens=40, stop=[" 7"]))
    tokens = [t async for t in gen]
    assert gen.result.reason is FinishReason.STOP
    assert gen.result.text.endswith("6,") and " 7" not in gen.result.text
    assert "".join(t.text for t in tokens) == gen.result.text  # held-back text is never shown twice


async def test_a_stop_sequence_kept_in_the_output_ends_the_text(engine):
    """TGI's text keeps the stop sequence that ended it (`include_stop_str_in_output`, vLLM's name)."""
    gen = engine.submit(
        "Count: 1, 2, 3,", GenerationParams(max_new_tokens=40, stop=[" 7", " 6"], include_stop_str_in_output=True)
    )
    tokens = [t async for t in gen]
    assert gen.result.reason is FinishReason.STOP
    assert gen.result.text.endswith("5, 6") and " 7" not in gen.result.text
    assert "".join(t.text for t in tokens) == gen.result.text


async def test_tokens_carry_logprobs_and_the_end_carries_stats(engine):
    gen = engine.submit("The capital of France is", GenerationParams(max_new_tokens=8, details=True))
    tokens = [t async for t in gen]
    assert len(tokens) == 8 and all(t.logprob is not None and t.logprob <= 0 for t in tokens)
    stats = gen.result.stats
    assert stats.prompt_tokens == gen.prompt_tokens > 0 and stats.generated_tokens == 8
    assert stats.time_to_first_token > 0 and stats.tokens_per_second > 0 and stats.prompt_tokens_per_second > 0
    assert engine.occupancy()["prompt_tokens"] >= stats.prompt_tokens  # the engine-wide counter metrics will read


async def test_sampled_and_greedy_streams_in_one_step_carry_their_own_logprobs(engine):
    """A sampled row's pick need not be its peak: its log-prob must still be a finite log-probability."""
    sampled = engine.submit("Tell me a story:", GenerationParams(max_new_tokens=8, do_sample=True, temperature=1.5, seed=3, details=True))
    greedy = engine.submit("The capital of France is", GenerationParams(max_new_tokens=8, details=True))
    for gen in (sampled, greedy):
        tokens = [t async for t in gen]
        assert len(tokens) == 8
        assert all(t.logprob is not None and -1e4 < t.logprob <= 0 for t in tokens)


async def test_cancelling_frees_the_slot_within_one_step(engine):
    gen = engine.submit("Once upon a time", GenerationParams(max_new_tokens=500, ignore_eos=True))
    received = 0
    async for _ in gen:
        received += 1
        if received == 3:
            step_at_cancel = engine.steps
            break  # leaving the iteration cancels the sequence
    for _ in range(200):  # bounded: 200 x 10 ms
        if gen.request_id in engine.scheduler.freed_at_step:
            break
        await asyncio.sleep(0.01)
    assert engine.scheduler.freed_at_step[gen.request_id] - step_at_cancel <= 1
    assert gen.result is None or gen.result.reason is FinishReason.CANCELLED
    assert_idle_and_empty(engine)


LONG_PROMPT = " ".join(["The quick brown fox jumps over the lazy dog."] * 60)  # ~600 tokens


async def stream_while_prefilling(engine: Engine) -> tuple[int, int, int]:
    """Start a stream, then a long prompt; returns (its prompt tokens, steps its prefill took, stream tokens meanwhile)."""
    streaming = engine.submit("Once upon a time", GenerationParams(max_new_tokens=300, ignore_eos=True))
    tokens = aiter(streaming)
    await anext(tokens)  # the stream is running
    long_gen = engine.submit(LONG_PROMPT, GenerationParams(max_new_tokens=1))
    steps_before = engine.steps
    long_done = asyncio.ensure_future(long_gen.collect())
    tokens_meanwhile = 0
    while not long_done.done():
        await anext(tokens)
        tokens_meanwhile += 1
    await tokens.aclose()
    return long_gen.prompt_tokens, engine.steps - steps_before, tokens_meanwhile


async def test_long_prompts_are_prefilled_in_chunks_while_streams_flow(engine):
    prompt_tokens, steps_to_prefill, tokens_meanwhile = await stream_while_prefilling(engine)
    assert prompt_tokens > 4 * engine.config.prefill_chunk
    assert steps_to_prefill >= prompt_tokens // engine.config.prefill_chunk
    assert tokens_meanwhile >= steps_to_prefill - 2  # the stream got a token in (nearly) every step


async def test_prefill_first_pauses_streams_for_at_most_the_stall_allowance(model_path):
    patient = Engine(model_path, EngineConfig(max_batch_size=2, max_model_len=1024, threads=2, max_decode_stall=60))
    try:
        prompt_tokens, steps_to_prefill, tokens_meanwhile = await stream_while_prefilling(patient)
        # Within the allowance the stream sits out the prefill steps: the long prompt goes first, whole.
        # (One token may come from the step already running when the long prompt arrived, one after it.)
        assert steps_to_prefill >= prompt_tokens // patient.config.prefill_chunk
        assert tokens_meanwhile <= 2
    finally:
        patient.close()


async def test_limits_are_refused_with_clear_errors(engine):
    with pytest.raises(ContextOverflow, match="exceed the context length of 1024"):
        engine.submit("hello", GenerationParams(max_new_tokens=1024))
    with pytest.raises(InvalidRequest, match="must not be empty"):
        engine.submit("", GenerationParams(max_new_tokens=4))


async def test_a_full_queue_answers_overloaded(model_path):
    small = Engine(model_path, EngineConfig(max_batch_size=1, max_waiting=1, max_model_len=256, threads=2))
    try:
        params = GenerationParams(max_new_tokens=200, ignore_eos=True)
        running, waiting = small.submit("one", params), small.submit("two", params)
        with pytest.raises(Overloaded, match="overloaded"):
            small.submit("three", params)
        running.cancel()
        waiting.cancel()
    finally:
        small.close()


async def test_kv_exhaustion_preempts_the_youngest_and_recomputes_it(model_path):
    # One shared pool of 512 cells for four sequences that need 4 x (prompt + 160) cells in all.
    pooled = Engine(model_path, EngineConfig(max_batch_size=4, max_model_len=512, kv_cache_tokens=512, threads=2))
    try:
        params = GenerationParams(max_new_tokens=160, ignore_eos=True)
        prompts = [repeat_prompt(w) for w in WORDS[:4]]
        results = await asyncio.gather(*(pooled.generate(p, params) for p in prompts))
        assert pooled.scheduler.counters.preemptions > 0
        assert sum(r.stats.preemptions for r in results) == pooled.scheduler.counters.preemptions
        for word, result in zip(WORDS, results):
            assert result.reason is FinishReason.LENGTH and result.stats.generated_tokens == 160
            assert word in result.text
        assert_idle_and_empty(pooled)
    finally:
        pooled.close()


def test_a_context_longer_than_the_model_was_trained_for_is_refused(model_path):
    with pytest.raises(InvalidConfig, match="training context"):
        Engine(model_path, EngineConfig(max_batch_size=1, max_model_len=10**6))


async def test_the_engine_thread_loads_the_model_it_decodes_with(model_path, monkeypatch):
    """llama.cpp's OpenMP team belongs to the calling thread; a load on another thread can leave a second team that
    makes libgomp's barriers sleep (docs/engine.md, "Threads and AMX"), so load and decodes share one thread."""
    import threading

    from servelet.engine import engine as engine_module

    seen: dict[str, set[int]] = {"load": set(), "decode": set()}

    class RecordingModel(engine_module.LlamaModel):
        def __init__(self, path):
            seen["load"].add(threading.get_ident())
            super().__init__(path)

        def decode(self) -> int:
            seen["decode"].add(threading.get_ident())
            return super().decode()

    monkeypatch.setattr(engine_module, "LlamaModel", RecordingModel)
    watched = Engine(model_path, EngineConfig(max_batch_size=1, max_model_len=256, threads=2))
    try:
        await watched.generate("Hello", GenerationParams(max_new_tokens=2))
    finally:
        watched.close()
    assert seen["load"] == seen["decode"] == {watched._thread.ident}
    assert watched._thread.ident != threading.get_ident()


def test_a_model_that_cannot_load_fails_the_constructor(tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a model")
    with pytest.raises(RuntimeError, match="could not load the model"):
        Engine(broken, EngineConfig(max_batch_size=1, max_model_len=256, threads=2))


async def test_a_failing_step_ends_every_request_with_an_error_instead_of_hanging(model_path):
    broken = Engine(model_path, EngineConfig(max_batch_size=2, max_model_len=256, threads=2))
    try:
        params = GenerationParams(max_new_tokens=200, ignore_eos=True)
        first, second = broken.submit("Once upon a time", params), broken.submit("Hello there", params)
        tokens = aiter(first)
        await anext(tokens)

        def fail() -> int:
            raise RuntimeError("simulated llama.cpp failure")

        broken.model.decode = fail  # a mock of our own code, to break the decode loop on purpose
        with pytest.raises(EngineStopped, match="simulated llama.cpp failure"):
            async for _ in tokens:
                pass
        with pytest.raises(EngineStopped, match="simulated llama.cpp failure"):
            await asyncio.wait_for(second.collect(), timeout=30)
        with pytest.raises(EngineStopped, match="engine failed"):
            broken.submit("anything", GenerationParams(max_new_tokens=1))
    finally:
        broken.close()


def test_log_normalisers_match_a_float64_log_sum_exp():
    """Log-probs come from a per-row log-sum-exp shifted by the row's peak; it must match the exact value."""
    from types import SimpleNamespace

    import numpy as np

    from servelet.engine.scheduler import Scheduler, SchedulerLimits

    rows = (np.random.default_rng(7).standard_normal((5, 262_144)) * 4).astype(np.float32)
    rows[3] += 500.0  # large logits must not overflow exp
    model = SimpleNamespace(kv_cells=1024)  # the scheduler only reads the KV size when it is built
    limits = SchedulerLimits(max_batch_size=8, prefill_chunk=16, max_prefill_wait=1.0, max_decode_stall=1.0)
    normalisers = Scheduler(model, limits)._log_normalisers(rows, rows.max(axis=1))
    wide = rows.astype(np.float64)
    peak = wide.max(axis=1, keepdims=True)
    exact = peak[:, 0] + np.log(np.exp(wide - peak).sum(axis=1))
    assert normalisers.shape == (5,)
    np.testing.assert_allclose(normalisers, exact, rtol=1e-6, atol=1e-4)
