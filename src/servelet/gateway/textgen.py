"""Text generation on an endpoint, for the API families that speak in tokens (OpenAI, TGI, QA, WebSocket).

It builds the LMI body the instance takes, forwards it through the router and reads the JSON-lines stream back,
so every family shares one way to generate and one place to count tokens for metrics.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from ..control.invocation import Invocation
from ..control.router import Router
from ..errors import BadRequest, ModelFailed
from ..instance.client import JsonLines
from . import metrics

MULTI_MODEL = "multi-model"  # the runtime of a multi-model instance: the task depends on the target model


@dataclass
class Token:
    id: int
    text: str
    logprob: float | None = None
    last: bool = False  # the Completion follows at once (TGI sends both in one event)


@dataclass
class Completion:
    """A finished generation: its text, why it stopped and the token counts (`usage`)."""

    text: str
    finish_reason: str
    prompt_tokens: int
    generated_tokens: int
    variant: str
    tokens: list[Token] = field(default_factory=list)
    time_to_first_token: float | None = None
    cached_tokens: int = 0  # prompt tokens the engine's prefix cache held (OpenAI's prompt_tokens_details)


class TextGenerator:
    def __init__(self, router: Router):
        self.router = router

    def facts(self, endpoint: str) -> dict:
        """Model facts of the endpoint (name, context_length, chat_template, ...); {} while loading."""
        return self.router.fleet.get(endpoint).facts() if endpoint in self.router.fleet.endpoints else {}

    async def complete(self, endpoint: str, prompt: str, parameters: dict, target: str | None = None) -> Completion:
        """Generate to the end; `tokens` carry log-probs."""
        tokens: list[Token] = []
        completion = None
        async for item in self.stream(endpoint, prompt, parameters, target):
            if isinstance(item, Token):
                tokens.append(item)
            else:
                completion = item
        assert completion is not None
        completion.tokens = tokens
        return completion

    def require_text_generation(self, endpoint: str) -> None:
        """Refuse, naming what the endpoint does serve, an endpoint whose model does not generate text."""
        facts = self.facts(endpoint)
        task = facts.get("task", "text-generation")
        if facts and task != "text-generation" and facts.get("runtime") != MULTI_MODEL:  # its models' tasks are unknown
            what = f"a {task} model" if task else f"models through the {facts.get('runtime')} runtime"
            raise BadRequest(
                f"endpoint {endpoint!r} serves {what}, which does not generate text; "
                "call it through InvokeEndpoint (POST /endpoints/{name}/invocations) or the route for its task"
            )

    async def stream(
        self, endpoint: str, prompt: str, parameters: dict, target: str | None = None
    ) -> AsyncIterator[Token | Completion]:
        """Yield each Token as it is generated, then one Completion (`target`: the model of a multi-model endpoint).
        Leaving early cancels the generation."""
        self.require_text_generation(endpoint)
        body = json.dumps({"inputs": prompt, "parameters": parameters, "stream": True}).encode()
        invocation = Invocation(endpoint=endpoint, body=body, content_type="application/json", target_model=target)
        started = time.perf_counter()
        first_at = last_at = None
        label = metrics.endpoint_label(endpoint)
        inter_token_latency = metrics.INTER_TOKEN_LATENCY.labels(label)  # looked up once, observed per token
        async with self.router.stream(invocation) as answer:
            lines = JsonLines()
            async for chunk in answer.chunks:
                for line in lines.feed(chunk):
                    if "error" in line:
                        raise ModelFailed(str(line["error"]), 500)
                    now = time.perf_counter()
                    if first_at is None:
                        first_at = now
                        metrics.TIME_TO_FIRST_TOKEN.labels(label).observe(now - started)
                    else:
                        inter_token_latency.observe(now - last_at)
                    last_at = now
                    token = line["token"]
                    yield Token(token["id"], token["text"], token.get("log_prob"), last="details" in line)
                    if "details" in line:
                        details = line["details"]
                        metrics.PROMPT_TOKENS.labels(label).inc(details["prompt_tokens"])
                        metrics.GENERATED_TOKENS.labels(label).inc(details["generated_tokens"])
                        metrics.observe_rates(
                            endpoint, details.get("prompt_tokens_per_second", 0), details.get("generated_tokens_per_second", 0)
                        )
                        yield Completion(
                            text=line["generated_text"],
                            finish_reason=details["finish_reason"],
                            prompt_tokens=details["prompt_tokens"],
                            generated_tokens=details["generated_tokens"],
                            variant=answer.variant,
                            time_to_first_token=None if first_at is None else first_at - started,
                            cached_tokens=details.get("cached_tokens", 0),
                        )
                        return
        raise ModelFailed("the instance ended the stream without its final details", 500)
