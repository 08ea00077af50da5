"""Chat messages to a prompt: the plain template for models without one, and sandboxed Hugging Face templates."""

from __future__ import annotations

import pytest

from servelet.errors import BadRequest, ModelFailed
from servelet.gateway.chat import chat_prompt

CHATML = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
FACTS = {"chat_template": CHATML, "bos_token": "<s>", "eos_token": "</s>"}


def test_the_plain_template_writes_turns_and_stops_at_the_next_one():
    prompt = chat_prompt(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Capital of France?"},
        ],
        facts={"chat_template": None},
    )
    assert prompt.text == "Be brief.\n\nUser: Hi\nAssistant: Hello!\nUser: Capital of France?\nAssistant:"
    assert "\nUser:" in prompt.stop


def test_without_a_system_message_the_prompt_starts_with_the_first_turn():
    assert chat_prompt([{"role": "user", "content": "Hi"}], facts={}).text == "User: Hi\nAssistant:"


def test_a_model_template_is_rendered_without_the_bos_the_engine_adds():
    prompt = chat_prompt([{"role": "user", "content": "Hi"}], FACTS)
    assert prompt.text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert prompt.stop == []


def test_a_template_that_refuses_the_messages_answers_bad_request():
    strict = "{% if messages[0].role != 'user' %}{{ raise_exception('the first message must be the user\\'s') }}{% endif %}"
    with pytest.raises(BadRequest, match="first message must be the user"):
        chat_prompt([{"role": "assistant", "content": "Hi"}], {"chat_template": strict})


def test_templates_run_sandboxed():
    escape = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ModelFailed, match="chat template failed"):
        chat_prompt([{"role": "user", "content": "Hi"}], {"chat_template": escape})


def test_templates_may_ask_for_the_date():
    dated = "{{ strftime_now('%Y') }}|{{ messages[0].content }}"
    text = chat_prompt([{"role": "user", "content": "Hi"}], {"chat_template": dated}).text
    assert text.endswith("|Hi") and text[:4].isdigit()
