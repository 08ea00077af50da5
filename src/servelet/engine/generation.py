"""A request's tokens as an async iterator: what every token engine returns from `submit` (llama.cpp, transformers).

Pure Python: a runtime that never loads llama.cpp uses it too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

from .errors import EngineStopped
from .sequence import Finished, FinishReason, Sequence, Token


class Generation:
    """Async iterator of Token events; `.result` holds the Finished event from the last token on.

    `next_event` awaits the engine's next Token or Finished for this sequence; `cancel` asks the engine to drop it.
    Leaving the iteration early (break, an exception, a cancelled task) cancels the sequence.
    """

    def __init__(self, seq: Sequence, next_event: Callable[[], Awaitable[Token | Finished]], cancel: Callable[[], None]):
        self._next_event = next_event
        self._cancel = cancel
        self.request_id = seq.request_id
        self.prompt_tokens = len(seq.prompt_tokens)
        self.result: Finished | None = None

    def __aiter__(self) -> AsyncIterator[Token]:
        return self._events()

    async def _events(self) -> AsyncIterator[Token]:
        try:
            while self.result is None:
                event = await self._next_event()
                if isinstance(event, Finished):
                    self.result = event  # set before the last token, so a stream can tell it is the last
                    if event.reason is FinishReason.ERROR:
                        raise EngineStopped(event.error or "generation failed")
                    if event.last is not None:
                        yield event.last
                    return
                yield event
        finally:
            if self.result is None:
                self.cancel()

    def cancel(self) -> None:
        self._cancel()

    async def collect(self) -> tuple[list[Token], Finished]:
        tokens = [t async for t in self]
        assert self.result is not None
        return tokens, self.result
