"""Special tokens stay out of the text (vLLM's skip_special_tokens), on the engine and through the routes.

A greedy "Rivers flow into" from the default model is " the sea" followed by `<start_of_image>` (a marker of Gemma
3's image input) until the token budget ends; before, those markers were written into the answer."""

from __future__ import annotations

import httpx
import pytest

from servelet.engine import Engine, EngineConfig, GenerationParams

PROMPT = "Rivers flow into"
MARKER = "<start_of_image>"


@pytest.fixture(scope="module")
def engine(model_path):
    engine = Engine(model_path, EngineConfig(max_batch_size=4, max_model_len=512, threads=2))
    yield engine
    engine.close()


async def test_markers_are_left_out_of_the_text_unless_asked_for(engine):
    skipped = await engine.generate(PROMPT, GenerationParams(max_new_tokens=24))
    shown = await engine.generate(PROMPT, GenerationParams(max_new_tokens=24, skip_special_tokens=False))
    assert MARKER in shown.text, f"the model no longer writes {MARKER}: {shown.text!r}; pick another prompt"
    assert shown.text.startswith(skipped.text) and skipped.text.strip()
    assert "<" not in skipped.text, skipped.text
    assert skipped.stats.generated_tokens == shown.stats.generated_tokens == 24  # skipped, not stopped


def test_only_markup_counts_as_special(engine):
    """Gemma 3's GGUF marks HTML tags, runs of spaces and image markers alike as user-defined tokens: only the
    markers are special; its control tokens (turn markers) are too."""
    model = engine.model
    text_tokens = model.tokenize("<h1>    x<table>", add_special=False)
    assert not any(model.is_special(t) for t in text_tokens)
    assert b"".join(model.piece(t) for t in text_tokens) == b"<h1>    x<table>"
    for marker in ("<start_of_image>", "[multimodal]", "<start_of_turn>", "<end_of_turn>"):
        [token] = model.tokenize(marker, add_special=False)
        assert model.is_special(token), marker
        assert model.piece(token) == b"" and model.piece(token, skip_special=False) == marker.encode()


def test_the_text_routes_leave_markers_out_and_take_vllm_s_switch(gateway):
    with httpx.Client(base_url=gateway.base_url, timeout=120) as http:
        tgi = http.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 24}}).json()
        assert tgi["generated_text"].strip() and MARKER not in tgi["generated_text"]
        shown = http.post("/generate", json={
            "inputs": PROMPT, "parameters": {"max_new_tokens": 24, "skip_special_tokens": False},
        }).json()
        assert MARKER in shown["generated_text"]
        openai = http.post("/v1/completions", json={
            "model": "default", "prompt": PROMPT, "max_tokens": 24, "temperature": 0,
        }).json()
        assert openai["choices"][0]["text"] == tgi["generated_text"]
        shown = http.post("/v1/completions", json={
            "model": "default", "prompt": PROMPT, "max_tokens": 24, "temperature": 0, "skip_special_tokens": False,
        }).json()
        assert MARKER in shown["choices"][0]["text"]
