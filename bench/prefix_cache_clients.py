"""The clients of bench/prefix_cache.py, each timing every answer's first token as the user sees it.

`QAClients`: a fixed number of clients working through a list of prompts, each sending its next prompt when its
last answer ends (a server's users, not one burst). `ChatClients`: conversations through the gateway's OpenAI chat
route, all at once, each turn sent with the whole history once the last answer is in.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

import engine as engine_bench  # bench/engine.py: the streaming calls and the token clock

RequestTiming = engine_bench.RequestTiming


@dataclass(frozen=True)
class Answer:
    timing: RequestTiming
    cached_tokens: int | None  # prompt tokens the server says it reused; None where it does not say
    text: str


@dataclass(frozen=True)
class CompletionApi:
    """A streaming completion call (bench/engine.py's) and what its lines say besides the token count:
    `said(line)` gives the line's text and, on the line that ends the answer, the cached prompt tokens."""

    stream: engine_bench.StreamingApi
    said: Callable[[str], tuple[str, int | None]]


def servelet_said(line: str) -> tuple[str, int | None]:
    event = json.loads(line) if line else {}
    text = event.get("token", {}).get("text", "")
    return text, event["details"].get("cached_tokens") if "details" in event else None


def llama_server_said(line: str) -> tuple[str, int | None]:
    if not line.startswith("data: "):
        return "", None
    event = json.loads(line.removeprefix("data: "))
    return event.get("content", ""), event.get("timings", {}).get("cache_n")


SERVELET = CompletionApi(engine_bench.SERVELET_API, servelet_said)
LLAMA_SERVER = CompletionApi(
    engine_bench.StreamingApi(
        engine_bench.LLAMA_SERVER_API.path,
        lambda prompt, new_tokens: engine_bench.LLAMA_SERVER_API.body(prompt, new_tokens) | {"cache_prompt": True},
        engine_bench.LLAMA_SERVER_API.tokens_after,
    ),
    llama_server_said,
)


class QAClients:
    """`clients` clients sharing one list of prompts: each takes the next prompt once its last answer has ended."""

    def __init__(self, base_url: str, api: CompletionApi, clients: int):
        self.base_url, self.api, self.clients = base_url, api, clients

    def run(self, prompts: list[str], new_tokens: int) -> list[Answer]:
        """The answers, in the order of `prompts`."""
        return asyncio.run(self._run(prompts, new_tokens))

    async def _run(self, prompts: list[str], new_tokens: int) -> list[Answer]:
        todo = list(enumerate(prompts))
        answers: list[Answer | None] = [None] * len(prompts)
        # A connection per request: llama-server (cpp-httplib) closes a keep-alive connection idle for 5 s, and one
        # taken from the pool after such a wait failed as "Server disconnected" (localhost connects cost ~0.1 ms).
        limits = httpx.Limits(max_connections=self.clients, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=self.base_url, timeout=engine_bench.REQUEST_TIMEOUT, limits=limits) as http:

            async def client() -> None:
                while todo:
                    index, prompt = todo.pop(0)
                    answers[index] = await self._send(http, prompt, new_tokens)

            await asyncio.gather(*(client() for _ in range(self.clients)))
        return answers

    async def _send(self, http: httpx.AsyncClient, prompt: str, new_tokens: int) -> Answer:
        api = self.api.stream
        clock = engine_bench.TokenClock()
        text, cached = [], None
        async with http.stream("POST", api.path, json=api.body(prompt, new_tokens)) as response:
            if response.status_code != 200:
                await response.aread()
                raise RuntimeError(f"{self.base_url}{api.path} answered {response.status_code}: {response.text}")
            async for line in response.aiter_lines():
                clock.count(api.tokens_after(line, clock.tokens))
                piece, said_cached = self.api.said(line)
                text.append(piece)
                cached = said_cached if said_cached is not None else cached
        return Answer(clock.timing(f"{self.base_url}{api.path}"), cached, "".join(text))


@dataclass(frozen=True)
class ChatTurn:
    ttft_s: float  # from sending to the first chunk with text (or the end, for an empty answer)
    prompt_tokens: int
    cached_tokens: int
    reply: str


class ChatClients:
    """Conversations through `POST /v1/chat/completions`, streamed, greedy, each turn resending the whole history."""

    def __init__(self, base_url: str, max_tokens: int, model: str = "default"):
        self.base_url, self.max_tokens, self.model = base_url, max_tokens, model

    def run(self, conversations: list) -> list[list[ChatTurn]]:
        """Each conversation's turns (bench/prefix_cache_texts.py's Conversation), all conversations at once."""
        return asyncio.run(self._run(conversations))

    async def _run(self, conversations: list) -> list[list[ChatTurn]]:
        limits = httpx.Limits(max_connections=len(conversations))
        async with httpx.AsyncClient(base_url=self.base_url, timeout=engine_bench.REQUEST_TIMEOUT, limits=limits) as http:
            return list(await asyncio.gather(*(self._converse(http, c) for c in conversations)))

    async def _converse(self, http: httpx.AsyncClient, conversation) -> list[ChatTurn]:
        history = [{"role": "system", "content": conversation.system}]
        turns = []
        for message in conversation.user_messages:
            history.append({"role": "user", "content": message})
            turn = await self._turn(http, history)
            history.append({"role": "assistant", "content": turn.reply})
            turns.append(turn)
        return turns

    async def _turn(self, http: httpx.AsyncClient, history: list[dict]) -> ChatTurn:
        body = {"model": self.model, "messages": history, "max_tokens": self.max_tokens, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}
        sent, first = time.perf_counter(), 0.0
        reply, usage = [], {}
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                raise RuntimeError(f"{self.base_url}/v1/chat/completions answered {response.status_code}: {response.text}")
            async for line in response.aiter_lines():
                if not line.startswith("data:") or line.strip() == "data: [DONE]":
                    continue
                chunk = json.loads(line.removeprefix("data:"))
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices", []):
                    content = choice.get("delta", {}).get("content")
                    if (content or choice.get("finish_reason")) and not first:
                        first = time.perf_counter()
                    reply.append(content or "")
        if not first or not usage:
            raise RuntimeError(f"{self.base_url}/v1/chat/completions: a stream without an end or without usage")
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        return ChatTurn(first - sent, usage["prompt_tokens"], cached, "".join(reply))
