"""Stop work for clients that went away: a cancelled forward closes the instance request, which cancels the generation.

The gateway's routes wait on a Starlette request exactly as runtimes wait on a call (runtimes/base.py).
"""

from __future__ import annotations

from ..runtimes.base import ClientGone, unless_disconnected

__all__ = ["ClientGone", "unless_disconnected"]
