"""Embeddings on an endpoint that serves a feature-extraction model: OpenAI's `/v1/embeddings` body becomes the
instance's `{"inputs": [...]}`, and its `{"embeddings", "token_counts"}` becomes OpenAI's list of vectors."""

from __future__ import annotations

import base64
import json
import struct
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..control.endpoints import DEFAULT_ENDPOINT
from ..control.invocation import Invocation
from ..control.router import Router
from ..errors import BadRequest, ModelFailed
from .textgen import MULTI_MODEL

EMBEDDING_TASK = "feature-extraction"


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request; `model` names an endpoint."""

    model_config = ConfigDict(extra="forbid")

    input: str | list[str] = Field(..., description="A text, or a list of texts embedded in order.")
    model: str = Field(DEFAULT_ENDPOINT, description="The endpoint to call; unset: `default`.")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="`base64`: each vector as little-endian float32 bytes, base64-encoded."
    )
    dimensions: int | None = Field(None, description="Not supported: vectors have the model's own size.")
    user: str | None = Field(None, description="Accepted and ignored.")

    @field_validator("input", mode="before")
    @classmethod
    def _texts(cls, value):
        texts = [value] if isinstance(value, str) else value
        if not isinstance(texts, list) or not texts:
            raise ValueError("send a text or a non-empty list of texts")
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("send texts: token arrays are not supported")
        if any(not t.strip() for t in texts):
            raise ValueError("texts must not be empty")
        return value

    @field_validator("dimensions")
    @classmethod
    def _own_size(cls, value):
        if value is not None:
            raise ValueError("is not supported: vectors have the model's own size; leave it unset")
        return value


def require_embeddings(endpoint: str, facts: dict) -> None:
    """Refuse, naming the model's task, an endpoint whose model does not make embeddings."""
    task = facts.get("task")
    if facts and task != EMBEDDING_TASK and facts.get("runtime") != MULTI_MODEL:  # its models' tasks are unknown
        what = f"a {task} model" if task else f"a model of the {facts.get('runtime')} runtime"
        raise BadRequest(f"endpoint {endpoint!r} serves {what}, not embeddings (task {EMBEDDING_TASK})")


async def create_embeddings(
    router: Router, endpoint: str, body: EmbeddingRequest, target: str | None = None
) -> tuple[dict, str]:
    """The OpenAI answer, and the variant that served it."""
    texts = [body.input] if isinstance(body.input, str) else body.input
    invocation = Invocation(endpoint=endpoint, body=json.dumps({"inputs": texts}).encode(), target_model=target)
    answer = await router.invoke(invocation)
    try:
        result = json.loads(answer.body)
        vectors, counts = result["embeddings"], result["token_counts"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelFailed(f"the instance's answer is not embeddings: {exc!r}", 500) from None
    encode = _base64 if body.encoding_format == "base64" else list
    tokens = sum(counts)
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)],
        "model": body.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }, answer.variant


def _base64(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
