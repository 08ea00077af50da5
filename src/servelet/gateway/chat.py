"""Chat messages to one prompt: the model's own chat template when it has one, else a documented plain template.

The plain template, for base models without a template (like the default Gemma 3 270M):

    <system messages, one per line, then a blank line>
    User: <content>
    Assistant: <content>
    User: <content>
    Assistant:

Generation stops at the next turn marker (`PLAIN_TURN_STOPS`), so a base model answers its own turn instead of
writing the rest of the transcript.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import BadRequest, ModelFailed

PLAIN_TURN_STOPS = ["\nUser:", "\nAssistant:"]
PLAIN_ROLES = {"user": "User", "assistant": "Assistant"}


@dataclass
class ChatPrompt:
    """The prompt to generate from, and stop sequences the template needs besides the caller's."""

    text: str
    stop: list[str]


def chat_prompt(messages: list[dict[str, str]], facts: dict) -> ChatPrompt:
    """`messages` are `{"role", "content"}` with text content; OpenAI's `developer` role is the system's."""
    messages = [{"role": _role(m["role"]), "content": m["content"]} for m in messages]
    template = facts.get("chat_template")
    if template:
        return ChatPrompt(render_template(template, messages, facts), stop=[])
    return ChatPrompt(plain_prompt(messages), stop=list(PLAIN_TURN_STOPS))


def _role(role: str) -> str:
    if role == "developer":
        return "system"
    if role not in ("system", "user", "assistant"):
        raise BadRequest(f"messages: role {role!r} is not supported (use system, developer, user or assistant)")
    return role


def plain_prompt(messages: list[dict[str, str]]) -> str:
    system = [m["content"] for m in messages if m["role"] == "system"]
    turns = [f"{PLAIN_ROLES[m['role']]}: {m['content']}" for m in messages if m["role"] != "system"]
    head = "\n".join(system) + "\n\n" if system else ""
    return head + "\n".join([*turns, "Assistant:"])


def render_template(template: str, messages: list[dict[str, str]], facts: dict) -> str:
    """Render a Hugging Face chat template; the engine adds the BOS token itself, so a leading one is dropped."""
    bos, eos = facts.get("bos_token") or "", facts.get("eos_token") or ""
    try:
        text = _compiled(template).render(
            messages=messages, add_generation_prompt=True, bos_token=bos, eos_token=eos
        )
    except TemplateRefused as exc:
        raise BadRequest(f"messages: the model's chat template refused them: {exc}") from None
    except TemplateError as exc:
        raise ModelFailed(f"the model's chat template failed: {exc}", 500) from None
    return text.removeprefix(bos) if bos else text


class TemplateRefused(Exception):
    """A template's own `raise_exception(...)`: the messages break its rules (e.g. roles must alternate)."""


def _raise_exception(message: str):
    raise TemplateRefused(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=8)
def _compiled(template: str):
    """Templates run sandboxed, as in transformers: a model file must not reach the gateway's Python."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    return env.from_string(template)
