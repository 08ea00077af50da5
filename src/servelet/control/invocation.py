"""The one internal request shape every API family translates to, and what comes back."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from ..errors import BadRequest
from ..instance.stream import HEADER_BREAKERS


@dataclass
class Invocation:
    """Body bytes and the SageMaker headers that travel with them to an instance."""

    endpoint: str
    body: bytes
    content_type: str = "application/json"
    accept: str | None = None
    custom_attributes: str | None = None
    target_model: str | None = None
    target_variant: str | None = None
    inference_id: str | None = None
    # Seconds the caller gives the model to answer (an async job's InvocationTimeoutSeconds, a transform job's
    # InvocationsTimeoutInSeconds, up to an hour); None: the gateway's SERVELET_INVOCATION_TIMEOUT.
    timeout: float | None = None

    def instance_headers(self) -> dict[str, str]:
        headers = {"Content-Type": self.content_type}
        if self.accept:
            headers["Accept"] = self.accept
        if self.custom_attributes:
            headers["X-Amzn-SageMaker-Custom-Attributes"] = self.custom_attributes
        if self.target_model:
            headers["X-Amzn-SageMaker-Target-Model"] = self.target_model
        if self.inference_id:
            headers["X-Amzn-SageMaker-Inference-Id"] = self.inference_id
        for name, value in headers.items():  # values from JSON bodies (a target model, say) never met an HTTP parser
            if any(c in value for c in HEADER_BREAKERS):
                raise BadRequest(f"{name} must not contain a line break or a NUL character: {value!r}")
        return headers


@dataclass
class Answer:
    """A whole answer from an instance, and the variant that served it."""

    body: bytes
    content_type: str
    variant: str
    custom_attributes: str | None = None


@dataclass
class ChunkStream:
    """A streamed answer: `chunks` yields the instance's bytes as they come."""

    chunks: AsyncIterator[bytes]
    content_type: str
    variant: str
    headers: dict[str, str] = field(default_factory=dict)
