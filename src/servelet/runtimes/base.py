"""The seam between the instance process and what serves a model.

The instance (`servelet container`) owns the hosting contract: `/ping`, `/invocations`, `/model`, body limits,
disconnects. A runtime owns one loaded model and answers an invocation: the llama.cpp engine, a Hugging Face
pipeline, a user's `inference.py`, vLLM, or a multi-model cache of any of those. Runtimes never see FastAPI's
request object, so the Ray executor can drive them the same way.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import ClassVar, TypeVar

from starlette.responses import Response

# A text-generation answer's two token rates, as headers of its whole (non-streamed) answer: the gateway reads them
# for its metrics without parsing the body.
PROMPT_RATE_HEADER = "X-Servelet-Prompt-Tokens-Per-Second"
GENERATED_RATE_HEADER = "X-Servelet-Generated-Tokens-Per-Second"


class InvocationError(Exception):
    """A request this runtime cannot answer; `status` and `kind` travel to the client (4xx: the caller's fault).

    `kind` names the error family the gateway maps: "validation", "unsupported_media_type", "payload_too_large",
    "unavailable", "overloaded", "model_error" (the user's model or handler failed: SageMaker's ModelError)."""

    def __init__(self, status: int, message: str, kind: str = "validation", retry_after: int | None = None):
        super().__init__(message)
        self.status, self.kind = status, kind
        self.retry_after = retry_after  # seconds, sent as Retry-After


@dataclass
class Call:
    """One `/invocations` request as a runtime sees it: the body bytes and the SageMaker headers."""

    body: bytes
    content_type: str = "application/json"
    accept: str | None = None
    custom_attributes: str | None = None
    target_model: str | None = None
    is_disconnected: Callable[[], Awaitable[bool]] = field(default=lambda: _never())

    @property
    def media_type(self) -> str:
        """The content type without parameters, lower case ("application/json; charset=utf-8" → "application/json")."""
        return self.content_type.split(";")[0].strip().lower()


async def _never() -> bool:
    return False


DISCONNECT_POLL_SECONDS = 0.25
T = TypeVar("T")
A = TypeVar("A")


class ClientGone(Exception):
    """The client disconnected before the answer was ready; nobody is left to answer."""

    freed = False  # whether the work it asked for was stopped before it ran (run_in_worker sets it)


async def unless_disconnected(client, work: Awaitable[T]) -> T:
    """Await `work`; if the client (a Call, a Starlette request: what has `is_disconnected()`) leaves first, cancel
    the work and raise ClientGone. The gateway's routes and the runtimes stop work for departed clients alike."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
            if done:
                return task.result()
            if await client.is_disconnected():
                raise ClientGone()
    finally:
        if not task.done():
            task.cancel()


async def run_in_worker(pool: Executor, call, fn: Callable[[A], T], arg: A, on_done: Callable[[], None]) -> T:
    """`fn(arg)` on one of `pool`'s threads, the event loop free meanwhile; `on_done` runs on the loop once the thread
    is done with it. A client that leaves first raises ClientGone, whose `freed` says whether the work still waited
    (it never runs) or already ran (a thread cannot be stopped: it runs to its end, and holds its place until then)."""
    loop = asyncio.get_running_loop()
    work = pool.submit(fn, arg)
    work.add_done_callback(lambda _: loop.call_soon_threadsafe(on_done))
    try:
        return await unless_disconnected(call, asyncio.wrap_future(work))
    except ClientGone as gone:
        gone.freed = work.cancel()
        raise


class Runtime(ABC):
    """A loaded model behind `/invocations`."""

    name: ClassVar[str]

    @abstractmethod
    async def invoke(self, call: Call) -> Response:
        """Answer one invocation (whole or streamed); raise InvocationError for what the caller got wrong."""

    def facts(self) -> dict:
        """What the gateway needs to speak for this model (`GET /model`): at least `runtime` and `task`.

        Text-generation runtimes add `context_length`, `max_batch_size`, `chat_template`, `bos_token`, `eos_token`."""
        return {"runtime": self.name, "task": None}

    def occupancy(self) -> dict:
        """Load figures merged into `/ping` (running, waiting, ...); the gateway's metrics and autoscaler read them."""
        return {}

    def failure(self) -> str | None:
        """Why the loaded model can serve no more (its engine died), None while it can: `/ping` answers 503 with it."""
        return None

    def close(self) -> None:
        """Free the model; the process is about to exit."""
