"""Which invocations are captured: those of endpoints whose DataCaptureConfig is enabled, sampled per request.

Every save of an endpoint record reaches `endpoint_changed` (control/records.py), so the request path reads a dict,
never the store; an update's new config captures from the moment its fleet takes all the traffic. An invocation is
sampled when it arrives (`sample`), and captured once its answer went out whole (`recorded` passes the answer's
chunks through, keeping a copy up to `max_output_bytes`): a request that fails, or whose client leaves, is not.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone

from ..control.invocation import ChunkStream, Invocation
from ..control.resources import DataCaptureConfig, EndpointRecord
from .records import CapturedInvocation, Encodings, Payload
from .writer import CaptureWriter


@dataclass(frozen=True)
class Capturing:
    """An endpoint's enabled DataCaptureConfig, read once per config rather than once per request."""

    config: DataCaptureConfig
    encodings: Encodings
    modes: frozenset[str]

    @classmethod
    def of(cls, config: DataCaptureConfig) -> Capturing:
        header = config.capture_content_type_header
        encodings = Encodings(
            csv=frozenset(t.lower() for t in (header.csv_content_types or ())) if header else frozenset(),
            json=frozenset(t.lower() for t in (header.json_content_types or ())) if header else frozenset(),
        )
        return cls(config, encodings, frozenset(config.modes))


@dataclass(frozen=True)
class Sampled:
    """An invocation chosen for capture, and when it came."""

    endpoint: str
    capturing: Capturing
    time: datetime


class DataCapture:
    def __init__(self, writer: CaptureWriter, max_output_bytes: int):
        self.writer = writer
        self.max_output_bytes = max_output_bytes
        self._endpoints: dict[str, Capturing] = {}

    def follow(self, records: Iterable[EndpointRecord]) -> None:
        """Take the stored endpoints' configs (at start; `endpoint_changed` keeps them current)."""
        for record in records:
            self.endpoint_changed(record.endpoint_name, record)

    def endpoint_changed(self, name: str, record: EndpointRecord | None) -> None:
        """A record was saved (None: deleted): capture by the DataCaptureConfig it serves with now."""
        config = record.data_capture if record is not None else None
        if config is None or not config.enable_capture or config.initial_sampling_percentage == 0:
            self._endpoints.pop(name, None)
        elif name not in self._endpoints or self._endpoints[name].config != config:
            self._endpoints[name] = Capturing.of(config)

    def sample(self, endpoint: str) -> Sampled | None:
        """Whether this invocation of `endpoint` is captured: by the config's percentage, drawn per request."""
        capturing = self._endpoints.get(endpoint)
        if capturing is None or random.random() * 100 >= capturing.config.initial_sampling_percentage:
            return None
        return Sampled(endpoint, capturing, datetime.now(timezone.utc))

    def recorded(self, sampled: Sampled, invocation: Invocation, answer: ChunkStream, body: bytes | None = None) -> ChunkStream:
        """`answer`, whose chunks pass through as they come; once the last went out, the invocation (with `body` as
        the client sent it, where the route changed `invocation.body`) goes to the writer. An output over
        `max_output_bytes` (a long stream) is not kept: its record is dropped and counted."""
        return dataclasses.replace(answer, chunks=self._passed_through(sampled, invocation, answer, body))

    async def _passed_through(
        self, sampled: Sampled, invocation: Invocation, answer: ChunkStream, body: bytes | None
    ) -> AsyncIterator[bytes]:
        modes = sampled.capturing.modes
        output, too_large = bytearray(), False
        async for chunk in answer.chunks:
            if "Output" in modes and not too_large:
                if len(output) + len(chunk) > self.max_output_bytes:
                    output, too_large = bytearray(), True
                else:
                    output += chunk
            yield chunk
        if too_large:
            self.writer.drop(sampled.endpoint, "too_large")
            return
        config = sampled.capturing.config
        self.writer.add(CapturedInvocation(
            endpoint=sampled.endpoint, variant=answer.variant, destination=config.destination_s3_uri,
            time=sampled.time, encodings=sampled.capturing.encodings, inference_id=invocation.inference_id,
            kms_key_id=config.kms_key_id,
            input=Payload(invocation.body if body is None else body, invocation.content_type) if "Input" in modes else None,
            output=Payload(bytes(output), answer.content_type) if "Output" in modes else None,
        ))
