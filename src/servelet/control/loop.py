"""What the control loops (the autoscaler, the serverless scaler) share: each runs as one background task."""

from __future__ import annotations

import asyncio


class ControlLoop:
    """A reconciler run as one task from the gateway's start to its close; subclasses write `_run`."""

    _task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        raise NotImplementedError
