"""What the JSON-in, JSON-out tasks share (question answering, embeddings, classification).

Requests run one at a time in one worker thread: PyTorch already spreads one forward pass over the instance's
cores, so running two at once would only make both slower. Up to `max_waiting` more wait their turn; beyond
that the instance answers 429. A request in SageMaker's Hugging Face style is `{"inputs": ..., "parameters":
{...}}`; `"stream"` is accepted (InvokeEndpointWithResponseStream adds it) and the answer comes whole.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, ClassVar, TypeVar

import orjson
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError
from starlette.responses import JSONResponse, Response

from ...settings import InstanceSettings
from ..base import Call, ClientGone, InvocationError, Runtime, run_in_worker
from ..lmi import JSON_LINES, JSON_LINES_TYPES, read_json, request_lines

log = logging.getLogger("servelet.runtimes.transformers")
R = TypeVar("R", bound=BaseModel)


def _texts(value):
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) and v.strip() for v in value):
        return value
    raise ValueError("must be a non-empty string or a non-empty list of non-empty strings")


Texts = Annotated[str | list[str], BeforeValidator(_texts)]


class TaskRequest(BaseModel):
    """Fields every task's body may carry besides its inputs."""

    model_config = ConfigDict(extra="forbid")

    stream: bool = False


class JsonTaskRuntime(Runtime):
    name = "transformers"
    task: ClassVar[str]
    request_type: ClassVar[type[TaskRequest]]

    def __init__(self, path: Path, settings: InstanceSettings):
        self.path = path
        self.max_waiting = settings.max_waiting
        self._worker = ThreadPoolExecutor(1, thread_name_prefix=f"servelet-{self.task}")
        self._in_flight = 0  # running or waiting, until the worker thread is done with it
        self.cancelled = 0

    @abstractmethod
    def answer(self, request: Any) -> Any:
        """The JSON answer to one validated request (runs in the worker thread)."""

    def answer_many(self, requests: list[Any]) -> list[Any]:
        """The answers to the lines of a JSON-lines body (a batch transform's MultiRecord request); a task that
        can run them in fewer forward passes than one each says how."""
        return [self.answer(request) for request in requests]

    async def invoke(self, call: Call) -> Response:
        if call.media_type in JSON_LINES_TYPES:
            requests = [validate_line(self.request_type, decoded, n) for n, decoded in request_lines(call.body)]
            answers = await self._run(call, self.answer_many, requests)
            return Response(b"".join(orjson.dumps(a) + b"\n" for a in answers), media_type=JSON_LINES)
        request = validate(self.request_type, read_json(call))
        return JSONResponse(await self._run(call, self.answer, request))

    async def _run(self, call: Call, work, request) -> Any:
        """`work(request)` on the worker thread, behind the requests already waiting (at most max_waiting). A request
        whose client leaves while it waits never runs (counted as cancelled); one already running runs to its end."""
        if self._in_flight > self.max_waiting:
            waiting = self._in_flight - 1
            message = f"overloaded: 1 request is running and {waiting} are waiting (SERVELET_MAX_WAITING); retry later"
            raise InvocationError(429, message, "overloaded")
        self._in_flight += 1
        try:
            return await run_in_worker(self._worker, call, work, request, self._release)
        except ClientGone as gone:
            if gone.freed:
                self.cancelled += 1
            raise InvocationError(499, "the client left before the answer", "unavailable") from None
        except InvocationError:
            raise
        except Exception as exc:  # the model failed on a request it accepted: SageMaker's ModelError
            log.exception("%s failed", self.task)
            raise InvocationError(500, f"the {self.task} model failed: {type(exc).__name__}: {exc}", "model_error") from None

    def _release(self) -> None:
        self._in_flight -= 1

    def facts(self) -> dict:
        return {"runtime": self.name, "task": self.task, "name": self.path.name}

    def occupancy(self) -> dict:
        return {"running": min(self._in_flight, 1), "waiting": max(self._in_flight - 1, 0), "cancelled": self.cancelled}

    def close(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)


def validate_line(request_type: type[R], decoded, number: int) -> R:
    try:
        return request_type.model_validate(decoded)
    except ValidationError as exc:
        raise InvocationError(422, f"line {number}: {describe(exc)}") from None


def validate(request_type: type[R], body) -> R:
    """422 naming each field at fault the way the client wrote it (`inputs.0.context: required`)."""
    try:
        return request_type.model_validate(body)
    except ValidationError as exc:
        raise InvocationError(422, describe(exc)) from None


def describe(exc: ValidationError) -> str:
    problems = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"] if not _branch_name(p))
        if err["type"] == "missing":
            message = "required"
        elif err["type"] == "extra_forbidden":
            message = "unknown field"
        else:
            message = err["msg"].removeprefix("Value error, ")
        problems.append((where, message))
    # A union reports every branch it tried; the branch that got furthest into the body says what is wrong.
    kept = [(w, m) for w, m in problems if not (w and any(other.startswith(w + ".") for other, _ in problems))]
    return "; ".join(dict.fromkeys(f"{w}: {m}" if w else m for w, m in kept))


def _branch_name(part) -> bool:
    """pydantic's name for a union branch in an error's location (`QuestionContext`, `list[str]`, `str`)."""
    return isinstance(part, str) and ("[" in part or part[:1].isupper() or part in ("str", "int", "float", "bool"))
