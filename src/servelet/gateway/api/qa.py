"""The QA routes our users call on `default` (or the `endpoint` named): `GET|POST /question` → `{"score", "start",
"end", "answer"}`.

`answer` is the span of `context` that answers `question`; `start`/`end` are its character offsets. TGI's
`POST /generate` takes the same body and answers through `answer` here.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from ...control.endpoints import DEFAULT_ENDPOINT
from ..disconnect import unless_disconnected
from ..questions import answer_question
from ..services import Services, json_body, note_endpoint, parse, read_json, services

router = APIRouter(tags=["question answering"])

CAR = {"question": "What is the color of my car now?", "context": "My car used to be blue but I painted red"}


class QuestionRequest(BaseModel):
    """A question about a context; the answer is a span of the context."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [CAR]})

    question: str = Field(description="What to find in the context.")
    context: str = Field(description="The text that holds the answer.")
    endpoint: str = Field(DEFAULT_ENDPOINT, description="The endpoint to ask (a generative or an extractive QA model).")


class AnswerSpan(BaseModel):
    """The span of the context that answers the question, and the model's confidence in it."""

    score: float = Field(ge=0, le=1, description="Confidence in [0, 1].")
    start: int = Field(description="Offset of the answer's first character in the context.")
    end: int = Field(description="Offset just past the answer's last character: answer == context[start:end].")
    answer: str


async def answer(request: Request, hub: Services, body: QuestionRequest) -> dict:
    """Answer one question; empty questions or contexts are refused with a 422 naming which."""
    note_endpoint(request, body.endpoint)
    work = answer_question(hub.textgen, body.endpoint, body.question, body.context)
    return (await unless_disconnected(request, work)).as_dict()


@router.get("/question", response_model=AnswerSpan, summary="Answer a question from a context (query parameters)")
async def question_by_query(
    request: Request,
    question: str = Query(description="What to find in the context.", examples=[CAR["question"]]),
    context: str = Query(description="The text that holds the answer.", examples=[CAR["context"]]),
    endpoint: str = Query(DEFAULT_ENDPOINT, description="The endpoint to ask."),
    hub: Services = Depends(services),
):
    return await answer(request, hub, QuestionRequest(question=question, context=context, endpoint=endpoint))


@router.post(
    "/question",
    response_model=AnswerSpan,
    summary="Answer a question from a context (JSON body)",
    openapi_extra=json_body(QuestionRequest),
)
async def question_by_body(request: Request, hub: Services = Depends(services)):
    body = parse(QuestionRequest, await read_json(request, hub.settings))
    return await answer(request, hub, body)
