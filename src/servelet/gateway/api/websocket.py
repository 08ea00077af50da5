"""WebSocket `GET /ws`: many requests on one connection, each answered as token frames and one final answer.

Each request runs as its own task, so answers interleave by `id`; frames are sent one at a time. A bad message
gets an error frame and the connection stays open; a disconnect cancels the connection's generations (leaving a
text stream closes its instance request, which cancels the generation in the engine).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any, Literal

from fastapi import APIRouter, WebSocket
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.websockets import WebSocketDisconnect, WebSocketDisconnected

from ... import __version__
from ...control.endpoints import DEFAULT_ENDPOINT
from ...control.scopes import EVERYONE, Grant
from ...errors import BadRequest, GatewayError, Overloaded, PayloadTooLarge
from .. import client_json, metrics
from ..auth.errors import Forbidden
from ..auth.handshake import AUTH_MESSAGE, websocket_grant
from ..chat import chat_prompt
from ..errors import describe_validation
from ..questions import QuestionAnswer, stream_answer
from ..services import Services
from ..textgen import Completion, Token

log = logging.getLogger("servelet.gateway")

router = APIRouter(tags=["websocket"])

FORMATS = [
    '{"id"?, "endpoint"?, "question", "context"}: extractive question answering',
    '{"id"?, "endpoint"?, "inputs", "parameters"?}: text generation (TGI parameters)',
    '{"id"?, "endpoint"?, "messages", "parameters"?}: chat (the model\'s chat template, else a plain one)',
    '{"type": "cancel", "id"}: stop a request in flight',
    AUTH_MESSAGE,
]

RequestId = str | int
CLIENT_GONE = (WebSocketDisconnect, WebSocketDisconnected)  # what a send raises once the client has left


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    id: RequestId | None = None
    endpoint: str = DEFAULT_ENDPOINT
    type: str | None = None


class QuestionRequest(_Request):
    question: str
    context: str


class GenerateRequest(_Request):
    inputs: str
    parameters: dict[str, Any] = {}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    parameters: dict[str, Any] = {}


SHAPES: dict[str, type[_Request]] = {"question": QuestionRequest, "inputs": GenerateRequest, "messages": ChatRequest}


def parse_request(message: dict) -> _Request:
    """The request shape told apart by its fields; BadRequest saying what is wrong otherwise."""
    if "id" in message and not _is_id(message["id"]):
        raise BadRequest("id: must be a string or an integer")
    fields = [field for field in SHAPES if field in message]
    if len(fields) != 1:
        raise BadRequest(
            "a request has exactly one of 'question' (with 'context'), 'inputs' or 'messages'"
            + (f"; this one has {', '.join(map(repr, fields))}" if fields else "")
        )
    try:
        return SHAPES[fields[0]].model_validate(message)
    except ValidationError as exc:
        raise BadRequest(describe_validation(exc)) from None


class Connection:
    """One client's socket: reads requests, runs each as a task, serializes the frames they send."""

    def __init__(self, websocket: WebSocket, services: Services, grant: Grant = EVERYONE):
        self.websocket = websocket
        self.services = services
        self.grant = grant  # what the connection's key may invoke, checked per request
        self.in_flight: dict[RequestId, asyncio.Task] = {}
        self.outcomes: dict[RequestId, str] = {}  # ok / error, once the request's last frame is sent
        self.sending = asyncio.Lock()
        self.numbers = itertools.count(1)

    async def send(self, frame: dict) -> None:
        async with self.sending:
            await self.websocket.send_text(json.dumps(frame, ensure_ascii=False))

    async def send_error(self, message: str, request_id: RequestId | None = None, error: GatewayError | None = None):
        frame: dict = {"type": "error"}
        if request_id is not None:
            frame["id"] = request_id
        frame["message"] = message
        if error is not None:
            frame |= {"code": error.status, "error_type": error.kind}
        await self.send(frame)

    async def serve(self) -> None:
        """Welcome the client, then read messages until it leaves; leaving cancels what it still has running."""
        try:
            await self.send(self.welcome())
            while True:
                message = await self.websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                await self.on_message(message)
        except CLIENT_GONE:
            return
        finally:
            await self.cancel_all()

    def welcome(self) -> dict:
        return {
            "type": "welcome",
            "message": "servelet: send one JSON request per text message; answers stream back by id",
            "version": __version__,
            "endpoints": sorted(self.services.fleet.endpoints),
            "formats": FORMATS,
            "limits": {
                "max_message_bytes": self.services.settings.max_payload_bytes,
                "max_requests_in_flight": self.services.settings.websocket_max_in_flight,
                "max_json_depth": self.services.settings.max_json_depth,
            },
        }

    async def on_message(self, message: dict) -> None:
        request_id = None
        try:
            payload = self.read_payload(message)
            request_id = payload.get("id")
            if payload.get("type") == "cancel":
                await self.cancel(request_id)
                return
            request = parse_request(payload)
            if not self.grant.may_invoke(request.endpoint):
                raise Forbidden(f"key {self.grant.name!r} may not invoke endpoint {request.endpoint!r}")
            if request.id in self.in_flight:
                request_id = None  # an error frame with this id would read as the running request's failure
                raise BadRequest(f"a request with id {request.id!r} is already in flight on this connection")
            request.id = self.admit(request.id)
        except GatewayError as error:
            metrics.WEBSOCKET_REQUESTS.labels("", "invalid", "error").inc()
            await self.send_error(error.message, request_id if _is_id(request_id) else None, error)
            return
        self.in_flight[request.id] = asyncio.create_task(self.answer(request))  # it removes itself when done

    def read_payload(self, message: dict) -> dict:
        text = message.get("text")
        if text is None:
            raise BadRequest("send each request as a JSON text message, not a binary one")
        settings = self.services.settings
        if (size := len(text.encode())) > settings.max_payload_bytes:
            raise PayloadTooLarge(f"the message has {size} bytes; the limit is {settings.max_payload_bytes} (SERVELET_MAX_PAYLOAD_BYTES)")
        try:
            payload = client_json.loads(text, settings.max_json_depth)
        except json.JSONDecodeError as exc:
            raise BadRequest(f"the message is not valid JSON: {exc}") from None
        if not isinstance(payload, dict):
            raise BadRequest(f"the message must be a JSON object, not {type(payload).__name__}")
        if payload.get("type") not in (None, "request", "cancel"):
            raise BadRequest(f"unknown message type {payload['type']!r}; send a request, or 'cancel' with an id")
        return payload

    def admit(self, request_id: RequestId | None) -> RequestId:
        """The request's id (assigned when the client gave none), once it fits beside those in flight."""
        # One client cannot take every engine slot through one socket.
        if len(self.in_flight) >= (most := self.services.settings.websocket_max_in_flight):
            raise Overloaded(
                f"this connection already has {most} requests in flight, its limit "
                "(SERVELET_WEBSOCKET_MAX_IN_FLIGHT); wait for an answer or open another connection"
            )
        while request_id is None or request_id in self.in_flight:
            request_id = f"req-{next(self.numbers)}"
        return request_id

    async def answer(self, request: _Request) -> None:
        """One request's task: its frames, then its removal from those in flight and its count in the metrics."""
        try:
            await self.respond(request)
        except CLIENT_GONE:
            pass  # the client left mid-answer; the receive loop cancels whatever else it had running
        finally:
            self.in_flight.pop(request.id, None)
            kind = type(request).__name__.removesuffix("Request").lower()
            outcome = self.outcomes.pop(request.id, "cancelled")
            metrics.WEBSOCKET_REQUESTS.labels(metrics.endpoint_label(request.endpoint), kind, outcome).inc()

    async def respond(self, request: _Request) -> None:
        """Stream the tokens and the final answer; a failure becomes an error frame for the request's id.
        The outcome is noted as soon as the last frame is sent: closing the stream afterwards is not part of it."""
        try:
            async with aclosing(self.generate(request)) as items:
                async for item in items:
                    if isinstance(item, Token) and not item.text:
                        continue  # a token that shows nothing yet (a stop sequence, half a character)
                    await self.send(self.frame(request.id, item))
                    if not isinstance(item, Token):
                        self.outcomes[request.id] = "ok"
        except CLIENT_GONE:
            raise
        except GatewayError as error:
            await self.send_error(error.message, request.id, error)
            self.outcomes[request.id] = "error"
        except Exception as exc:  # noqa: BLE001 - one request's failure must not close the others' connection
            log.exception("websocket request %r failed", request.id)
            await self.send_error(f"the request failed: {exc!r}", request.id)
            self.outcomes[request.id] = "error"

    def generate(self, request: _Request) -> AsyncIterator[Token | Completion | QuestionAnswer]:
        textgen = self.services.textgen
        if isinstance(request, QuestionRequest):
            return stream_answer(textgen, request.endpoint, request.question, request.context)
        if isinstance(request, GenerateRequest):
            return textgen.stream(request.endpoint, request.inputs, request.parameters)
        return self.chat(request)

    async def chat(self, request: ChatRequest) -> AsyncIterator[Token | Completion]:
        """Render the messages as the OpenAI family does (the model's template, else the plain one), then generate."""
        messages = [m.model_dump() for m in request.messages]
        prompt = chat_prompt(messages, self.services.textgen.facts(request.endpoint))
        parameters = dict(request.parameters) | prompt.parameters()
        if isinstance(stop := parameters.get("stop", []), list):  # anything else: the instance says what is wrong
            parameters["stop"] = [*stop, *prompt.stop]
        async with aclosing(self.services.textgen.stream(request.endpoint, prompt.text, parameters)) as items:
            async for item in items:
                yield item

    @staticmethod
    def frame(request_id: RequestId, item: Token | Completion | QuestionAnswer) -> dict:
        if isinstance(item, Token):
            return {"type": "token", "id": request_id, "text": item.text}
        if isinstance(item, QuestionAnswer):
            return {"type": "answer", "id": request_id, **item.as_dict()}
        return {
            "type": "answer",
            "id": request_id,
            "generated_text": item.text,
            "finish_reason": item.finish_reason,
            "usage": {
                "prompt_tokens": item.prompt_tokens,
                "completion_tokens": item.generated_tokens,
                "total_tokens": item.prompt_tokens + item.generated_tokens,
            },
        }

    async def cancel(self, request_id: Any) -> None:
        """Stop one request (the client's `{"type": "cancel", "id"}`) and confirm with a `cancelled` frame."""
        task = self.in_flight.get(request_id) if _is_id(request_id) else None
        if task is None:
            raise BadRequest(f"no request with id {request_id!r} is in flight on this connection")
        task.cancel()
        await asyncio.wait({task})
        await self.send({"type": "cancelled", "id": request_id})

    async def cancel_all(self) -> None:
        tasks = list(self.in_flight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _is_id(value: Any) -> bool:
    return isinstance(value, (str, int)) and not isinstance(value, bool)


@router.websocket("/ws")
async def websocket_requests(websocket: WebSocket):
    """One connection, many requests: see FORMATS (the welcome frame repeats them)."""
    clients = websocket.app.state.websocket_clients
    client = websocket.client.host if websocket.client else ""
    with clients.hold(client) as admitted:
        if not admitted:
            await _refuse(websocket, Overloaded(clients.refusal(client)))
            return
        await websocket.accept()
        if (grant := await websocket_grant(websocket)) is not None:
            await Connection(websocket, websocket.app.state.services, grant).serve()


async def _refuse(websocket: WebSocket, error: GatewayError) -> None:
    """Refuse the upgrade with the error's HTTP status and Retry-After where the server can answer one (uvicorn
    can); else close at once with 1013 (try again later)."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        body = {"code": error.status, "error_type": error.kind, "error": error.message}
        await websocket.send_denial_response(
            JSONResponse(body, status_code=error.status, headers={"Retry-After": str(error.retry_after or 1)})
        )
    else:
        await websocket.close(1013, error.message[:120])
