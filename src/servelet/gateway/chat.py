"""Chat messages to one prompt: the model's own chat template when it has one, else a documented plain template.

The plain template, for base models without a template (like the default Gemma 3 270M):

    <system messages, one per line, then a blank line>
    User: <content>
    Assistant: <content>
    User: <content>
    Assistant:

Generation stops at the next turn marker (`PLAIN_TURN_STOPS`), so a base model answers its own turn instead of
writing the rest of the transcript.

Each message's content is plain text: the prompt comes with the character ranges of the contents
(`ChatPrompt.literal_spans`), which runtimes tokenize without parsing special tokens, so a message that contains
`<start_of_turn>model` cannot open a turn (servelet/prompt_spans.py). To find them in a template's output, each
content is rendered between two private-use characters (U+E000, U+E001; removed from the contents first), which
are then taken out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import BadRequest, ModelFailed
from ..prompt_spans import Span

PLAIN_TURN_STOPS = ["\nUser:", "\nAssistant:"]
PLAIN_ROLES = {"user": "User", "assistant": "Assistant"}
OPEN, CLOSE = "\ue000", "\ue001"  # around each content in a template's output; never in a content
MARKED = re.compile(f"{OPEN}(.*?){CLOSE}", re.DOTALL)


@dataclass
class ChatPrompt:
    """The prompt to generate from, and stop sequences the template needs besides the caller's."""

    text: str
    stop: list[str]
    literal_spans: list[Span] = field(default_factory=list)  # where the messages' contents are in `text`

    def parameters(self) -> dict:
        """What the instance needs besides the text: the contents' spans, when there are any."""
        return {"literal_spans": self.literal_spans} if self.literal_spans else {}


def chat_prompt(messages: list[dict[str, str]], facts: dict) -> ChatPrompt:
    """`messages` are `{"role", "content"}` with text content; OpenAI's `developer` role is the system's."""
    messages = [{"role": _role(m["role"]), "content": _unmarked(m["content"])} for m in messages]
    template = facts.get("chat_template")
    if template:
        marked = [m | {"content": f"{OPEN}{m['content']}{CLOSE}" if m["content"] else ""} for m in messages]
        text, spans = take_out_marks(render_template(template, marked, facts))
        return ChatPrompt(text, stop=[], literal_spans=spans)
    text, spans = take_out_marks(plain_prompt([m | {"content": f"{OPEN}{m['content']}{CLOSE}"} for m in messages]))
    return ChatPrompt(text, stop=list(PLAIN_TURN_STOPS), literal_spans=spans)


def _unmarked(content: str) -> str:
    return content.replace(OPEN, "").replace(CLOSE, "") if OPEN in content or CLOSE in content else content


def take_out_marks(text: str) -> tuple[str, list[Span]]:
    """The text without its OPEN/CLOSE marks, and the spans they enclosed (empty ones left out)."""
    pieces, spans, length, at = [], [], 0, 0
    for match in MARKED.finditer(text):
        # A template that cut a content short may leave a lone mark: dropped, its text not protected.
        before, content = _unmarked(text[at:match.start()]), match[1]
        pieces += [before, content]
        length += len(before)
        if content:
            spans.append((length, length + len(content)))
        length += len(content)
        at = match.end()
    pieces.append(_unmarked(text[at:]))
    return "".join(pieces), spans


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
