"""A WebSocket's credentials: a header on the upgrade (checked by the gate), else its first message
`{"type": "auth", "key": KEY}` (browsers cannot set headers on a WebSocket), answered `{"type": "authenticated"}`."""

from __future__ import annotations

import asyncio
import json

from fastapi import WebSocket
from starlette.websockets import WebSocketDisconnect

from ...control.scopes import Grant
from ...errors import GatewayError
from .errors import NoCredentials
from .middleware import GRANT, POLICY_VIOLATION

AUTH_TIMEOUT_S = 10.0
ASK = '{"type": "auth", "key": KEY}'
AUTH_MESSAGE = f"{ASK}: the first message, when auth is on and the upgrade carried no key"


async def websocket_grant(websocket: WebSocket) -> Grant | None:
    """The connection's grant; None once a connection without one has been told why and closed."""
    grant = websocket.scope.get("state", {}).get(GRANT)
    if grant is not None:
        return grant
    try:
        text = await asyncio.wait_for(websocket.receive_text(), AUTH_TIMEOUT_S)
        grant = await _grant_of(websocket.app.state.authenticator, text)
    except WebSocketDisconnect:
        return None
    except (TimeoutError, KeyError):  # KeyError: a binary message
        await _refuse(websocket, NoCredentials(f"send {ASK} as the first text message, within {AUTH_TIMEOUT_S:.0f} s"))
        return None
    except GatewayError as error:
        await _refuse(websocket, error)
        return None
    await websocket.send_text(json.dumps({"type": "authenticated", "key": grant.name}))
    return grant


async def _grant_of(authenticator, text: str) -> Grant:
    try:
        message = json.loads(text)
    except (ValueError, RecursionError):
        message = None
    if not isinstance(message, dict) or message.get("type") != "auth" or not isinstance(message.get("key"), str):
        raise NoCredentials(f"this gateway requires a key: send {ASK} first, or the key as an "
                            "`Authorization: Bearer` or `x-api-key` header on the upgrade")
    return await authenticator.by_key(message["key"])


async def _refuse(websocket: WebSocket, error: GatewayError) -> None:
    frame = {"type": "error", "message": error.message, "code": error.status, "error_type": error.kind}
    try:
        await websocket.send_text(json.dumps(frame))
        await websocket.close(POLICY_VIOLATION)
    except (WebSocketDisconnect, RuntimeError):
        pass
