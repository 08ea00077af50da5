"""`http(s)://` model files through httpx: ranged GETs where the server answers ranges, one plain GET where not."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import PurePosixPath
from urllib.parse import unquote, urlparse

import httpx

from .errors import ArtifactError, ArtifactMissing
from .remote import CHUNK_BYTES, RemoteObject

CONTENT_RANGE = re.compile(r"bytes (?:\d+-\d+|\*)/(\d+|\*)")
# Identity: byte ranges must count the file's own bytes, not a compressed encoding of them.
HEADERS = {"Accept-Encoding": "identity"}


class HttpObject(RemoteObject):
    transient = (httpx.TransportError,)

    def __init__(self, uri: str):
        self.uri = uri
        self.name = PurePosixPath(unquote(urlparse(uri).path)).name or "model"
        self.client = httpx.Client(headers=HEADERS, follow_redirects=True, timeout=httpx.Timeout(60.0, connect=10.0))
        try:
            # A one-byte range asks for the size and whether ranges work, without the body.
            with self.client.stream("GET", uri, headers={"Range": "bytes=0-0"}) as probe:
                self._learn(probe)
        except httpx.HTTPError as exc:
            self.client.close()
            raise ArtifactError(f"{uri}: cannot fetch it: {exc}") from None

    def _learn(self, probe: httpx.Response) -> None:
        if probe.status_code in (206, 416):  # 416: an empty file has no byte 0
            total = CONTENT_RANGE.fullmatch(probe.headers.get("content-range", ""))
            self.size = int(total.group(1)) if total and total.group(1) != "*" else None
            self.ranges = self.size is not None
        elif probe.status_code == 200:
            length = probe.headers.get("content-length")
            self.size, self.ranges = (int(length) if length else None), False
        else:
            self.client.close()
            missing = probe.status_code in (404, 410)
            raise (ArtifactMissing if missing else ArtifactError)(f"{self.uri}: the server answered {probe.status_code} {probe.reason_phrase}")
        etag, modified = probe.headers.get("etag"), probe.headers.get("last-modified")
        self.version = etag or modified or ""
        # If-Range on every part: a part of a newer version comes whole (200), never spliced into the old one's bytes.
        # A weak ETag may not be sent there (RFC 9110 13.1.5).
        self.if_range = etag if etag and not etag.startswith("W/") else modified

    def read(self, start: int, end: int | None) -> Iterator[bytes]:
        ranged = self.ranges and end is not None
        headers = {"Range": f"bytes={start}-{end - 1}"} if ranged else {}
        if ranged and self.if_range:
            headers["If-Range"] = self.if_range
        with self.client.stream("GET", self.uri, headers=headers) as response:
            if ranged and response.status_code == 200:
                raise ArtifactError(f"{self.uri}: the file changed while it was being fetched; deploy again")
            if response.status_code != (206 if ranged else 200):
                raise ArtifactError(f"{self.uri}: the server answered {response.status_code} {response.reason_phrase}")
            yield from response.iter_bytes(CHUNK_BYTES)

    def close(self) -> None:
        self.client.close()
