"""One captured invocation as SageMaker's Model Monitor writes it: a JSON line, in a file named by its time.

A line holds `captureData` (`endpointInput`, `endpointOutput`: the observed content type, the mode, the data and
its encoding), `eventMetadata` (`eventId`, `inferenceId` when the client sent one, `inferenceTime`) and
`eventVersion`. Data whose content type the config lists as CSV or JSON is kept as text; any other (and text that
is not UTF-8) is base64, as SageMaker does without a CaptureContentTypeHeader. Monitoring jobs read these files
as they read SageMaker's, so the shape is SageMaker's to the key.
"""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime

EVENT_VERSION = "0"
# What a record costs in memory besides its payloads (its metadata and Python objects), for the buffer's bound.
RECORD_OVERHEAD_BYTES = 512


@dataclass(frozen=True)
class Payload:
    data: bytes
    content_type: str


@dataclass(frozen=True)
class Encodings:
    """The config's CaptureContentTypeHeader: media types (lower case) captured as CSV or as JSON text."""

    csv: frozenset[str] = frozenset()
    json: frozenset[str] = frozenset()

    def of(self, content_type: str) -> str:
        """CSV, JSON or BASE64 for a payload of `content_type`, compared without its parameters (`; charset=...`)."""
        media = content_type.split(";")[0].strip().lower()
        if media in self.csv:
            return "CSV"
        if media in self.json:
            return "JSON"
        return "BASE64"


@dataclass
class CapturedInvocation:
    """An invocation to write: where to, when, and what of it the config captures (input, output or both)."""

    endpoint: str
    variant: str
    destination: str
    time: datetime  # UTC, when the request came
    encodings: Encodings
    input: Payload | None = None
    output: Payload | None = None
    inference_id: str | None = None
    kms_key_id: str | None = None  # the config's: S3 encrypts the capture files with it (SSE-KMS)
    event_id: str = field(default_factory=lambda: str(uuid.uuid4()))

    @property
    def size(self) -> int:
        """The bytes it holds while it waits to be written: what the writer's bound counts."""
        return RECORD_OVERHEAD_BYTES + sum(len(p.data) for p in (self.input, self.output) if p is not None)


def line(event: CapturedInvocation) -> bytes:
    """The invocation as one JSON line of a capture file."""
    captured = {}
    if event.input is not None:
        captured["endpointInput"] = _payload(event.input, "INPUT", event.encodings)
    if event.output is not None:
        captured["endpointOutput"] = _payload(event.output, "OUTPUT", event.encodings)
    metadata = {"eventId": event.event_id}
    if event.inference_id:
        metadata["inferenceId"] = event.inference_id
    metadata["inferenceTime"] = event.time.strftime("%Y-%m-%dT%H:%M:%SZ")
    record = {"captureData": captured, "eventMetadata": metadata, "eventVersion": EVENT_VERSION}
    return json.dumps(record, ensure_ascii=False).encode() + b"\n"


def _payload(payload: Payload, mode: str, encodings: Encodings) -> dict:
    encoding = encodings.of(payload.content_type)
    data = None
    if encoding != "BASE64":
        try:
            data = payload.data.decode("utf-8")
        except UnicodeDecodeError:  # listed as text, but it is not: kept whole all the same
            encoding = "BASE64"
    if data is None:
        data = base64.b64encode(payload.data).decode("ascii")
    return {"observedContentType": payload.content_type, "mode": mode, "data": data, "encoding": encoding}


def folder(event: CapturedInvocation) -> str:
    """ENDPOINT/VARIANT/yyyy/mm/dd/hh: the files of one variant and hour, as SageMaker lays them out (UTC)."""
    return f"{event.endpoint}/{event.variant}/{event.time:%Y/%m/%d/%H}"


def file_name(first: datetime) -> str:
    """mm-ss-SSS-UUID.jsonl, SageMaker's name for a capture file, from its first record's time."""
    return f"{first:%M-%S}-{first.microsecond // 1000:03d}-{uuid.uuid4()}.jsonl"
