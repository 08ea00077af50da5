"""What the control loops (the autoscaler, the serverless scaler, the cost meter) share: each runs as one
background task."""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("servelet.control")


class ControlLoop:
    """A reconciler run as one task from the gateway's start to its close. By default it calls `tick` every
    `interval` seconds; a failing tick is logged and the next one tries again (`doing` names it in the log)."""

    _task: asyncio.Task | None = None
    interval: float = 1.0
    doing: str = "a control loop's pass"

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.tick()
            except Exception:  # noqa: BLE001 - one bad pass must not end the loop
                log.exception("%s failed; trying again in %g s", self.doing, self.interval)

    async def tick(self) -> None:
        raise NotImplementedError
